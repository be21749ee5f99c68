"""Loss-based task weighting at the cost of one backward pass.

Two regression tasks share an MLP; their targets differ in scale by 1e4, so
summed losses let the large one drown the small one. A loss-based weighting
(here uncertainty weighting, then DWA with task priorities) only needs the
loss values, so the weighted gradient ``sum_t w_t grad L_t`` comes from ONE
backward pass: the weights are the cotangent of ``jax.vjp`` of the loss
vector (``mtl.value_and_weighted_grad``). Flax NNX users get the same single
pass with ``mtl.weighted_loss`` inside ``nnx.value_and_grad`` (shown last).

Run:  python examples/one_backward.py        (a few seconds on a CPU)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import optax_mtl as mtl

SCALES = jnp.array([1.0, 100.0])  # task 1's targets are 100x larger


def make_data(key, n=512):
  kx, kn = jax.random.split(key)
  x = jax.random.normal(kx, (n, 8))
  y = jnp.stack([jnp.sin(x[:, 0]) + x[:, 1], x[:, 2] * x[:, 3]], axis=1) * SCALES[None, :]
  return x, y + 0.01 * jax.random.normal(kn, y.shape) * SCALES[None, :]


def init_params(key):
  k1, k2 = jax.random.split(key)
  return {"w1": jax.random.normal(k1, (8, 64)) / jnp.sqrt(8.0), "b1": jnp.zeros(64),
          "w2": jax.random.normal(k2, (64, 2)) / 8.0, "b2": jnp.zeros(2)}


def task_losses(params, x, y):
  hidden = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
  pred = hidden @ params["w2"] + params["b2"][None, :]
  return jnp.mean((pred - y) ** 2, axis=0)  # [T] losses


def train(weighting, x, y, steps):
  opt = optax.adam(3e-3)
  params = init_params(jax.random.key(1))
  opt_state, w_state = opt.init(params), weighting.init(params)
  value_and_grad = mtl.value_and_weighted_grad(task_losses, weighting)

  @jax.jit
  def step(params, opt_state, w_state):
    losses, grads, w_state = value_and_grad(w_state, params, x, y)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, w_state, losses

  for _ in range(steps):
    params, opt_state, w_state, losses = step(params, opt_state, w_state)
  return losses, w_state


def nnx_variant(x, y, steps):
  """The same single backward pass with a Flax NNX model."""
  model = nnx.Sequential(nnx.Linear(8, 64, rngs=nnx.Rngs(0)), jnp.tanh,
                         nnx.Linear(64, 2, rngs=nnx.Rngs(1)))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  weighting = mtl.scale_by_realtime_loss()

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      losses = jnp.mean((model(x) - y) ** 2, axis=0)
      return mtl.weighted_loss(weighting, weighting.init(None), losses)
    (_, (weights, _)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return weights

  for _ in range(steps):
    weights = step(model, optimizer)
  return jnp.mean((model(x) - y) ** 2, axis=0), weights


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=200)
  args = parser.parse_args(argv)
  x, y = make_data(jax.random.key(0))
  # Relative errors (loss / target variance) make the two tasks comparable.
  variance = jnp.var(y, axis=0)

  runs = {
      "sum (plain)": mtl.sum(num_tasks=2),
      "uncertainty": mtl.scale_by_uncertainty(num_tasks=2, learning_rate=0.05),
      "dwa + priorities": mtl.dwa(num_tasks=2, priorities=jnp.array([2.0, 1.0])),
  }
  for name, weighting in runs.items():
    losses, state = train(weighting, x, y, args.steps)
    weights = optax.tree.get(state, "task_weights")
    print(f"{name:18s} relative losses {jnp.round(losses / variance, 4)}  "
          f"last task_weights {jnp.round(weights, 5)}")

  losses, weights = nnx_variant(x, y, args.steps)
  print(f"{'NNX realtime':18s} relative losses {jnp.round(losses / variance, 4)}  "
        f"weights 1/L_t {jnp.round(weights, 5)}")


if __name__ == "__main__":
  main()
