"""The synthetic multi-task regression of GradNorm: tasks on very different scales.

Chen et al. (2018), section 4: T regression tasks onto

  f_t(x) = sigma_t tanh((B + eps_t) x),    x in R^250, f_t(x) in R^100,

with B (shared by every task) and eps_t (task-specific) constant matrices of
i.i.d. N(0, 10^2) and N(0, 3.5^2) entries, and the scales sigma_t setting how
large each task's loss is (default sigma = (1, 100): task 2's squared error is
10^4 times task 1's). Inputs are drawn i.i.d. from U(0, 1)^250 (10,000 for
training, 2,000 for test, fixed by ``--data-seed``). The network is the one of
the paper: a shared trunk of 4 fully connected ReLU layers of 100 units and
one affine head (100 -> 100) per task; each task's loss is its mean squared
error.

Every method of ``benchmarks/methods.py`` trains the same initialisations
(``--seeds`` of them, vmapped) with Adam (learning rate 1e-3, batches of 128
visited in a fixed shuffled order), all steps in ``lax.scan``. Reported: the test loss of
each task divided by sigma_t^2 (so that every task counts the same, as in the
paper), their sum, and the task weights over time for the methods whose state
has a ``task_weights`` field (normalised to sum to T; methods without one are
drawn as constant weights 1). The static weights 1/sigma_t^2 (which know the
scales in advance) are added as a reference.

Along every trajectory, the conflict between the tasks' gradients on the
shared trunk (``mtl.conflict_diagnostics``: the pairwise cosines and the ratio
of the largest to the smallest task-gradient norm) is read at every step from
the gradients the step computes anyway (T x T dot products over the trunk, no
extra backward pass). Reported: per method, the median of each cosine, the
fraction of steps where it is negative, and the median norm ratio (over every
step and seed), with the seed means of about ``CONFLICT_POINTS`` evenly spaced
steps in the JSON and ``gradnorm_synthetic_conflict.png``.

Usage::

  python benchmarks/gradnorm_synthetic.py             # 3,000 steps, 3 seeds
  python benchmarks/gradnorm_synthetic.py --quick     # 300 steps, 2 seeds
  python benchmarks/gradnorm_synthetic.py --sigmas 1,10,30,100

References:
  Chen, Badrinarayanan, Lee, Rabinovich. GradNorm: Gradient Normalization for
  Adaptive Loss Balancing in Deep Multitask Networks. ICML 2018.
"""

from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (sets sys.path and the Agg backend)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import methods as methods_lib  # noqa: E402
import optax_mtl as mtl  # noqa: E402

IN_DIM, OUT_DIM, WIDTH, DEPTH = 250, 100, 100, 4
NUM_TRAIN, NUM_TEST, BATCH = 10_000, 2_000, 128
LEARNING_RATE = 1e-3
NUM_RECORDS = 30
# The trunk: the leaves every task's gradient reaches, where tasks can conflict.
TRUNK = {"trunk": True, "heads": False}
CONFLICT_POINTS = 100  # steps of the conflict curves kept in the JSON
# Methods whose conflict curves the figure draws (when they ran); every
# method's medians are drawn beside them, and its curves are in the JSON.
CONFLICT_PLOT = ("sum", "static 1/sigma^2", "initial loss", "uncertainty",
                 "gradnorm", "normalize", "mgda", "pcgrad", "upgrad", "nash-mtl")


def make_data(sigmas: np.ndarray, seed: int):
  """Train/test inputs and stacked targets [N, T, OUT_DIM] (float32)."""
  rng = np.random.default_rng(seed)
  b = rng.normal(0.0, 10.0, (IN_DIM, OUT_DIM))
  eps = rng.normal(0.0, 3.5, (len(sigmas), IN_DIM, OUT_DIM))
  x = rng.uniform(0.0, 1.0, (NUM_TRAIN + NUM_TEST, IN_DIM))  # i.i.d.: already shuffled
  y = sigmas[None, :, None] * np.tanh(np.einsum("ni,tio->nto", x, b + eps))
  x, y = x.astype(np.float32), y.astype(np.float32)
  return (x[:NUM_TRAIN], y[:NUM_TRAIN]), (x[NUM_TRAIN:], y[NUM_TRAIN:])


