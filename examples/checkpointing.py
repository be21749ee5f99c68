"""Save the optimizer state mid-training with Orbax, restore it, continue identically.

Every state of optax_mtl is a NamedTuple of arrays, so the whole train state
(parameters and the chained optimizer state) is one pytree that Orbax saves
as it is; restoring against the abstract state of a fresh ``init`` gives back
the same NamedTuples (learned task weights and random keys included), and
training resumes bit for bit.

Run:  python examples/checkpointing.py
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import optax_mtl as mtl


def task_losses(params, x):
  pred = jnp.tanh(x @ params["w1"]) @ params["w2"]
  return jnp.stack([jnp.mean((pred[:, 0] - jnp.sin(x[:, 0])) ** 2),
                    jnp.mean((pred[:, 1] - 5.0 * x[:, 1]) ** 2)])


def make_optimizer():
  # Every part has state: the learned uncertainty parameters, PCGrad's random
  # key (its task order changes each step) and Adam's moments.
  return optax.chain(mtl.scale_by_uncertainty(num_tasks=2, learning_rate=0.05),
                     mtl.pcgrad(seed=0), optax.adam(1e-2))


def batch(step):
  return jax.random.normal(jax.random.key(step), (64, 3))


def train(params, opt_state, tx, steps, first_step=0):
  @jax.jit
  def step_fn(params, opt_state, x):
    losses, task_grads = mtl.value_and_jacobian(task_losses)(params, x)
    updates, opt_state = tx.update(task_grads, opt_state, params, losses=losses)
    return optax.apply_updates(params, updates), opt_state

  for step in range(first_step, first_step + steps):
    params, opt_state = step_fn(params, opt_state, batch(step))
  return params, opt_state


def main(steps: int = 40, verbose: bool = True):
  keys = jax.random.split(jax.random.key(0), 2)
  params = {"w1": 0.3 * jax.random.normal(keys[0], (3, 16)),
            "w2": 0.3 * jax.random.normal(keys[1], (16, 2))}
  tx = make_optimizer()
  half = steps // 2

  # Uninterrupted run.
  straight = train(params, tx.init(params), tx, steps)

  # Interrupted run: train half, save, restore into a fresh process's state.
  midway = train(params, tx.init(params), tx, half)
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "checkpoint"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, {"params": midway[0], "opt_state": midway[1]})
    checkpointer.wait_until_finished()
    fresh_tx = make_optimizer()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            {"params": params, "opt_state": fresh_tx.init(params)})
    restored = checkpointer.restore(path, abstract)
  resumed = train(restored["params"], restored["opt_state"], fresh_tx,
                  steps - half, first_step=half)

  same = all(np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)))
  if verbose:
    print(f"resumed run identical to the uninterrupted one: {same}")
  return straight, resumed


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=40)
  main(parser.parse_args().steps)
