"""Time per call of the Gramian methods against one read of all gradients.

For each (T, d) the per-task gradients are a pytree of four float32 leaves
holding d parameters in total. Every method is jitted and timed per call
(warm-up, then the median of several calls, each ending in
``block_until_ready``; the rows of a case are timed in turn, round after
round, so that load drifting on a shared machine hits them alike); in the same run, the sum over the task axis gives the
time of one read of all gradients, the bandwidth floor of one pass. The T x T
solves alone (each method's rule on a given Gramian, T = 10 and 40, with
few or many conflicts) are timed too,
and the engine's Gramian pass against numpy's ``J @ J.T`` on the same matrix.

Task scalings chained with an aggregator are timed both ways, with the same
members: ``mtl.chain(scaling, aggregator)`` (one statistics pass and one
combination pass for the whole chain) and ``optax.chain(scaling, aggregator)``
(a pass per member plus a scaled copy of the gradients). Each is reported over
the aggregator alone (``chain_ratio_to_aggregator``), and the two updates are
checked to agree, so the pair times the same computation.

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
import time

import common  # makes ``import optax_mtl`` work from a checkout
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_mtl as mtl

FULL_CASES = [(2, 10_000_000), (10, 10_000_000), (40, 2_500_000), (10, 50_000_000)]
QUICK_CASES = [(3, 100_000)]
# Fractions of d held by each leaf: a pytree of a few leaves, not one vector.
LEAF_FRACTIONS = (0.5, 0.3, 0.15, 0.05)


def methods(num_tasks):
  return {
      "sum (one read)": mtl.sum(),
      "mgda": mtl.mgda(),
      "mgda l2": mtl.mgda("l2"),
      "pcgrad": mtl.pcgrad(),
      "cagrad": mtl.cagrad(),
      "upgrad": mtl.upgrad(),
      "dualproj": mtl.dualproj(),
      "imtl_g": mtl.imtl_g(),
      "aligned_mtl": mtl.aligned_mtl(),
      "config": mtl.config(),
      "nash_mtl": mtl.nash_mtl(num_tasks=num_tasks),
      "fairgrad": mtl.fairgrad(),
      "gradvac": mtl.gradvac(num_tasks=num_tasks),
      # One Gramian block, rule and combination weights per leaf (4 groups).
      "pcgrad (layerwise)": mtl.layerwise(mtl.pcgrad(), groups="leaf"),
      "gradvac (layerwise)": mtl.layerwise(mtl.gradvac(num_tasks=num_tasks), groups="leaf"),
      "upgrad (layerwise)": mtl.layerwise(mtl.upgrad(), groups="leaf"),
      # Krum needs T >= 2 f + 3 (absent at T = 2); f = 1 where T allows.
      **({"krum": mtl.krum(min(1, (num_tasks - 3) // 2))} if num_tasks >= 3 else {}),
      "trimmed_mean": mtl.trimmed_mean(min(1, (num_tasks - 1) // 2)),
      "pcd": mtl.pcd(num_tasks=num_tasks),
      "cr_mogm(mgda)": mtl.cr_mogm(mtl.mgda(), num_tasks=num_tasks),
      "auxiliary": mtl.auxiliary(),
      "graddrop": mtl.graddrop(),
      # Gradient-memory methods: their state holds T gradient-sized copies.
      "moco": mtl.moco(num_tasks=num_tasks),
      "db_mtl": mtl.db_mtl(num_tasks=num_tasks),
      "excess_mtl": mtl.excess_mtl(num_tasks=num_tasks),
      # Two-batch methods, fed one batch read twice.
      "sdmgrad": mtl.same_batch(mtl.sdmgrad(num_tasks=num_tasks)),
      "modo": mtl.same_batch(mtl.modo(num_tasks=num_tasks)),
      # Scalarisations read only the losses: the combination pass alone.
      "stch": mtl.stch(num_tasks=num_tasks),
      "pbi": mtl.pbi(),
      "cosmos": mtl.cosmos(num_tasks=num_tasks),
      "gradnorm (scale + sum)": mtl.gradnorm(num_tasks=num_tasks),
      "normalize_gradients + sum": _chain_sum(mtl.normalize_gradients()),
      "normalize + mgda (mtl.chain)": mtl.chain(mtl.normalize_gradients(), mtl.mgda()),
      "normalize + mgda (optax.chain)": optax.chain(mtl.normalize_gradients(), mtl.mgda()),
      "realtime + pcgrad (mtl.chain)": mtl.chain(mtl.scale_by_realtime_loss(), mtl.pcgrad()),
      "realtime + pcgrad (optax.chain)": optax.chain(mtl.scale_by_realtime_loss(),
                                                     mtl.pcgrad()),
  }


# (pair, aggregator-alone row, mtl.chain row, optax.chain row): the same
# transformations fused by mtl.chain (one statistics pass, one combination
# pass) and chained by optax.chain (a pass per member plus a scaled copy).
CHAIN_PAIRS = [
    ("normalize + mgda", "mgda", "normalize + mgda (mtl.chain)",
     "normalize + mgda (optax.chain)"),
    ("realtime + pcgrad", "pcgrad", "realtime + pcgrad (mtl.chain)",
     "realtime + pcgrad (optax.chain)"),
]


def selected_methods(num_tasks, names=None):
  """``methods(num_tasks)`` restricted to ``names`` (None: all).

  The one-read row and the rows of the chain pairs are always kept: the
  ratios are taken against them.
  """
  rows = methods(num_tasks)
  if names is None:
    return rows
  unknown = set(names) - set(methods(10))
  if unknown:
    raise ValueError(f"--methods: unknown rows {sorted(unknown)}; choose among "
                     f"{list(methods(10))}.")
  keep = {"sum (one read)"} | {r for pair in CHAIN_PAIRS for r in pair[1:]} | set(names)
  return {k: v for k, v in rows.items() if k in keep}


def _chain_sum(scaling):
  return mtl.chain(scaling, mtl.sum())


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


def check_chains_agree(updates):
  """The mtl.chain and optax.chain rows of a pair give the same update.

  The tolerance is relative (rtol 1e-4) plus, per leaf, 1e-4 of the leaf's
  largest entry: the two sum the T scaled gradients in different orders, so
  entries that cancel to near zero differ by float32 rounding of the others.
  """
  for pair, _, fused, chained in CHAIN_PAIRS:
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(updates[fused]),
                            jax.tree.leaves(updates[chained])):
      a, b = np.asarray(a), np.asarray(b)
      np.testing.assert_allclose(
          a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()),
          err_msg=f"{pair}: mtl.chain and optax.chain updates differ at "
                  f"{jax.tree_util.keystr(path)}")


def time_interleaved(calls, repeats):
  """Median time of each call, the calls timed in turn in every round.

  On a shared machine the load drifts over seconds; timing the rows of one
  case in alternation exposes each to the same drift, so their ratios hold.
  Each timed call follows an untimed call of the same row: a call right
  after one that wrote a gradient-sized copy (an ``optax.chain`` row) runs
  about 25% slower on CPU (measured: the memory it needs was just returned
  to the system), which would be charged to whichever row comes next.
  """
  for fn, args in calls.values():
    jax.block_until_ready(fn(*args))  # compile + warm-up
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, (fn, args) in calls.items():
      jax.block_until_ready(fn(*args))  # settle: see above
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def bench_case(num_tasks, dim, repeats, names=None):
  grads = make_grads(num_tasks, dim)
  params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), grads)
  losses = jnp.linspace(1.0, 2.0, num_tasks)
  chain_rows = {row for pair in CHAIN_PAIRS for row in pair[2:]}
  gradient_bytes = sum(g.size * g.dtype.itemsize for g in jax.tree.leaves(grads))
  calls, updates, reads, memory = {}, {}, {}, {}
  for name, tx in selected_methods(num_tasks, names).items():
    state = tx.init(params)
    args = (grads, state, params, losses)
    # The new state is returned too: a method whose update applies the
    # previous step's weights (GradNorm) would otherwise have its Gramian
    # removed as dead code. Compiled once, ahead of time: the executable is
    # timed and analysed.
    update = jax.jit(lambda g, s, p, l, tx=tx: tx.update(g, s, p, losses=l))
    compiled = update.lower(*args).compile()
    calls[name] = (compiled, args)
    if name in chain_rows:
      updates[name] = jax.device_get(compiled(*args)[0])
    # What the compiled program reads and writes, in units of the
    # gradients' size (XLA's cost analysis): deterministic, unlike timings.
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    reads[name] = float(cost.get("bytes accessed", float("nan"))) / gradient_bytes
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    memory[name] = {
        # Scratch the compiled call allocates, and the state it carries.
        "temp": compiled.memory_analysis().temp_size_in_bytes / gradient_bytes,
        "state": state_bytes / gradient_bytes}
  check_chains_agree(updates)
  rows = time_interleaved(calls, repeats)
  del grads, calls
  return rows, reads, memory


def _solve(tx, num_tasks):
  """The method's rule alone: [T] weights from a given normalised Gramian."""
  member = tx.parts[-1].members[-1]
  weighting = member.weighting
  state = weighting.initial_state()
  losses = jnp.linspace(1.0, 2.0, num_tasks)

  def weights(matrix):
    gram = mtl.Gramian(matrix, jnp.ones((), jnp.float32))
    inputs = mtl.TaskInputs(num_tasks, gram, gram.norms(), losses, None, {})
    return weighting.apply(inputs, state)[0]
  return jax.jit(weights)


