"""Multi-digits: two handwritten digits side by side, three tasks on different scales.

Images are scikit-learn's 8x8 handwritten digits (1,797 images, pixel values
scaled to [0, 1]), split once into 1,200 training and 597 test images (fixed
by ``--data-seed``); pairs of images from the same split are placed side by
side into 8x16 inputs (8,192 training pairs, 2,048 test pairs). Tasks:

* ``left``: class of the left digit (cross-entropy; metric: accuracy),
* ``right``: class of the right digit (cross-entropy; metric: accuracy),
* ``sum``: 100 * (left + right), a regression in [0, 1800] with squared error
  (metric: RMSE) -- its loss starts about 10^5 times larger than the others.

The network is a Flax NNX MLP: a shared trunk 128 -> 128 -> 64 (ReLU) and one
linear head per task. Every method of ``benchmarks/methods.py`` trains it with
Adam (learning rate 1e-3, batches of 128), all steps in ``lax.scan``, the
seeds (different initialisations) under ``jax.vmap``. As a reference, static
weights 1/E[L_t(0)] (the expected loss of an uninformed predictor: log 10 for
the classes, E[target^2] for the sum) are added. ``update`` receives
``losses`` and ``kpis`` (per-task batch scores in (0, 1]: the two accuracies
and the fraction of sums within 50 of the target, i.e. rounded correctly).

Single-task baselines train the same architecture on one task's loss alone
(``mtl.weighted`` with a one-hot weight vector: the other heads receive no
gradient, so this is one network per task). Reported per method: test
accuracy (left, right), test RMSE (sum) and

  Delta m % = 1/T sum_t (-1)^{l_t} (M_t - M_STL,t) / M_STL,t * 100,

l_t = 1 when higher is better (Maninis et al. 2019): the average relative loss
of performance against single-task learning, lower is better (negative: the
multi-task network beats the single-task ones on average). Mean ± std over
seeds; the baselines are averaged over the same seeds.

Usage::

  python benchmarks/multidigits.py --quick    # 2 seeds, 400 steps
  python benchmarks/multidigits.py            # 3 seeds, 3,000 steps
  python benchmarks/multidigits.py --merge --methods "layerwise gradvac"
      # rerun one method, keep the others' results from the last full run

References:
  Maninis, Radosavovic, Kokkinos. Attentive Single-Tasking of Multiple Tasks.
  CVPR 2019 (the Delta m metric).
  Alpaydin, Kaynak. Optical Recognition of Handwritten Digits. UCI, 1998.
"""

from __future__ import annotations

import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (sets sys.path and the Agg backend)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import methods as methods_lib  # noqa: E402
import optax_mtl as mtl  # noqa: E402

TASKS = ("left", "right", "sum")
METRICS = ("accuracy", "accuracy", "RMSE")
HIGHER_IS_BETTER = np.array([True, True, False])
NUM_TRAIN_IMAGES = 1200
NUM_TRAIN_PAIRS, NUM_TEST_PAIRS, BATCH = 8192, 2048, 128
SUM_SCALE = 100.0
LEARNING_RATE = 1e-3


class Net(nnx.Module):
  """Shared MLP trunk with one head per task."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden1 = nnx.Linear(128, 128, rngs=rngs)
    self.hidden2 = nnx.Linear(128, 64, rngs=rngs)
    self.left = nnx.Linear(64, 10, rngs=rngs)
    self.right = nnx.Linear(64, 10, rngs=rngs)
    self.sum = nnx.Linear(64, 1, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.relu(self.hidden1(x))
    h = jax.nn.relu(self.hidden2(h))
    return self.left(h), self.right(h), self.sum(h)[:, 0]


def make_data(seed: int):
  """((x_train, labels_train), (x_test, labels_test)); labels [N, 2] ints."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)
  labels = digits.target.astype(np.int32)
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(images))
  train_idx, test_idx = order[:NUM_TRAIN_IMAGES], order[NUM_TRAIN_IMAGES:]

  def pairs(idx, n):
    a = rng.choice(idx, n)
    b = rng.choice(idx, n)
    x = np.concatenate([images[a], images[b]], axis=2).reshape(n, 128)
    return x, np.stack([labels[a], labels[b]], axis=1)

  return pairs(train_idx, NUM_TRAIN_PAIRS), pairs(test_idx, NUM_TEST_PAIRS)


