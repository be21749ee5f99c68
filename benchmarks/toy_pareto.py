"""Two-objective toy problem: which methods reach the Pareto set, from where.

The problem of Liu et al. (2021, CAGrad), Navon et al. (2022, Nash-MTL) and
Liu et al. (2023, FAMO). With x = (x1, x2)::

  c1 = max(tanh(x2/2), 0)           c2 = max(tanh(-x2/2), 0)
  f1 = log(max(|0.5(-x1-7) - tanh(-x2)|, 5e-6)) + 6
  f2 = log(max(|0.5(-x1+3) + tanh(-x2) + 2|, 5e-6)) + 6
  g1 = ((-x1+7)^2 + 0.1(-x2-8)^2)/10 - 20
  g2 = ((-x1-7)^2 + 0.1(-x2-8)^2)/10 - 20
  L1 = c1 f1 + c2 g1                L2 = c1 f2 + c2 g2

As in Navon et al. (2022), L1 is multiplied by 0.1 (the two losses then have
different scales), each method starts from (-8.5, 7.5), (0, 0), (9, 9),
(-7.5, -0.5) and (9, -1) and runs Adam (learning rate 1e-3) for 35,000 steps.
The Pareto set is usually quoted as x2 = -8.3552, x1 in [-7, 7]; exactly, it
is a slightly curved arc: in the region x2 < 0 both losses are
tanh(-x2/2) (q_t(x1) + 0.01 (x2+8)^2 - 20), so minimising w L1 + (1-w) L2
gives x1 = 7(2w - 1) and x2 = argmin tanh(-x2/2) (19.6 w(1-w) + 0.01 (x2+8)^2
- 20), which runs from -8.3551 at x1 = 0 to -8.4345 at x1 = +-7. The
benchmark measures distances to that exact arc (computed on a fine grid).

Reported per method and start: the final point, its Euclidean distance to the
Pareto set, and ``reached`` = distance < ``--tol`` (default 0.05: fifty Adam
steps of size 1e-3; the runs that converge end within about 0.005 of the arc,
the runs that stall stay more than 1 away). The five starts run together under
``jax.vmap``; the steps run in ``lax.scan``. The figure draws about 350 points
of each trajectory; the JSON keeps 36 of them, evenly spaced (their steps are
``settings["trajectory_steps"]``).

Usage::

  python benchmarks/toy_pareto.py            # 35,000 steps, every method
  python benchmarks/toy_pareto.py --quick    # 3,000 steps

References:
  Liu, Liu, Jin, Stone, Liu. Conflict-Averse Gradient Descent for Multi-task
  Learning. NeurIPS 2021.
  Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya. Multi-Task
  Learning as a Bargaining Game. ICML 2022.
  Liu, Liang, Gu, Stone, Liu. FAMO: Fast Adaptive Multitask Optimization.
  NeurIPS 2023.
"""

from __future__ import annotations

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

STARTS = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))
PARETO_X2_CENTER = -8.3551  # x2 of the Pareto set at x1 = 0
PARETO_X2_ENDS = -8.4345  # and at x1 = +-7
PARETO_X1 = (-7.0, 7.0)
L1_SCALE = 0.1
LEARNING_RATE = 1e-3
NUM_RECORDS = 350  # trajectory points per start drawn in the figure
JSON_POINTS = 36  # of them, evenly spaced, saved per start in the JSON


def toy_losses(x: jax.Array) -> jax.Array:
  """The two objectives at x = (x1, x2), L1 already scaled by 0.1: f32[2]."""
  x1, x2 = x[0], x[1]
  c1 = jnp.maximum(jnp.tanh(x2 / 2), 0.0)
  c2 = jnp.maximum(jnp.tanh(-x2 / 2), 0.0)
  f1 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 - 7) - jnp.tanh(-x2)), 5e-6)) + 6
  f2 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 + 3) + jnp.tanh(-x2) + 2),
                           5e-6)) + 6
  g1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
  g2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
  l1 = c1 * f1 + c2 * g1
  l2 = c1 * f2 + c2 * g2
  return jnp.stack([L1_SCALE * l1, l2])


def pareto_set(num: int = 1401) -> np.ndarray:
  """Points [num, 2] of the exact Pareto set, x1 from -7 to 7.

  The minimiser over x2 of tanh(-x2/2) (19.6 w(1-w) + 0.01 (x2+8)^2 - 20) with
  x1 = 7(2w - 1), on a grid of step 1e-4 (in float64).
  """
  x1 = np.linspace(PARETO_X1[0], PARETO_X1[1], num)
  w = (x1 / 7.0 + 1.0) / 2.0
  grid = np.linspace(-8.6, -8.2, 4001)
  best = np.empty(num)
  for i in range(0, num, 200):
    a = 19.6 * w[i:i + 200, None] * (1 - w[i:i + 200, None])
    h = np.tanh(-grid / 2) * (a + 0.01 * (grid + 8) ** 2 - 20)
    best[i:i + 200] = grid[np.argmin(h, axis=1)]
  return np.stack([x1, best], axis=1)