# Gramians of the solve rows, normalised to a largest diagonal entry of 1:
# "mild", task gradients sharing a common direction (few conflicts);
# "conflicting", independent gradients in a space of 3 T dimensions (about
# half of the pairs conflict, at cosines down to -0.3 at T = 40), where the
# dual-cone and min-norm solvers take the most active-set or Frank-Wolfe
# steps.
SOLVE_KINDS = ("mild", "conflicting")
SOLVE_TASKS = (10, 40)


def solve_gramian(num_tasks: int, kind: str) -> np.ndarray:
  """A [T, T] float32 Gramian of the given kind (see ``SOLVE_KINDS``)."""
  rng = np.random.default_rng(0)
  if kind == "mild":
    g = rng.normal(size=(num_tasks, 64)) + 0.5 * rng.normal(size=64)
  elif kind == "conflicting":
    g = rng.normal(size=(num_tasks, 3 * num_tasks))
  else:
    raise ValueError(f"solve Gramian kind {kind!r}; expected one of {SOLVE_KINDS}.")
  gram = g @ g.T
  return (gram / gram.diagonal().max()).astype(np.float32)


def bench_solves(num_tasks=10, kind="mild", repeats=50, names=None):
  """Each Gramian method's T x T solve alone on one Gramian."""
  gram = jnp.asarray(solve_gramian(num_tasks, kind))
  solves = {}
  for name, tx in selected_methods(num_tasks, names).items():
    if not isinstance(tx, mtl.Method) or len(tx.parts) != 1 or len(tx.parts[0].members) != 1:
      continue  # chains and aliases: their members are timed on their own
    if "gramian" not in tx.reads or tx.parts[0].members[0].groups is not None:
      continue  # per-group methods run the same rule, K times batched
    solves[name] = time_call(_solve(tx, num_tasks), gram, repeats=repeats)
  return solves