def init_params(key: jax.Array, num_tasks: int) -> dict:
  """He-initialised trunk and heads (plain pytree)."""
  keys = jax.random.split(key, DEPTH + 1)
  trunk, fan_in = [], IN_DIM
  for k in keys[:DEPTH]:
    w = jax.random.normal(k, (fan_in, WIDTH)) * jnp.sqrt(2.0 / fan_in)
    trunk.append({"w": w, "b": jnp.zeros(WIDTH)})
    fan_in = WIDTH
  heads = {"w": jax.random.normal(keys[DEPTH], (num_tasks, WIDTH, OUT_DIM))
                * jnp.sqrt(1.0 / WIDTH),
           "b": jnp.zeros((num_tasks, OUT_DIM))}
  return {"trunk": trunk, "heads": heads}


def predict(params: dict, x: jax.Array) -> jax.Array:
  """Predictions [N, T, OUT_DIM]."""
  h = x
  for layer in params["trunk"]:
    h = jax.nn.relu(h @ layer["w"] + layer["b"][None])
  return (jnp.einsum("nh,tho->nto", h, params["heads"]["w"])
          + params["heads"]["b"][None])


def task_losses(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean squared error of each task: f32[T]."""
  return jnp.mean((predict(params, x) - y) ** 2, axis=(0, 2))


def pair_names(num_tasks: int) -> list[str]:
  """``"s-t"`` (tasks from 1) for every pair s < t, in ``jnp.triu_indices`` order."""
  rows, cols = np.triu_indices(num_tasks, k=1)
  return [f"{a + 1}-{b + 1}" for a, b in zip(rows, cols)]


def make_run(method_tx, num_tasks: int, steps: int, sigmas):
  """Jitted ``(params [S], data) -> (curve, weights, final, (cosines, ratio))``.

  ``params`` holds one initialisation per seed (leading axis S); ``data`` is
  ``((x_batches [NB, B, IN], y_batches [NB, B, T, OUT]), (x_test, y_test))``
  and step i trains on batch i mod NB. The data travel as arguments and the
  initialisation is done outside: both keep the compiled program small
  (closed-over arrays become constants, which makes compilation slow).

  Returns the test curve [S, R, T], the weights [S, R, T] (both every
  ``every`` steps), the final test losses [S, T], and the trunk's conflict at
  every step: pairwise cosines [S, steps, T (T - 1) / 2] and norm ratio
  [S, steps], read from the gradients of that step before its update.
  """
  tx = optax.chain(method_tx, optax.adam(LEARNING_RATE))
  jac = mtl.value_and_jacobian(task_losses)
  norm = np.asarray(sigmas, np.float32) ** 2
  every = max(1, steps // NUM_RECORDS)
  records, rest = divmod(steps, every)

  def weights_of(state):
    w = common.task_weights(state)
    if w is None or w.shape != (num_tasks,):
      return jnp.ones(num_tasks)
    return w * num_tasks / jnp.sum(w)

  rows, cols = np.triu_indices(num_tasks, k=1)

  def step(data, carry, i):
    x_b, y_b = data[0]
    params, state = carry
    j = i % x_b.shape[0]
    losses, task_grads = jac(params, x_b[j], y_b[j])
    d = mtl.conflict_diagnostics(task_grads, shared=TRUNK)
    updates, state = tx.update(task_grads, state, params, losses=losses)
    return ((optax.apply_updates(params, updates), state),
            (d.task_cosines[rows, cols], d.norm_ratio))

  def chunk(data, carry, i):
    carry, conflict = jax.lax.scan(functools.partial(step, data), carry,
                                   i * every + jnp.arange(every))
    test_loss = task_losses(carry[0], *data[1]) / norm
    return carry, (test_loss, weights_of(carry[1]), conflict)

  def one(params, data):
    carry = (params, tx.init(params))
    carry, (curve, weights, conflict) = jax.lax.scan(
        functools.partial(chunk, data), carry, jnp.arange(records))
    # [records, every, ...] -> [records * every, ...]: one entry per step.
    conflict = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), conflict)
    if rest:  # static: only compiled when steps is not a multiple of every
      carry, tail = jax.lax.scan(functools.partial(step, data), carry,
                                 records * every + jnp.arange(rest))
      conflict = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), conflict, tail)
    final = task_losses(carry[0], *data[1]) / norm
    return curve, weights, final, conflict

  return jax.jit(jax.vmap(one, in_axes=(0, None))), every


def plot(results: dict, sigmas, every: int, path: str, cols: int = 4) -> None:
  """Test-loss curves per task, then the weights of each method that logs them."""
  import matplotlib.pyplot as plt
  labels = list(results)
  num_tasks = len(sigmas)
  learned = [l for l in labels if results[l]["has_task_weights"]]
  loss_rows = -(-num_tasks // cols)
  weight_rows = -(-len(learned) // cols)
  fig, axes = plt.subplots(loss_rows + weight_rows, cols, squeeze=False,
                           figsize=(3.4 * cols, 2.9 * (loss_rows + weight_rows)))
  for ax in axes.ravel():
    ax.axis("off")
  colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(labels), 2)))
  for t in range(num_tasks):
    ax = axes[t // cols, t % cols]
    ax.axis("on")
    for label, color in zip(labels, colors):
      c = np.asarray(results[label]["curve_mean"], dtype=np.float64)[:, t]
      x = every * np.arange(1, len(c) + 1)
      ax.plot(x, c, label=label, lw=1.0, color=color)
    ax.set_yscale("log")
    ax.set_title(f"task {t + 1} (sigma={sigmas[t]:g}): test loss / sigma^2",
                 fontsize=8)
    ax.set_xlabel("step", fontsize=7)
    ax.tick_params(labelsize=7)
  # The legend goes in the first free panel of the loss rows, or on the plot.
  spare = num_tasks if num_tasks < loss_rows * cols else None
  handles, names = axes[0, 0].get_legend_handles_labels()
  if spare is not None:
    axes[spare // cols, spare % cols].legend(handles, names, fontsize=6, ncol=2,
                                             loc="center")
  else:
    axes[0, 0].legend(fontsize=6)
  for i, label in enumerate(learned):
    ax = axes[loss_rows + i // cols, i % cols]
    ax.axis("on")
    w = np.asarray(results[label]["weights_mean"], dtype=np.float64)
    x = every * np.arange(1, len(w) + 1)
    for t in range(num_tasks):
      ax.plot(x, w[:, t], lw=1.2, label=f"task {t + 1}")
    ax.set_title(f"{label}: task_weights (sum T)", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("step", fontsize=7)
    ax.tick_params(labelsize=7)
    if i == 0:
      ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def conflict_record(cosines: np.ndarray, ratio: np.ndarray, names: list[str]) -> dict:
  """One method's conflict: medians over every step and seed, curves subsampled.

  Args:
    cosines: [S, steps, P] pairwise cosines of the trunk's task gradients.
    ratio: [S, steps] their norm ratio (largest / smallest).
    names: the P pair names.

  Returns:
    A JSON-ready dict: the seed means at about ``CONFLICT_POINTS`` evenly
    spaced steps (4 significant digits), and per pair the median cosine and
    the fraction of (step, seed) entries where it is negative, with the median
    norm ratio over all steps and over the last tenth of them.
  """
  steps = cosines.shape[1]
  kept = np.arange(0, steps, -(-steps // CONFLICT_POINTS))
  tail = ratio[:, steps - max(1, steps // 10):]
  return {
      "steps": kept.tolist(),
      "cosines": {n: [common.significant(v) for v in cosines[:, kept, k].mean(0)]
                  for k, n in enumerate(names)},
      "norm_ratio": [common.significant(v) for v in ratio[:, kept].mean(0)],
      "median_cosine": {n: common.finite_or_none(np.median(cosines[..., k]))
                        for k, n in enumerate(names)},
      "conflict_fraction": {n: float(np.mean(cosines[..., k] < 0))
                            for k, n in enumerate(names)},
      "median_norm_ratio": common.finite_or_none(np.median(ratio)),
      "median_norm_ratio_last_tenth": common.finite_or_none(np.median(tail)),
  }


def conflict_summary(results: dict, steps: int, seeds: int) -> str:
  """Markdown: each method's medians of the trunk's cosines and norm ratio."""
  names = list(next(iter(results.values()))["conflict"]["cosines"])
  header = (["method"]
            + [h for n in names for h in (f"median cos {n}", f"cos {n} < 0")]
            + ["median norm ratio", "median norm ratio, last 10%"])
  fmt = lambda v: "n/a" if v is None else f"{v:.3g}"
  rows = []
  for label, r in results.items():
    c = r["conflict"]
    rows.append([label]
                + [cell for n in names for cell in (
                    fmt(c["median_cosine"][n]), f"{100 * c['conflict_fraction'][n]:.0f}%")]
                + [fmt(c["median_norm_ratio"]), fmt(c["median_norm_ratio_last_tenth"])])
  return ("\n## Conflict between the tasks' trunk gradients\n\n"
          "`mtl.conflict_diagnostics` of the task gradients on the shared trunk, "
          "read at every step before the method combines them: median of each "
          "pairwise cosine, share of steps where it is negative, and median of "
          "the ratio of the largest to the smallest task-gradient norm, over "
          f"all {steps} steps and {seeds} seeds (last 10%: the final "
          f"{max(1, steps // 10)} steps).\n\n"
          + common.markdown_table(header, rows) + "\n")


def plot_conflict(results: dict, path: str) -> None:
  """Conflict curves of a selection of methods, and every method's medians."""
  import matplotlib.pyplot as plt
  labels = list(results)
  names = list(results[labels[0]]["conflict"]["cosines"])
  shown = [l for l in CONFLICT_PLOT if l in results] or labels[:10]
  cols = len(names) + 1
  bar_height = max(3.0, 0.13 * len(labels))
  fig, axes = plt.subplots(2, cols, squeeze=False,
                           figsize=(3.8 * cols, 3.2 + bar_height),
                           gridspec_kw={"height_ratios": [3.2, bar_height]})
  nan = lambda xs: np.asarray([np.nan if v is None else v for v in xs], np.float64)
  colors = plt.get_cmap("tab10")(np.arange(len(shown)) % 10)
  for label, color in zip(shown, colors):
    c = results[label]["conflict"]
    for ax, n in zip(axes[0], names):
      ax.plot(c["steps"], nan(c["cosines"][n]), label=label, lw=1.0, color=color)
    axes[0, -1].plot(c["steps"], nan(c["norm_ratio"]), label=label, lw=1.0,
                     color=color)
  for ax, n in zip(axes[0], names):
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_title(f"cosine of tasks {n} (trunk, seed mean)", fontsize=8)
  axes[0, -1].set_yscale("log")
  axes[0, -1].set_title("norm ratio (largest / smallest)", fontsize=8)
  for ax in axes[0]:
    ax.set_xlabel("step", fontsize=7)
    ax.tick_params(labelsize=7)
  axes[0, 0].legend(fontsize=6, ncol=2)
  y = np.arange(len(labels))
  for ax, n in zip(axes[1], names):
    med = nan([results[l]["conflict"]["median_cosine"][n] for l in labels])
    ax.barh(y, med, color=["tab:red" if v < 0 else "tab:blue" for v in med])
    for yi, l in zip(y, labels):
      frac = results[l]["conflict"]["conflict_fraction"][n]
      ax.annotate(f"{100 * frac:.0f}% < 0", (0.99, yi),
                  xycoords=("axes fraction", "data"), ha="right", va="center",
                  fontsize=6)
    ax.axvline(0.0, color="k", lw=0.6)
    ax.set_title(f"median cosine {n} (share of steps < 0)", fontsize=8)
  med = nan([results[l]["conflict"]["median_norm_ratio"] for l in labels])
  axes[1, -1].barh(y, med, color="tab:gray")
  axes[1, -1].set_xscale("log")
  axes[1, -1].set_xlim(left=1.0)  # the ratio is >= 1: bars start there
  axes[1, -1].set_title("median norm ratio", fontsize=8)
  for ax in axes[1]:
    ax.set_yticks(y, labels, fontsize=6)
    ax.tick_params(axis="x", labelsize=7)
    ax.invert_yaxis()
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def run(argv=None) -> dict:
  p = common.parser(__doc__.splitlines()[0], steps=3_000, seeds=3)
  p.add_argument("--sigmas", type=str, default="1,100",
                 help="comma-separated task scales sigma_t (T = their number)")
  p.add_argument("--data-seed", type=int, default=0)
  args = p.parse_args(argv)
  steps = common.positive("steps", args.steps or (300 if args.quick else 3_000))
  seeds = common.positive("seeds", args.seeds or (2 if args.quick else 3))
  try:
    sigmas = np.asarray([float(s) for s in args.sigmas.split(",")], np.float32)
  except ValueError:
    raise ValueError(f"--sigmas must be comma-separated numbers, got {args.sigmas!r}.")
  if sigmas.size < 2 or not np.all(sigmas > 0) or not np.all(np.isfinite(sigmas)):
    raise ValueError(f"--sigmas needs at least two positive finite scales, got {args.sigmas!r}.")
  num_tasks = int(sigmas.size)
  inverse = 1.0 / sigmas.astype(np.float64) ** 2
  oracle = methods_lib.Method(
      "static 1/sigma^2",
      lambda T: mtl.weighted(jnp.asarray(inverse / inverse.sum() * T, jnp.float32)))
  selected = methods_lib.select(methods_lib.METHODS + (oracle,), args.methods)
  (x_tr, y_tr), test = make_data(sigmas, args.data_seed)
  num_batches = NUM_TRAIN // BATCH
  batches = (x_tr[:num_batches * BATCH].reshape(num_batches, BATCH, IN_DIM),
             y_tr[:num_batches * BATCH].reshape(num_batches, BATCH, num_tasks,
                                                OUT_DIM))
  data = jax.tree.map(jnp.asarray, (batches, test))
  keys = jax.random.split(jax.random.key(0), seeds)
  params = jax.jit(jax.vmap(lambda k: init_params(k, num_tasks)))(keys)
  params0 = jax.tree.map(lambda a: a[0], params)

  copts = common.compiler_options(args)
  names = pair_names(num_tasks)
  results, skipped, every = {}, {}, 1
  for method in common.progress(selected, "gradnorm_synthetic", args.no_progress):
    if method.needs_kpis:
      skipped[method.label] = "needs kpis (this benchmark has none)"
      continue
    try:
      with common.Timer() as t_compile:
        tx = method.make(num_tasks)
        fn, every = make_run(tx, num_tasks, steps, sigmas)
        compiled = fn.lower(params, data).compile(copts)
    except (ValueError, TypeError) as e:
      skipped[method.label] = common.method_error(e)
      continue
    with common.Timer() as t_run:
      curve, weights, final, (cosines, ratio) = jax.block_until_ready(
          compiled(params, data))
    has_weights = common.has_task_weights(jax.eval_shape(tx.init, params0))
    final = np.asarray(final, np.float64)
    total = final.sum(axis=1)
    results[method.label] = {
        "test_loss_over_sigma2": [common.finite_or_none(v) for v in final.mean(0)],
        "test_loss_over_sigma2_std": [common.finite_or_none(v) for v in final.std(0)],
        "sum": common.finite_or_none(total.mean()),
        "sum_std": common.finite_or_none(total.std()),
        "per_seed_sum": [common.finite_or_none(v) for v in total],
        "has_task_weights": has_weights,
        "final_weights": [common.finite_or_none(v)
                          for v in np.asarray(weights)[:, -1].mean(0)],
        "curve_mean": [[common.significant(v, 6) for v in r]
                       for r in np.asarray(curve, np.float64).mean(0)],
        "weights_mean": [[common.significant(v, 6) for v in r]
                         for r in np.asarray(weights, np.float64).mean(0)],
        "compile_seconds": t_compile.seconds,
        "run_seconds": t_run.seconds,
        "conflict": conflict_record(np.asarray(cosines, np.float64),
                                    np.asarray(ratio, np.float64), names),
    }

  payload = {
      "benchmark": "gradnorm_synthetic",
      "settings": {"steps": steps, "seeds": seeds, "sigmas": sigmas.tolist(),
                   "in_dim": IN_DIM, "out_dim": OUT_DIM, "width": WIDTH,
                   "depth": DEPTH, "num_train": NUM_TRAIN, "num_test": NUM_TEST,
                   "batch": BATCH, "optimizer": "adam",
                   "learning_rate": LEARNING_RATE, "record_every": every,
                   "data_seed": args.data_seed, "quick": args.quick,
                   "compiler_options": copts},
      "device": common.device_info(),
      "results": results,
      "skipped": skipped,
  }
  stem = "gradnorm_synthetic_quick" if args.quick else "gradnorm_synthetic"
  common.write_json(os.path.join(args.out, stem + ".json"), payload, compact=True)
  header = (["method"]
            + [f"task {t + 1} (sigma {s:g})" for t, s in enumerate(sigmas)]
            + ["sum", "final weights", "run s"])
  rows = []
  for label, r in results.items():
    cells = [f"{m:.4g} ± {s:.2g}" if m is not None and s is not None else "diverged"
             for m, s in zip(r["test_loss_over_sigma2"], r["test_loss_over_sigma2_std"])]
    total = (f"{r['sum']:.4g} ± {r['sum_std']:.2g}"
             if r["sum"] is not None and r["sum_std"] is not None else "diverged")
    fw = (", ".join(f"{w:.3g}" for w in r["final_weights"] if w is not None)
          if r["has_task_weights"] else "fixed")
    rows.append([label] + cells + [total, fw, r["run_seconds"]])
  md = (f"# GradNorm synthetic regression\n\nTest loss of each task divided by "
        f"sigma_t^2 (lower is better), mean ± std over {seeds} seeds, after "
        f"{steps} Adam steps (lr {LEARNING_RATE}, batch {BATCH}); final weights "
        f"normalised to sum to T. {common.device_line()}\n\n"
        + common.markdown_table(header, rows) + "\n")
  if skipped:
    md += "\nSkipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + "\n"
  if results:
    md += f"\n![test losses and weights]({stem}.png)\n"
    plot(results, sigmas.tolist(), every, os.path.join(args.out, stem + ".png"))
    md += conflict_summary(results, steps, seeds)
    md += f"\n![conflict over training]({stem}_conflict.png)\n"
    plot_conflict(results, os.path.join(args.out, stem + "_conflict.png"))
  common.write_text(os.path.join(args.out, stem + ".md"), md)
  print(md)
  return payload


if __name__ == "__main__":
  run()
