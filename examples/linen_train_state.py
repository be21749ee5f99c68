"""A Flax Linen ``TrainState`` train step with per-task gradients.

``TrainState.apply_gradients`` calls ``tx.update(grads, opt_state, params)``
and treats its other keyword arguments as fields to replace, so it cannot
forward ``losses=`` to a balancing method. Call ``tx.update`` directly and
replace the fields yourself, as ``apply_task_gradients`` does below.

Run:  python examples/linen_train_state.py
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import optax_mtl as mtl


class TwoTaskMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(32, name="trunk")(x))
    return nn.Dense(1, name="head_sin")(h)[:, 0], nn.Dense(1, name="head_big")(h)[:, 0]


def task_losses(params, apply_fn, x):
  sin_pred, big_pred = apply_fn({"params": params}, x)
  # Two regression targets ten times apart in scale (losses 100 times).
  return jnp.stack([jnp.mean((sin_pred - jnp.sin(3 * x[:, 0])) ** 2),
                    jnp.mean((big_pred - 10.0 * x[:, 1]) ** 2)])


def apply_task_gradients(state: train_state.TrainState, task_grads, losses):
  """What ``state.apply_gradients`` does, forwarding ``losses`` to the method."""
  updates, opt_state = state.tx.update(task_grads, state.opt_state,
                                       state.params, losses=losses)
  return state.replace(step=state.step + 1,
                       params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state)


@jax.jit
def train_step(state, x):
  losses, task_grads = mtl.value_and_jacobian(task_losses)(state.params,
                                                           state.apply_fn, x)
  return apply_task_gradients(state, task_grads, losses), losses


def main(steps: int = 500, seed: int = 0, verbose: bool = True):
  model = TwoTaskMLP()
  x = jax.random.uniform(jax.random.key(seed), (256, 2), minval=-1, maxval=1)
  params = model.init(jax.random.key(seed + 1), x)["params"]
  # Static priorities that undo the 100x ratio of the two losses' scales.
  tx = optax.chain(mtl.weighted(jnp.array([1.0, 1e-2]),
                                shared={"trunk": True, "head_sin": False,
                                        "head_big": False}),
                   optax.adam(1e-2))
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  first = None
  for _ in range(steps):
    state, losses = train_step(state, x)
    first = losses if first is None else first
  if verbose:
    print(f"losses at step 1: {np.asarray(first)}, at step {steps}: {np.asarray(losses)}")
  return np.asarray(first), np.asarray(losses), int(state.step)


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=500)
  main(parser.parse_args().steps)
