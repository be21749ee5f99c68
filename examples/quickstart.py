"""Quickstart: one Flax NNX network, two tasks of very different scales.

The network reads scikit-learn's 8x8 handwritten digits and predicts
  * the digit class (10-way cross-entropy, loss around 2.3 at the start), and
  * the total ink of the image (squared error on a target in the hundreds, so
    a loss around 1e5 at the start).
Summing the two losses lets the regression drown the classification; the
balancing methods of optax_mtl fix that without hand-tuning. Each method trains
the same network from the same initialisation; test metrics are printed.

Run:  python examples/quickstart.py            (under a minute on a laptop CPU)
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

import optax_mtl as mtl


class TwoHeadNet(nnx.Module):
  """A shared MLP trunk with a classification head and a regression head."""

  def __init__(self, rngs: nnx.Rngs):
    self.trunk1 = nnx.Linear(64, 128, rngs=rngs)
    self.trunk2 = nnx.Linear(128, 64, rngs=rngs)
    self.class_head = nnx.Linear(64, 10, rngs=rngs)
    self.ink_head = nnx.Linear(64, 1, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.trunk2(nnx.relu(self.trunk1(x))))
    return self.class_head(h), self.ink_head(h)[:, 0]


def task_losses(model, x, label, ink):
  """Returns the [T] vector of per-task losses: the input of every method."""
  logits, ink_pred = model(x)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()
  mse = jnp.mean((ink_pred - ink) ** 2)
  return jnp.stack([ce, mse])


def heads_are_task_specific(params):
  """The ``shared=`` mask: True for trunk leaves, False for the heads."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "head" not in jax.tree_util.keystr(path), params)


def methods(initial_losses):
  """Aggregators compared here; any optax_mtl method chains the same way."""
  shared = heads_are_task_specific
  return {
      "sum": mtl.sum(shared=shared),
      "mean": mtl.mean(shared=shared),
      # Static weights from the expected initial losses (log 10 for the
      # classes, E[ink^2] for the regression): the "initial loss" heuristic.
      "weighted 1/L(0)": mtl.weighted(1.0 / initial_losses, shared=shared),
      # Weights from the losses as training goes (one loss scaling + sum).
      "realtime loss": mtl.realtime_loss_weighting(shared=shared),
      # Learned weights, started at their fixed point for the first losses.
      "uncertainty": mtl.uncertainty_weighting(num_tasks=2, warm_start=True,
                                               shared=shared),
      # Gramian methods on the shared trunk; the heads keep their own gradient.
      "mgda (l2)": mtl.mgda(normalization="l2", shared=shared),
      "pcgrad": optax.chain(mtl.scale_by_realtime_loss(), mtl.pcgrad(shared=shared)),
  }


def load_data(seed: int = 0):
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  label = digits.target.astype(np.int32)
  ink = digits.data.sum(axis=1).astype(np.float32)  # 0..1024, mean ~ 300
  return train_test_split(x, label, ink, test_size=0.25, random_state=seed)


def train(method_tx, data, steps: int, batch: int, seed: int):
  x_tr, x_te, y_tr, y_te, ink_tr, ink_te = data
  model = TwoHeadNet(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, optax.chain(method_tx, optax.adam(1e-3)),
                            wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y, ink):
    losses, grads = mtl.value_and_jacobian(task_losses)(model, x, y, ink)
    optimizer.update(model, grads, losses=losses)
    return losses

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(x_tr), batch)
    step(model, optimizer, x_tr[idx], y_tr[idx], ink_tr[idx])

  logits, ink_pred = model(jnp.asarray(x_te))
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y_te))
  rmse = float(jnp.sqrt(jnp.mean((ink_pred - ink_te) ** 2)))
  return accuracy, rmse


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  data = load_data(args.seed)
  x_tr, _, _, _, ink_tr, _ = data
  initial = jnp.array([np.log(10.0), float(np.mean(ink_tr ** 2))])
  txs = methods(initial)

  print(f"{len(x_tr)} training images, tasks: digit class (CE), ink (MSE)")
  rows = []
  for name, tx in tqdm(txs.items(), desc="methods"):
    start = time.perf_counter()
    accuracy, rmse = train(tx, data, args.steps, args.batch, args.seed)
    rows.append((name, accuracy, rmse, time.perf_counter() - start))
  print(f"\n{'method':<18}{'class accuracy':>16}{'ink RMSE':>10}{'seconds':>9}")
  for name, accuracy, rmse, seconds in rows:
    print(f"{name:<18}{accuracy:>16.3f}{rmse:>10.1f}{seconds:>9.1f}")


if __name__ == "__main__":
  main()
