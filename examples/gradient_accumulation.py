"""Gradient accumulation with a balancing method: accumulate after the aggregator.

``optax.MultiSteps`` placed after the aggregator stores one update per
mini-batch (the parameters' size) instead of T stacked per-task gradients, and
each mini-batch is balanced with its own losses. Wrapping the whole chain in
MultiSteps instead would keep T times more memory and balance the averaged
gradients with the last mini-batch's losses only.

Run:  python examples/gradient_accumulation.py
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_mtl as mtl


def task_losses(params, x, y):
  pred = jnp.tanh(x @ params["w1"]) @ params["w2"]
  return jnp.stack([jnp.mean((pred[:, 0] - y[:, 0]) ** 2),
                    jnp.mean((pred[:, 1] - y[:, 1]) ** 2)])


def main(steps: int = 200, accumulate: int = 4, seed: int = 0, verbose: bool = True):
  keys = jax.random.split(jax.random.key(seed), 4)
  params = {"w1": 0.3 * jax.random.normal(keys[0], (3, 16)),
            "w2": 0.3 * jax.random.normal(keys[1], (16, 2))}
  x = jax.random.normal(keys[2], (512, 3))
  y = jnp.stack([jnp.sin(x[:, 0]), jnp.tanh(x[:, 1] - 2.0 * x[:, 2])], axis=1)

  tx = optax.chain(
      mtl.mean(),  # stacked per-task gradients -> one update
      optax.MultiSteps(optax.adam(1e-2), every_k_schedule=accumulate
                       ).gradient_transformation(),
  )
  state = tx.init(params)

  @jax.jit
  def micro_step(params, state, xb, yb):
    losses, task_grads = mtl.value_and_jacobian(task_losses)(params, xb, yb)
    updates, state = tx.update(task_grads, state, params, losses=losses)
    return optax.apply_updates(params, updates), state, losses

  first = None
  for step in range(steps):
    start = (step * 32) % 512
    params, state, losses = micro_step(params, state, x[start:start + 32],
                                       y[start:start + 32])
    first = losses if first is None else first
  if verbose:
    print(f"{steps} micro-batches, {steps // accumulate} optimizer steps; "
          f"losses {np.asarray(first)} -> {np.asarray(losses)}")
  return np.asarray(first), np.asarray(losses)


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=200)
  main(parser.parse_args().steps)
