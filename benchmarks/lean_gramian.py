"""Step time and compiled memory of the memory-lean Gramian path against LS and the stacked path.

A Gramian method (here MGDA) needs the T x T Gramian of the per-task
gradients. This script compares, in one run and on the same model, data and
optimizer (Adam), four jitted train steps:

* ``LS``: ``jax.value_and_grad`` of ``sum_t L_t`` (the baseline);
* ``stacked``: ``mtl.value_and_jacobian`` (T backward passes vmapped, the T
  gradients held at once) + ``mtl.mgda``;
* ``lean``: ``value_and_gramian_grad`` + ``mtl.mgda``: the exact Gramian
  from T VJPs and T JVPs one task at a time (``--chunk-size``), then one
  weighted VJP;
* ``lean-all``: the same with ``chunk_size=None``: the Gramian from one
  batched backward pass, each dense layer's block from its input and the T
  cotangents of its output, never the T weight gradients.

MGDA is built with ``shared={"trunk": True, "heads": False}`` on both exact
paths (heads get their own task's gradient), so the lean path's last VJP has
two cotangents. Model: an MLP trunk with T linear task heads.

Memory is XLA's compiled ``memory_analysis()`` of each train step (params
and optimizer state donated): ``temp`` (scratch buffers) and ``peak`` =
arguments + outputs - aliased + temp. It is deterministic: it is what the
compiled program allocates, measured without running it. Times: median over
interleaved repeats; a ratio is the median over repeats of variant / LS,
timed back to back (robust to a shared machine's load).
Results go to ``benchmarks/results/lean_gramian_cpu.{json,md}``.

Usage::

  python benchmarks/lean_gramian.py            # default run, a few minutes on CPU
  python benchmarks/lean_gramian.py --quick    # seconds
  python benchmarks/lean_gramian.py --tasks 4,16,64 --hidden 1024
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import common  # noqa: E402  (makes ``import optax_mtl`` work from a checkout)
import optax_mtl as mtl  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
NAMES = ("LS", "stacked", "lean", "lean-all")


def build_steps(num_tasks, opt, chunk_size):
  """Train steps ``(params, states, x, y, scales) -> (params, states, loss)``."""
  shared = {"trunk": True, "heads": False}

  def ls_step(params, states, x, y, scales):
    w_state, o_state = states
    loss, grads = jax.value_and_grad(
        lambda p: jnp.sum(common.mlp_task_losses(p, x, y, scales)))(params)
    updates, o_state = opt.update(grads, o_state, params)
    return optax.apply_updates(params, updates), (w_state, o_state), loss

  stacked_tx = mtl.mgda(num_tasks=num_tasks, shared=shared)

  def stacked_step(params, states, x, y, scales):
    w_state, o_state = states
    losses, task_grads = mtl.value_and_jacobian(common.mlp_task_losses)(params, x, y, scales)
    grads, w_state = stacked_tx.update(task_grads, w_state, params, losses=losses)
    updates, o_state = opt.update(grads, o_state, params)
    return optax.apply_updates(params, updates), (w_state, o_state), losses.sum()

  lean_tx = mtl.mgda(num_tasks=num_tasks, shared=shared)

  def lean_step_of(chunk):
    lean = mtl.value_and_gramian_grad(common.mlp_task_losses, lean_tx, chunk_size=chunk)

    def lean_step(params, states, x, y, scales):
      w_state, o_state = states
      losses, grads, w_state = lean(w_state, params, x, y, scales)
      updates, o_state = opt.update(grads, o_state, params)
      return optax.apply_updates(params, updates), (w_state, o_state), losses.sum()
    return lean_step

  return {
      "LS": (ls_step, lambda p: optax.EmptyState()),
      "stacked": (stacked_step, stacked_tx.init),
      "lean": (lean_step_of(chunk_size), lean_tx.init),
      "lean-all": (lean_step_of(None), lean_tx.init),
  }


def run_tasks(args, num_tasks, key):
  params0 = common.mlp_model(key, args.in_dim, args.hidden, args.depth, num_tasks)
  num_params = sum(x.size for x in jax.tree.leaves(params0))
  data = common.Data()
  for i in range(4):
    kx, ky = jax.random.split(jax.random.fold_in(key, i + 1))
    data.append((jax.random.normal(kx, (args.batch, args.in_dim)),
                 jax.random.normal(ky, (args.batch, num_tasks))))
  data.scales = jnp.logspace(-1, 1, num_tasks)
  opt = optax.adam(1e-4)
  steps = build_steps(num_tasks, opt, args.chunk_size)
  compiled, carries, mem, compile_s = {}, {}, {}, {}
  for name, (step, init) in steps.items():
    params = jax.tree.map(jnp.copy, params0)
    # Fresh buffers: a state may hold one array twice, and steps donate.
    carry = jax.tree.map(jnp.copy, (params, (init(params), opt.init(params))))
    x, y = data[0]
    start = time.perf_counter()
    compiled[name] = jax.jit(step, donate_argnums=(0, 1)).lower(
        *carry, x, y, data.scales).compile()
    compile_s[name] = time.perf_counter() - start
    mem[name] = common.compiled_memory(compiled[name])
    _, carries[name] = common.time_variant(compiled[name], carry, data, 1)  # warm up
  samples = {name: [] for name in steps}
  for r in range(args.repeats):
    order = list(steps) if r % 2 == 0 else list(reversed(steps))
    for name in order:
      seconds, carries[name] = common.time_variant(compiled[name], carries[name], data,
                                            args.iters)
      samples[name].append(seconds)
  median = {name: statistics.median(v) for name, v in samples.items()}
  row = {
      "tasks": num_tasks,
      "params": int(num_params),
      "param_bytes": int(sum(x.nbytes for x in jax.tree.leaves(params0))),
      "ms": {name: 1e3 * v for name, v in median.items()},
      "time_ratio_to_LS": {name: statistics.median(
          v / ls for v, ls in zip(samples[name], samples["LS"]))
                           for name in median},
      "memory_bytes": mem,
      "compile_s": compile_s,
  }
  if all(mem[n] is not None for n in NAMES):
    row["temp_ratio_to_LS"] = {n: mem[n]["temp"] / max(mem["LS"]["temp"], 1)
                               for n in NAMES}
    row["peak_ratio_to_LS"] = {n: mem[n]["peak"] / mem["LS"]["peak"] for n in NAMES}
  return row


def markdown(report) -> str:
  cfg = report["config"]
  rows = report["results"]
  mib = lambda b: f"{b / 2 ** 20:.1f}"
  lines = [
      "# Memory-lean Gramian path vs. stacked path vs. plain summed loss (LS)",
      "",
      f"Backend: **{report['backend']}** ({report['note']}). Model: MLP trunk "
      f"{cfg['in_dim']}-" + "-".join([str(cfg["hidden"])] * cfg["depth"])
      + f" + T linear heads, batch {cfg['batch']}, Adam; MGDA with "
      f"shared={{trunk: True, heads: False}} on both exact paths; lean "
      f"chunk_size={cfg['chunk_size']}. Times: median of {cfg['repeats']} "
      f"interleaved repeats of {cfg['iters']} steps; time ratios: median over "
      f"repeats of (variant / LS) timed back to back. Memory: XLA "
      f"memory_analysis() of the compiled train step (params and optimizer "
      f"state donated): temp = scratch buffers, peak = arguments + outputs - "
      f"aliased + temp; MiB.",
      "",
      "| T | params | variant | step ms | time / LS | temp MiB | peak MiB "
      "| temp / LS | peak / LS |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for row in rows:
    for n in NAMES:
      m = row["memory_bytes"][n]
      temp_ratio = row.get("temp_ratio_to_LS", {}).get(n)
      peak_ratio = row.get("peak_ratio_to_LS", {}).get(n)
      lines.append(
          f"| {row['tasks']} | {row['params'] / 1e6:.2f}M | {n} | "
          f"{row['ms'][n]:.1f} | {row['time_ratio_to_LS'][n]:.2f} | "
          + (f"{mib(m['temp'])} | {mib(m['peak'])} | " if m else "- | - | ")
          + (f"{temp_ratio:.1f} | {peak_ratio:.2f} |" if temp_ratio is not None
             else "- | - |"))
  lines += [
      "",
      "The stacked path's temp holds the T per-task gradients (T x the "
      "parameters) and the Gramian's products; the lean path holds one "
      "gradient, its unit vector and the final VJP's two weighted rows, "
      "whatever T; lean-all holds each layer's T output cotangents (T x "
      "batch x width per layer) and the heads' T gradients. LS's temp is "
      "small because its gradient is written into the donated optimizer "
      "buffers; compare peaks for the whole step.",
  ]
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="small settings (seconds): T=2,4, hidden 128, 2 repeats")
  parser.add_argument("--tasks", type=str, default="4,16",
                      help="comma list of task counts T")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--in-dim", type=int, default=512)
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--chunk-size", type=int, default=1,
                      help="tasks per VJP/JVP batch on the lean path")
  parser.add_argument("--iters", type=int, default=3, help="steps per timing")
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--out", default=str(RESULTS / "lean_gramian_cpu"))
  args = parser.parse_args(argv)
  if args.quick:
    args.tasks, args.hidden, args.in_dim, args.depth = "2,4", 128, 64, 2
    args.batch, args.iters, args.repeats = 32, 2, 2
  tasks = [int(t) for t in args.tasks.split(",") if t.strip()]
  if not tasks or min(tasks) < 2:
    parser.error("--tasks: give task counts >= 2, e.g. 4,16")
  for flag in ("batch", "in_dim", "hidden", "depth", "chunk_size", "iters", "repeats"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag.replace('_', '-')} must be a positive integer")

  devices = jax.devices()
  backend = devices[0].platform
  note = ("CPU only: no GPU/TPU in this run; times and ratios are CPU ones"
          if backend == "cpu" else f"accelerator: {devices[0].device_kind}")
  print(f"backend={backend} ({note}); jax {jax.__version__}")

  key = jax.random.key(0)
  results = []
  for num_tasks in tasks:
    row = run_tasks(args, num_tasks, key)
    results.append(row)
    print(f"T={num_tasks:3d} " + "  ".join(
        f"{n}: {row['ms'][n]:.1f} ms ({row['time_ratio_to_LS'][n]:.2f}x)"
        + (f", temp {row['memory_bytes'][n]['temp'] / 2 ** 20:.1f} MiB, "
           f"peak {row['memory_bytes'][n]['peak'] / 2 ** 20:.1f} MiB"
           if row["memory_bytes"][n] else "")
        for n in NAMES))

  report = {
      "benchmark": "lean_gramian",
      "backend": backend,
      "device": str(devices[0].device_kind),
      "note": note,
      "jax": jax.__version__,
      "machine": platform.machine(),
      "cpu_count": os.cpu_count(),
      "config": {k: v for k, v in vars(args).items() if k != "out"},
      "results": results,
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
  out.with_suffix(".md").write_text(markdown(report))
  print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
  main()
