"""Compose a loss scaling, a gradient aggregator and an optimizer; log the weights.

``optax.chain(scaling, aggregator, optimizer)`` is the whole data path: the
uncertainty weighting rescales each task's gradient from its loss, PCGrad then
removes the conflicting components between the rescaled task gradients, Adam
takes the result. Every method keeps the weights it applied in its state under
the field name ``task_weights``; ``mtl.applied_weights(state)`` multiplies
those of the chain's members (here the uncertainty weights, since PCGrad is
built without ``num_tasks``), wherever the chain puts them.

Run:  python examples/compose_and_log.py
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_mtl as mtl


def task_losses(params, x):
  h = jnp.tanh(x @ params["trunk"])
  small = h @ params["head_small"]
  large = h @ params["head_large"]
  return jnp.stack([jnp.mean((small[:, 0] - jnp.sin(2 * x[:, 0])) ** 2),
                    jnp.mean((large[:, 0] - 50.0 * x[:, 1]) ** 2)])


def main(steps: int = 300, log_every: int = 100, verbose: bool = True):
  keys = jax.random.split(jax.random.key(0), 4)
  params = {"trunk": 0.5 * jax.random.normal(keys[0], (2, 32)),
            "head_small": 0.1 * jax.random.normal(keys[1], (32, 1)),
            "head_large": 0.1 * jax.random.normal(keys[2], (32, 1))}
  x = jax.random.normal(keys[3], (256, 2))
  heads = {"trunk": True, "head_small": False, "head_large": False}
  tx = optax.chain(
      mtl.scale_by_uncertainty(num_tasks=2, learning_rate=0.05),
      mtl.pcgrad(seed=0, shared=heads),
      optax.adam(1e-2),
  )
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    losses, task_grads = mtl.value_and_jacobian(task_losses)(params, x)
    updates, state = tx.update(task_grads, state, params, losses=losses)
    return optax.apply_updates(params, updates), state, losses

  history = []
  for i in range(1, steps + 1):
    params, state, losses = step(params, state)
    weights = mtl.applied_weights(state)
    history.append((np.asarray(losses), np.asarray(weights)))
    if verbose and i % log_every == 0:
      print(f"step {i:4d}  losses {np.asarray(losses)}  task_weights {np.asarray(weights)}")
  return history


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=300)
  main(parser.parse_args().steps)