def pareto_distance(x) -> np.ndarray:
  """Euclidean distance from points x [..., 2] to the Pareto set (NaN stays NaN)."""
  x = np.asarray(x, np.float64)
  curve = pareto_set()
  diff = x[..., None, :] - curve
  return np.sqrt(np.min(np.sum(diff ** 2, axis=-1), axis=-1))


def trajectory_steps(steps: int) -> np.ndarray:
  """The step of each point of :func:`make_run`'s trajectories: [R + 2]."""
  every = max(1, steps // NUM_RECORDS)
  records = steps // every
  return np.concatenate([every * np.arange(records + 1), [steps]])


def make_run(method_tx: optax.GradientTransformationExtraArgs, steps: int):
  """Jitted ``starts [S, 2] -> (final [S, 2], trajectory [S, R + 2, 2])``.

  The trajectory holds the start, the point every ``steps // NUM_RECORDS``
  steps and the final point (:func:`trajectory_steps` gives their steps).
  """
  tx = optax.chain(method_tx, optax.adam(LEARNING_RATE))
  jac = mtl.value_and_jacobian(toy_losses)
  every = max(1, steps // NUM_RECORDS)
  records, rest = divmod(steps, every)

  def step(carry, _):
    x, state = carry
    losses, task_grads = jac(x)
    updates, state = tx.update(task_grads, state, x, losses=losses)
    return (optax.apply_updates(x, updates), state), None

  def chunk(carry, _):
    carry, _ = jax.lax.scan(step, carry, None, length=every)
    return carry, carry[0]

  def one(x0):
    carry = (x0, tx.init(x0))
    carry, path = jax.lax.scan(chunk, carry, None, length=records)
    if rest:  # static: only compiled when steps is not a multiple of every
      carry, _ = jax.lax.scan(step, carry, None, length=rest)
    path = jnp.concatenate([x0[None], path, carry[0][None]], axis=0)
    return carry[0], path

  return jax.jit(jax.vmap(one))


def landscape(n: int = 200):
  g1 = np.linspace(-10, 10, n, dtype=np.float32)
  g2 = np.linspace(-10, 10, n, dtype=np.float32)
  xx, yy = np.meshgrid(g1, g2)
  pts = jnp.stack([xx.ravel(), yy.ravel()], axis=-1)
  vals = jax.vmap(toy_losses)(pts)
  return xx, yy, np.asarray(vals.sum(-1)).reshape(n, n)


def plot(results: dict, trajectories: dict, path: str) -> None:
  """One panel per method: its trajectories [starts, points, 2] over the landscape."""
  import matplotlib.pyplot as plt
  labels = list(results)
  n = len(labels)
  cols = min(n, 4)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows),
                           squeeze=False)
  xx, yy, zz = landscape()
  curve = pareto_set()
  colors = plt.cm.tab10(np.arange(len(STARTS)))
  for ax in axes.ravel()[n:]:
    ax.axis("off")
  for ax, label in zip(axes.ravel(), labels):
    ax.contourf(xx, yy, zz, levels=25, cmap="Greys", alpha=0.6)
    ax.plot(curve[:, 0], curve[:, 1], color="red", lw=2.5, label="Pareto set")
    for c, t in zip(colors, np.asarray(trajectories[label], np.float64)):
      t = t[np.all(np.isfinite(t), axis=1)]
      if len(t):
        ax.plot(t[:, 0], t[:, 1], color=c, lw=1.2)
        ax.plot(t[0, 0], t[0, 1], "o", color=c, ms=4)
        ax.plot(t[-1, 0], t[-1, 1], "*", color="k", ms=7)
    ax.set_title(f"{label} ({results[label]['reached']}/{len(STARTS)} reached)",
                 fontsize=9)
    ax.set_xlim(-10, 10)
    ax.set_ylim(-10, 10)
    ax.set_aspect("equal")
    ax.tick_params(labelsize=7)
  fig.suptitle("Toy problem: trajectories over 0.1 L1 + L2 "
               "(o start, * end, red: Pareto set)", fontsize=10)
  # tight_layout ignores the suptitle: keep 0.4 inch above the panels for it.
  fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.4 / fig.get_figheight()))
  fig.savefig(path, dpi=80)
  plt.close(fig)