def outputs_and_targets(graphdef, params, x, labels):
  left, right, total = nnx.merge(graphdef, params)(x)
  target = SUM_SCALE * (labels[:, 0] + labels[:, 1]).astype(jnp.float32)
  return left, right, total, target


def task_losses(graphdef, params, x, labels):
  """Losses f32[3] and KPIs f32[3] in (0, 1] (aux) on one batch."""
  left, right, total, target = outputs_and_targets(graphdef, params, x, labels)
  ce = optax.softmax_cross_entropy_with_integer_labels
  losses = jnp.stack([ce(left, labels[:, 0]).mean(),
                      ce(right, labels[:, 1]).mean(),
                      jnp.mean((total - target) ** 2)])
  kpis = jnp.stack([jnp.mean(jnp.argmax(left, -1) == labels[:, 0]),
                    jnp.mean(jnp.argmax(right, -1) == labels[:, 1]),
                    jnp.mean(jnp.abs(total - target) < SUM_SCALE / 2)])
  # KPIs are scores in (0, 1]: keep them off zero for methods that take logs.
  return losses, jax.lax.stop_gradient(jnp.clip(kpis, 1e-3, 1.0))


def evaluate(graphdef, params, x, labels):
  """Test metrics f32[3]: accuracy left, accuracy right, RMSE of the sum."""
  left, right, total, target = outputs_and_targets(graphdef, params, x, labels)
  return jnp.stack([jnp.mean(jnp.argmax(left, -1) == labels[:, 0]),
                    jnp.mean(jnp.argmax(right, -1) == labels[:, 1]),
                    jnp.sqrt(jnp.mean((total - target) ** 2))])


# The trunk: the leaves every task's gradient reaches, where tasks can conflict.
TRUNK = {"hidden1": True, "hidden2": True, "left": False, "right": False, "sum": False}
RECORD_EVERY = 50
PAIRS = ((0, 1), (0, 2), (1, 2))  # the order of jnp.triu_indices(3, k=1)


def make_train(make_tx, graphdef, steps: int, record: bool = False):
  """Jitted ``(params [S], batches, *tx_args) -> params [S]``.

  ``make_tx(*tx_args)`` builds the method inside the program, so a traced
  argument (the single-task one-hot weights) reuses one compilation. With
  ``record``, it returns ``(params, conflict)`` too: every ``RECORD_EVERY``
  steps, the pairwise cosines [3] (left-right, left-sum, right-sum) and the
  norm ratio of the trunk's task gradients along the method's trajectory.
  """
  jac = mtl.value_and_jacobian(functools.partial(task_losses, graphdef),
                               has_aux=True)

  def one(params, batches, *tx_args):
    tx = optax.chain(make_tx(*tx_args), optax.adam(LEARNING_RATE))
    x_b, y_b = batches

    def step(carry, i):
      params, state = carry
      j = i % x_b.shape[0]
      (losses, kpis), task_grads = jac(params, x_b[j], y_b[j])
      updates, state = tx.update(task_grads, state, params, losses=losses,
                                 kpis=kpis)
      out = None
      if record:
        d = mtl.conflict_diagnostics(task_grads, shared=TRUNK)
        rows, cols = jnp.triu_indices(len(TASKS), k=1)
        out = (d.task_cosines[rows, cols], d.norm_ratio)
      return (optax.apply_updates(params, updates), state), out

    (params, _), conflict = jax.lax.scan(step, (params, tx.init(params)),
                                         jnp.arange(steps))
    if not record:
      return params
    cosines, ratio = conflict
    return params, (cosines[::RECORD_EVERY], ratio[::RECORD_EVERY])

  return one


def delta_m(metrics: np.ndarray, stl: np.ndarray) -> np.ndarray:
  """Delta m % of metrics [..., T] against single-task metrics [T]."""
  sign = np.where(HIGHER_IS_BETTER, -1.0, 1.0)
  return np.mean(sign * (metrics - stl) / stl, axis=-1) * 100.0