def bench_gramian_pass(num_tasks=10, dim=2_000_000, repeats=11):
  """The engine's Gramian of a [T, d] pytree against numpy's ``J @ J.T``.

  numpy multiplies one contiguous [T, d] matrix (the leaves concatenated
  beforehand, not timed) with its BLAS; the engine reads the pytree.
  """
  grads = make_grads(num_tasks, dim)
  dense = np.concatenate([np.asarray(l).reshape(num_tasks, -1)
                          for l in jax.tree.leaves(grads)], axis=1)
  engine = jax.jit(lambda g: mtl.gramian(g).normalized)
  times = time_interleaved({
      "engine": (engine, (grads,)),
      "numpy": (lambda d: d @ d.T, (dense,)),
  }, repeats)
  return {"T": num_tasks, "d": dim, "engine_ms": 1e3 * times["engine"],
          "numpy_ms": 1e3 * times["numpy"],
          "ratio": times["engine"] / times["numpy"]}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small smoke run")
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
  parser.add_argument("--methods", default=None,
                      help="comma-separated rows to time (default: all)")
  args = parser.parse_args(argv)
  names = ([n.strip() for n in args.methods.split(",") if n.strip()]
           if args.methods else None)
  device = jax.devices()[0]
  kind = device.platform
  cases = QUICK_CASES if args.quick else FULL_CASES
  repeats = 3 if args.quick else 11
  note = (f"device: {device.device_kind} ({kind}), {os.cpu_count()} CPU cores"
          + (f"; Gramian: {common.cpu_kernel()}; no GPU: these are CPU figures, not "
             "the GPU targets" if kind == "cpu" else ""))
  print(note, flush=True)

  results = {"device": device.device_kind, "platform": kind, "quick": args.quick,
             "note": note, "cases": [], "solves_ms": {}}
  for num_tasks, dim in cases:
    rows, reads, memory = bench_case(num_tasks, dim, repeats, names)
    floor = rows["sum (one read)"]
    entry = {"T": num_tasks, "d": dim,
             "ms": {k: 1e3 * v for k, v in rows.items()},
             "ratio_to_one_read": {k: v / floor for k, v in rows.items()},
             "chain_ratio_to_aggregator": {
                 pair: {"aggregator": alone, "mtl.chain": rows[fused] / rows[alone],
                        "optax.chain": rows[chained] / rows[alone]}
                 for pair, alone, fused, chained in CHAIN_PAIRS},
             "bytes_accessed_per_gradient_bytes": reads,
             "memory_per_gradient_bytes": memory}
    results["cases"].append(entry)
    print(f"T={num_tasks} d={dim}: " + ", ".join(
        f"{k} {1e3 * v:.2f} ms ({v / floor:.2f}x)" for k, v in rows.items()), flush=True)
    print("  chain / aggregator alone: " + "; ".join(
        f"{pair}: mtl.chain {r['mtl.chain']:.2f}x, optax.chain {r['optax.chain']:.2f}x"
        for pair, r in entry["chain_ratio_to_aggregator"].items()), flush=True)
  gram_pass = bench_gramian_pass(dim=50_000 if args.quick else 2_000_000,
                                 repeats=repeats)
  results["gramian_pass"] = gram_pass
  print(f"Gramian pass, T={gram_pass['T']} d={gram_pass['d']}: engine "
        f"{gram_pass['engine_ms']:.2f} ms, numpy J @ J.T {gram_pass['numpy_ms']:.2f} "
        f"ms ({gram_pass['ratio']:.2f}x)", flush=True)
  for num_tasks in ((3,) if args.quick else SOLVE_TASKS):
    for gramian_kind in SOLVE_KINDS:
      solves = bench_solves(num_tasks, gramian_kind,
                            repeats=10 if args.quick else 50, names=names)
      results["solves_ms"][f"T={num_tasks} {gramian_kind}"] = {
          k: 1e3 * v for k, v in solves.items()}
      print(f"T x T solve alone, T={num_tasks} {gramian_kind}: " + ", ".join(
          f"{k} {1e3 * v:.3f} ms" for k, v in solves.items()), flush=True)

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = f"aggregators_{kind}" + ("_quick" if args.quick else "")
  (out / f"{stem}.json").write_text(json.dumps(results, separators=(",", ":")) + "\n")
  names = list(dict.fromkeys(n for e in results["cases"] for n in e["ms"]))
  lines = [f"# Aggregator time per call ({note})", "",
           "Milliseconds per jitted call (median), and the ratio to one read of "
           "all gradients (the sum over tasks) in the same run.", "",
           "| method | " + " | ".join(f"T = {e['T']}, d = {e['d']:,}"
                                    for e in results["cases"]) + " |",
           "|---|" + "---|" * len(results["cases"])]
  for n in names:
    cells = [f"{e['ms'][n]:.2f} ({e['ratio_to_one_read'][n]:.2f}x)"
             if n in e["ms"] else "-" for e in results["cases"]]
    lines.append(f"| {n} | " + " | ".join(cells) + " |")
  last = results["cases"][-1]
  lines += ["", f"## Memory per call (T = {last['T']}, d = {last['d']:,})", "",
            "In units of the gradients' size: the scratch the compiled call "
            "allocates (XLA's memory analysis) and the state it carries "
            "between steps (a gradient-memory method keeps T gradient-sized "
            "copies there; GradDrop's per-coordinate masks need scratch).", "",
            "| method | scratch | state |", "|---|---|---|"]
  for n, m in last["memory_per_gradient_bytes"].items():
    lines.append(f"| {n} | {m['temp']:.2f} | {m['state']:.2f} |")
  lines += ["", "## Chain overhead", "",
            "Time of a task scaling chained with an aggregator over the time of the "
            "aggregator alone, in the same run: `mtl.chain` fuses them (one "
            "statistics pass, one combination pass); `optax.chain` runs a pass per "
            "member plus a scaled copy. Both give the same update (checked). "
            "Reads: bytes the compiled program accesses over the gradients' size "
            "(XLA's cost analysis; both branches of the rare rescue cond included), "
            "aggregator alone / mtl.chain / optax.chain.", "",
            "| T | d | scaling + aggregator | aggregator alone ms | mtl.chain ms (ratio) "
            "| optax.chain ms (ratio) | reads |", "|---|---|---|---|---|---|---|"]
  for entry in results["cases"]:
    for pair, alone, fused, chained in CHAIN_PAIRS:
      r = entry["chain_ratio_to_aggregator"][pair]
      lines.append(
          f"| {entry['T']} | {entry['d']:,} | {pair} | {entry['ms'][alone]:.2f} "
          f"| {entry['ms'][fused]:.2f} ({r['mtl.chain']:.2f}x) "
          f"| {entry['ms'][chained]:.2f} ({r['optax.chain']:.2f}x) "
          f"| {entry['bytes_accessed_per_gradient_bytes'][alone]:.2f} / "
          f"{entry['bytes_accessed_per_gradient_bytes'][fused]:.2f} / "
          f"{entry['bytes_accessed_per_gradient_bytes'][chained]:.2f} |")
  gp = results["gramian_pass"]
  lines += ["", f"Gramian pass alone, T = {gp['T']}, d = {gp['d']:,}: the engine "
            f"{gp['engine_ms']:.2f} ms, numpy's `J @ J.T` on the same matrix "
            f"{gp['numpy_ms']:.2f} ms ({gp['ratio']:.2f}x)."]
  settings = list(results["solves_ms"])
  lines += ["", "T x T solve alone (weights from a given Gramian, largest diagonal "
            "entry 1; \"mild\": gradients sharing a direction, \"conflicting\": "
            "independent gradients in 3 T dimensions, about half of the pairs "
            "conflicting), ms:", "",
            "| solve | " + " | ".join(settings) + " |",
            "|---|" + "---|" * len(settings)]
  methods = list(dict.fromkeys(m for v in results["solves_ms"].values() for m in v))
  lines += [f"| {m} | " + " | ".join(
      f"{results['solves_ms'][k][m]:.3f}" if m in results["solves_ms"][k] else "-"
      for k in settings) + " |" for m in methods]
  (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
  print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
  main()