def run(argv=None) -> dict:
  p = common.parser(__doc__.splitlines()[0], steps=35_000, seeds=1)
  p.add_argument("--tol", type=float, default=0.05,
                 help="distance to the Pareto set counted as reached")
  args = p.parse_args(argv)
  steps = common.positive("steps", args.steps or (3_000 if args.quick else 35_000))
  if args.seeds not in (None, 1):
    raise ValueError("--seeds: the toy problem is deterministic (fixed starts); "
                     "leave --seeds unset.")
  if not args.tol > 0:
    raise ValueError(f"--tol must be positive, got {args.tol}.")
  selected = methods_lib.select(methods_lib.METHODS, args.methods)
  starts = jnp.asarray(STARTS, jnp.float32)

  copts = common.compiler_options(args)
  path_steps = trajectory_steps(steps)
  # The last record and the final point coincide when the records divide steps.
  distinct = np.unique(path_steps, return_index=True)[1]
  saved = distinct[np.unique(
      np.linspace(0, len(distinct) - 1, JSON_POINTS).round().astype(int))]
  results, skipped, trajectories = {}, {}, {}
  for method in common.progress(selected, "toy_pareto", args.no_progress):
    if method.needs_kpis:
      skipped[method.label] = "needs kpis (the toy problem has none)"
      continue
    try:
      with common.Timer() as t_compile:
        compiled = make_run(method.make(2), steps).lower(starts).compile(copts)
    except (ValueError, TypeError) as e:
      skipped[method.label] = common.method_error(e)
      continue
    with common.Timer() as t_run:
      final, traj = jax.block_until_ready(compiled(starts))
    dist = np.asarray(pareto_distance(final))
    final, trajectories[method.label] = np.asarray(final), np.asarray(traj)
    per_start = []
    for s, f, d in zip(STARTS, final, dist):
      ok = bool(np.isfinite(d) and d < args.tol)
      per_start.append({
          "start": list(s),
          "final": [common.finite_or_none(v) for v in f],
          "distance": common.finite_or_none(d),
          "reached": ok,
      })
    results[method.label] = {
        "starts": per_start,
        "reached": sum(r["reached"] for r in per_start),
        "mean_distance": common.finite_or_none(np.mean(dist)),
        "compile_seconds": t_compile.seconds,
        "run_seconds": t_run.seconds,
        # The figure draws every recorded point; the file keeps a few, at
        # settings["trajectory_steps"], to 0.01 (the plot's 20 x 20 box).
        "trajectories": [[[None if not np.isfinite(v) else round(float(v), 2)
                           for v in pt] for pt in tr]
                         for tr in trajectories[method.label][:, saved]],
    }

  os.makedirs(args.out, exist_ok=True)
  payload = {
      "benchmark": "toy_pareto",
      "settings": {"steps": steps, "learning_rate": LEARNING_RATE,
                   "optimizer": "adam", "l1_scale": L1_SCALE,
                   "starts": [list(s) for s in STARTS], "tol": args.tol,
                   "pareto_set": {"x1": list(PARETO_X1),
                                  "x2_at_x1_0": PARETO_X2_CENTER,
                                  "x2_at_x1_7": PARETO_X2_ENDS},
                   "trajectory_steps": path_steps[saved].tolist(),
                   "quick": args.quick,
                   "compiler_options": copts},
      "device": common.device_info(),
      "results": results,
      "skipped": skipped,
  }
  stem = "toy_pareto_quick" if args.quick else "toy_pareto"
  common.write_json(os.path.join(args.out, stem + ".json"), payload, compact=True)

  header = ["method", "reached"] + [f"({s[0]:g}, {s[1]:g})" for s in STARTS]
  rows = []
  for label, r in results.items():
    cells = []
    for s in r["starts"]:
      if s["distance"] is None:
        cells.append("diverged")
      else:
        fx = ", ".join(f"{v:.2f}" for v in s["final"])
        cells.append(f"{'**' if s['reached'] else ''}d={s['distance']:.3g}"
                     f"{'**' if s['reached'] else ''} ({fx})")
    rows.append([label, f"{r['reached']}/{len(STARTS)}"] + cells)
  md = (f"# Toy Pareto problem\n\n{steps} Adam steps (lr {LEARNING_RATE}), "
        f"L1 scaled by {L1_SCALE}. Each cell: distance d to the Pareto set "
        f"(x2 from -8.355 at x1 = 0 to -8.434 at x1 = +-7) and the final point; bold = "
        f"reached (d < {args.tol:g}). {common.device_line()}\n\n"
        + common.markdown_table(header, rows) + "\n")
  if skipped:
    md += "\nSkipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + "\n"
  if results:
    md += f"\n![trajectories]({stem}.png)\n"
    plot(results, trajectories, os.path.join(args.out, stem + ".png"))
  common.write_text(os.path.join(args.out, stem + ".md"), md)
  print(md)
  return payload


if __name__ == "__main__":
  run()