def plot(rows: dict, stl: dict, path: str) -> None:
  import matplotlib.pyplot as plt
  labels = list(rows)
  fig, axes = plt.subplots(1, 4, figsize=(3.0 * 4 + max(0, len(labels) - 4) * 0.4, 3.4))
  y = np.arange(len(labels))
  panels = [(f"{t} {m}", i) for i, (t, m) in enumerate(zip(TASKS, METRICS))]
  for ax, (title, i) in zip(axes[:3], panels):
    mean = [rows[l]["metrics"][i] for l in labels]
    std = [rows[l]["metrics_std"][i] for l in labels]
    ax.barh(y, mean, xerr=std, color="tab:blue")
    ax.axvline(stl["metrics"][i], color="red", ls="--", label="single-task")
    ax.set_title(title, fontsize=9)
    ax.set_yticks(y, labels, fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    ax.invert_yaxis()
  axes[0].legend(fontsize=6)
  dm = [rows[l]["delta_m"] for l in labels]
  dm_std = [rows[l]["delta_m_std"] for l in labels]
  axes[3].barh(y, dm, xerr=dm_std,
               color=["tab:green" if v <= 0 else "tab:orange" for v in dm])
  axes[3].axvline(0.0, color="k", lw=0.8)
  axes[3].set_title("Delta m % (lower is better)", fontsize=9)
  axes[3].set_yticks(y, labels, fontsize=7)
  axes[3].tick_params(axis="x", labelsize=7)
  axes[3].invert_yaxis()
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


# Methods whose trajectories the conflict plot shows (when they ran).
CONFLICT_PLOT = ("sum", "initial loss", "normalize", "mgda-l2", "pcgrad", "upgrad")


def conflict_summary(rows: dict) -> str:
  """Markdown: the trunk's gradient cosines and norm ratio, first and last record."""
  header = ["method", "norm ratio (start)", "norm ratio (end)"] + [
      f"cos {pair} (start / end)" for pair in next(iter(rows.values()))["conflict"]["cosines"]]
  table = []
  for label, r in rows.items():
    c = r["conflict"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3g}"
    table.append([label, fmt(c["norm_ratio"][0]), fmt(c["norm_ratio"][-1])] + [
        f"{fmt(v[0])} / {fmt(v[-1])}" for v in c["cosines"].values()])
  return ("\n## Conflict between the tasks' trunk gradients\n\nSeed means of "
          "`mtl.conflict_diagnostics` of the trunk's task gradients along each "
          "method's trajectory, at the first step and the last record.\n\n"
          + common.markdown_table(header, table) + "\n")


def plot_conflict(rows: dict, path: str) -> None:
  import matplotlib.pyplot as plt
  shown = [l for l in CONFLICT_PLOT if l in rows] or list(rows)[:6]
  pairs = list(next(iter(rows.values()))["conflict"]["cosines"])
  fig, axes = plt.subplots(1, len(pairs) + 1, figsize=(3.2 * (len(pairs) + 1), 3.0))
  for label in shown:
    c = rows[label]["conflict"]
    nan = lambda xs: [np.nan if v is None else v for v in xs]
    for ax, pair in zip(axes, pairs):
      ax.plot(c["steps"], nan(c["cosines"][pair]), label=label, lw=1)
    axes[-1].plot(c["steps"], nan(c["norm_ratio"]), label=label, lw=1)
  for ax, pair in zip(axes, pairs):
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_title(f"cosine {pair}", fontsize=9)
  axes[-1].set_yscale("log")
  axes[-1].set_title("norm ratio (largest / smallest)", fontsize=9)
  for ax in axes:
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
  axes[0].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def merge(path, settings, stl_metrics, results, skipped, order):
  """The results of an earlier run with these settings, updated with ``results``.

  Raises:
    SystemExit: no earlier results file, other settings, or single-task
      baselines that differ (then the earlier methods are not comparable).
  """
  if not os.path.exists(path):
    raise SystemExit(f"--merge: no earlier results at {path}; run without --merge.")
  with open(path) as f:
    earlier = json.load(f)
  old = {k: earlier["settings"].get(k) for k in settings}
  if old != settings:
    raise SystemExit(f"--merge: {path} was made with {old}, this run uses "
                     f"{settings}; rerun every method without --merge.")
  if not np.allclose(earlier["single_task"]["metrics"], stl_metrics, rtol=1e-4):
    raise SystemExit("--merge: the single-task baselines differ from the earlier "
                     "run's (another JAX version or machine?); rerun every method "
                     "without --merge.")
  combined = {**earlier["results"], **results}
  dropped = {**earlier.get("skipped", {}), **skipped}
  for label in results:
    dropped.pop(label, None)
  rank = {label: i for i, label in enumerate(order)}
  ordered = dict(sorted(combined.items(), key=lambda kv: rank.get(kv[0], len(rank))))
  return ordered, {k: v for k, v in dropped.items() if k not in ordered}


def run(argv=None) -> dict:
  p = common.parser(__doc__.splitlines()[0], steps=3_000, seeds=3)
  p.add_argument("--data-seed", type=int, default=0)
  p.add_argument("--merge", action="store_true",
                 help="keep the other methods' results from the existing results "
                      "file (same settings) and rerun only --methods")
  args = p.parse_args(argv)
  steps = common.positive("steps", args.steps or (400 if args.quick else 3_000))
  seeds = common.positive("seeds", args.seeds or (2 if args.quick else 3))
  num_tasks = len(TASKS)
  (x_tr, y_tr), (x_te, y_te) = make_data(args.data_seed)
  # Reference static weights: the inverse of each loss's expected value for an
  # uninformed predictor (log 10 for a 10-class cross-entropy, E[target^2]
  # for a zero-output regression), computed from the training labels.
  expected = np.array([np.log(10.0), np.log(10.0),
                       np.mean((SUM_SCALE * y_tr.sum(1)) ** 2)])
  inverse = 1.0 / expected
  static = methods_lib.Method(
      "static 1/E[L0]",
      lambda T: mtl.weighted(jnp.asarray(inverse / inverse.sum() * T, jnp.float32)))
  selected = methods_lib.select(methods_lib.METHODS + (static,), args.methods)

  num_batches = NUM_TRAIN_PAIRS // BATCH
  batches = (jnp.asarray(x_tr.reshape(num_batches, BATCH, 128)),
             jnp.asarray(y_tr.reshape(num_batches, BATCH, 2)))
  x_te, y_te = jnp.asarray(x_te), jnp.asarray(y_te)

  graphdef, _ = nnx.split(Net(nnx.Rngs(0)))
  states = [nnx.split(Net(nnx.Rngs(1000 + s)))[1] for s in range(seeds)]
  params = jax.tree.map(lambda *a: jnp.stack(a), *states)
  evaluate_all = jax.jit(jax.vmap(functools.partial(evaluate, graphdef),
                                  in_axes=(0, None, None)))

  copts = common.compiler_options(args)
  # Single-task baselines: one compiled program, vmapped over tasks and seeds.
  stl_train = make_train(lambda w: mtl.weighted(w), graphdef, steps)
  stl_train = jax.jit(jax.vmap(jax.vmap(stl_train, in_axes=(0, None, None)),
                               in_axes=(None, None, 0)))
  one_hot = jnp.eye(num_tasks, dtype=jnp.float32)
  with common.Timer() as t_stl_compile:
    stl_compiled = stl_train.lower(params, batches, one_hot).compile(copts)
  with common.Timer() as t_stl:
    stl_params = jax.block_until_ready(stl_compiled(params, batches, one_hot))
  # Task t's metric from the network trained on task t alone: [S, T].
  stl_seed = np.stack([
      np.asarray(evaluate_all(jax.tree.map(lambda a, t=t: a[t], stl_params),
                              x_te, y_te))[:, t] for t in range(num_tasks)],
                      axis=1).astype(np.float64)
  stl_metrics = stl_seed.mean(0)
  if not np.all(np.isfinite(stl_metrics)) or np.any(stl_metrics <= 0):
    raise RuntimeError(f"Single-task baselines failed: metrics {stl_metrics}.")

  results, skipped = {}, {}
  for method in common.progress(selected, "multidigits", args.no_progress):
    train = jax.jit(jax.vmap(make_train(lambda m=method: m.make(num_tasks),
                                        graphdef, steps, record=True),
                             in_axes=(0, None)))
    try:
      with common.Timer() as t_compile:
        compiled = train.lower(params, batches).compile(copts)
    except (ValueError, TypeError) as e:
      skipped[method.label] = common.method_error(e)
      continue
    with common.Timer() as t_run:
      trained, (cosines, ratio) = jax.block_until_ready(compiled(params, batches))
    cosines, ratio = np.asarray(cosines, np.float64), np.asarray(ratio, np.float64)
    metrics = np.asarray(evaluate_all(trained, x_te, y_te), np.float64)
    finite = np.all(np.isfinite(metrics), axis=1)
    dm = delta_m(metrics, stl_metrics)
    results[method.label] = {
        "metrics": [common.finite_or_none(v) for v in metrics.mean(0)],
        "metrics_std": [common.finite_or_none(v) for v in metrics.std(0)],
        "per_seed_metrics": [[common.finite_or_none(v) for v in r] for r in metrics],
        "delta_m": common.finite_or_none(dm.mean()),
        "delta_m_std": common.finite_or_none(dm.std()),
        "per_seed_delta_m": [common.finite_or_none(v) for v in dm],
        "diverged_seeds": int((~finite).sum()),
        "compile_seconds": t_compile.seconds,
        "run_seconds": t_run.seconds,
        # Seed means, every RECORD_EVERY steps, of the trunk's task gradients.
        "conflict": {
            "steps": list(range(0, steps, RECORD_EVERY)),
            # Curves for the figure: four significant digits are plenty.
            "cosines": {f"{TASKS[a]}-{TASKS[b]}": [common.significant(v) for v in
                                                   cosines[:, :, k].mean(0)]
                        for k, (a, b) in enumerate(PAIRS)},
            "norm_ratio": [common.significant(v) for v in ratio.mean(0)],
        },
    }

  stem = "multidigits_quick" if args.quick else "multidigits"
  settings = {"steps": steps, "seeds": seeds, "data_seed": args.data_seed,
              "quick": args.quick}
  if args.merge:
    results, skipped = merge(os.path.join(args.out, stem + ".json"), settings,
                             stl_metrics, results, skipped,
                             [m.label for m in methods_lib.METHODS + (static,)])
  stl = {"metrics": stl_metrics.tolist(), "metrics_std": stl_seed.std(0).tolist(),
         "per_seed_metrics": stl_seed.tolist(),
         "compile_seconds": t_stl_compile.seconds,
         "run_seconds": t_stl.seconds}
  payload = {
      "benchmark": "multidigits",
      "settings": {"steps": steps, "seeds": seeds, "tasks": list(TASKS),
                   "metrics": list(METRICS),
                   "higher_is_better": HIGHER_IS_BETTER.tolist(),
                   "train_pairs": NUM_TRAIN_PAIRS, "test_pairs": NUM_TEST_PAIRS,
                   "train_images": NUM_TRAIN_IMAGES, "batch": BATCH,
                   "optimizer": "adam", "learning_rate": LEARNING_RATE,
                   "sum_scale": SUM_SCALE, "model": "MLP 128-128-64, 3 heads",
                   "data_seed": args.data_seed, "quick": args.quick,
                   "compiler_options": copts},
      "device": common.device_info(),
      "single_task": stl,
      "results": results,
      "skipped": skipped,
  }
  common.write_json(os.path.join(args.out, stem + ".json"), payload, compact=True)

  def pm(m, s, fmt):
    return "diverged" if m is None or s is None else f"{m:{fmt}} ± {s:{fmt}}"

  header = (["method"] + [f"{t} {m} {'↑' if h else '↓'}"
                          for t, m, h in zip(TASKS, METRICS, HIGHER_IS_BETTER)]
            + ["Delta m % ↓", "train s (all seeds)"])
  rows = [["single-task"] + [pm(m, s, ".3f" if h else ".1f") for m, s, h in
                             zip(stl["metrics"], stl["metrics_std"], HIGHER_IS_BETTER)]
          + ["0", f"{t_stl.seconds / num_tasks:.1f}"]]
  for label, r in results.items():
    rows.append([label] + [pm(m, s, ".3f" if h else ".1f") for m, s, h in
                           zip(r["metrics"], r["metrics_std"], HIGHER_IS_BETTER)]
                + [pm(r["delta_m"], r["delta_m_std"], ".2f"),
                   f"{r['run_seconds']:.1f}"])
  md = (f"# Multi-digits\n\nTest metrics, mean ± std over {seeds} seeds, after "
        f"{steps} Adam steps (lr {LEARNING_RATE}, batch {BATCH}); Delta m % "
        f"against the single-task networks (lower is better). "
        f"{common.device_line()}\n\n"
        + common.markdown_table(header, rows) + "\n")
  if skipped:
    md += "\nSkipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + "\n"
  if results:
    md += f"\n![metrics]({stem}.png)\n"
    plot(results, stl, os.path.join(args.out, stem + ".png"))
    md += conflict_summary(results)
    md += f"\n![conflict over training]({stem}_conflict.png)\n"
    plot_conflict(results, os.path.join(args.out, stem + "_conflict.png"))
  common.write_text(os.path.join(args.out, stem + ".md"), md)
  print(md)
  return payload


if __name__ == "__main__":
  run()
