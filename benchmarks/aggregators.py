"""Time per call of the Gramian methods against one read of all gradients.

For each (T, d) the per-task gradients are a pytree of four float32 leaves
holding d parameters in total. Every method is jitted and timed per call
(warm-up, then the median of several calls, each ending in
``block_until_ready``); in the same run, the sum over the task axis gives the
time of one read of all gradients, the bandwidth floor of one pass. The T x T
solves alone (weights from a given Gramian, T = 10) are timed too.

Usage::

  python benchmarks/aggregators.py            # full run
  python benchmarks/aggregators.py --quick    # small smoke run

Writes ``benchmarks/results/aggregators_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

# Run from a checkout without installing the package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_mtl as mtl
from optax_mtl._src.methods.gradient import cagrad as cagrad_lib
from optax_mtl._src.solvers import min_norm as mgda_lib
from optax_mtl._src.methods.gradient import pcgrad as pcgrad_lib

FULL_CASES = [(2, 10_000_000), (10, 10_000_000), (40, 2_500_000), (10, 50_000_000)]
QUICK_CASES = [(3, 100_000), (10, 50_000)]
# Fractions of d held by each leaf: a pytree of a few leaves, not one vector.
LEAF_FRACTIONS = (0.5, 0.3, 0.15, 0.05)


def methods(num_tasks):
  return {
      "sum (one read)": mtl.sum(),
      "mgda": mtl.mgda(),
      "mgda l2": mtl.mgda("l2"),
      "pcgrad": mtl.pcgrad(),
      "cagrad": mtl.cagrad(),
      "gradnorm (scale + sum)": mtl.gradnorm(num_tasks=num_tasks),
      "normalize_gradients + sum": _chain_sum(mtl.normalize_gradients()),
  }


def _chain_sum(scaling):
  return optax.chain(scaling, mtl.sum())


def make_grads(num_tasks, dim, seed=0):
  sizes = [int(dim * f) for f in LEAF_FRACTIONS]
  sizes[0] += dim - sum(sizes)
  keys = jax.random.split(jax.random.key(seed), len(sizes))
  make = jax.jit(lambda k, shape: jax.random.normal(k, shape, jnp.float32),
                 static_argnums=1)
  # Leaves of shape (T, n // 128, 128) or (T, n) like weight matrices/vectors.
  grads = {}
  for i, (k, n) in enumerate(zip(keys, sizes)):
    shape = (num_tasks, n // 128, 128) if n % 128 == 0 else (num_tasks, n)
    grads[f"leaf{i}"] = make(k, shape)
  return grads


def time_call(fn, *args, repeats):
  jax.block_until_ready(fn(*args))  # compile + warm-up
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_case(num_tasks, dim, repeats):
  grads = make_grads(num_tasks, dim)
  params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), grads)
  losses = jnp.linspace(1.0, 2.0, num_tasks)
  rows = {}
  for name, tx in methods(num_tasks).items():
    state = tx.init(params)
    # The new state is returned too: a method whose update applies the
    # previous step's weights (GradNorm) would otherwise have its Gramian
    # removed as dead code.
    update = jax.jit(lambda g, s, p, l, tx=tx: tx.update(g, s, p, losses=l))
    rows[name] = time_call(update, grads, state, params, losses, repeats=repeats)
  del grads
  return rows


def bench_solves(num_tasks=10, repeats=50):
  rng = np.random.default_rng(0)
  g = rng.normal(size=(num_tasks, 64)) + 0.5 * rng.normal(size=64)
  gram = g @ g.T
  gram = jnp.asarray(gram / gram.diagonal().max(), jnp.float32)
  orders = jnp.asarray(np.stack([rng.permutation(num_tasks) for _ in range(num_tasks)]))
  solves = {
      "mgda": jax.jit(lambda m: mgda_lib.min_norm_weights(m)),
      "cagrad": jax.jit(lambda m: cagrad_lib.dual_weights(m, 0.4)),
      "pcgrad": jax.jit(lambda m: pcgrad_lib.projection_coefficients(m, orders).sum(0)),
  }
  return {name: time_call(fn, gram, repeats=repeats) for name, fn in solves.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small smoke run")
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  kind = device.platform
  cases = QUICK_CASES if args.quick else FULL_CASES
  repeats = 3 if args.quick else 5
  note = (f"device: {device.device_kind} ({kind}), {os.cpu_count()} CPU cores"
          + ("; no GPU: these are CPU figures, not the GPU targets" if kind == "cpu" else ""))
  print(note, flush=True)

  results = {"device": device.device_kind, "platform": kind, "quick": args.quick,
             "note": note, "cases": [], "solves_T10_ms": {}}
  for num_tasks, dim in cases:
    rows = bench_case(num_tasks, dim, repeats)
    floor = rows["sum (one read)"]
    entry = {"T": num_tasks, "d": dim,
             "ms": {k: 1e3 * v for k, v in rows.items()},
             "ratio_to_one_read": {k: v / floor for k, v in rows.items()}}
    results["cases"].append(entry)
    print(f"T={num_tasks} d={dim}: " + ", ".join(
        f"{k} {1e3 * v:.2f} ms ({v / floor:.2f}x)" for k, v in rows.items()), flush=True)
  solves = bench_solves(repeats=10 if args.quick else 50)
  results["solves_T10_ms"] = {k: 1e3 * v for k, v in solves.items()}
  print("T x T solve alone, T=10: " + ", ".join(
      f"{k} {1e3 * v:.3f} ms" for k, v in solves.items()), flush=True)

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = f"aggregators_{kind}" + ("_quick" if args.quick else "")
  (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
  names = list(results["cases"][0]["ms"])
  lines = [f"# Aggregator time per call ({note})", "",
           "Milliseconds per jitted call (median), and the ratio to one read of "
           "all gradients (the sum over tasks) in the same run.", "",
           "| T | d | " + " | ".join(names) + " |",
           "|---|---|" + "---|" * len(names)]
  for entry in results["cases"]:
    cells = [f"{entry['ms'][n]:.2f} ({entry['ratio_to_one_read'][n]:.2f}x)" for n in names]
    lines.append(f"| {entry['T']} | {entry['d']:,} | " + " | ".join(cells) + " |")
  lines += ["", "T x T solve alone (weights from a given Gramian), T = 10:", "",
            "| solve | ms |", "|---|---|"]
  lines += [f"| {k} | {v:.3f} |" for k, v in results["solves_T10_ms"].items()]
  (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
  print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
  main()
