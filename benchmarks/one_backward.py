"""Train-step time of the one-backward path against plain summed loss.

Loss-based weightings need only the task losses, so their update is one VJP of
the loss vector with the weights as cotangent
(:func:`optax_mtl.value_and_weighted_grad`). This script times, in one run and
on the same model, data and optimizer (Adam):

* ``LS``: ``jax.value_and_grad`` of ``sum_t L_t`` (the baseline);
* ``one-backward``: ``mtl.value_and_weighted_grad`` with a loss weighting;
* ``stacked``: ``mtl.value_and_jacobian`` (T backward passes) + the alias.

Model: an MLP trunk (a few million parameters) with T linear task heads.
Timings interleave the variants and repeat; a ratio is the median over
repeats of variant / LS timed back to back (robust to a shared machine's load).
Results go to ``benchmarks/results/one_backward.{json,md}``.

Usage::

  python benchmarks/one_backward.py            # default run, < 2 minutes on CPU
  python benchmarks/one_backward.py --tasks 16 --hidden 2048
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import common  # makes ``import optax_mtl`` work from a checkout
import optax_mtl as mtl

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def build_steps(weighting_factory, num_tasks, opt):
  """Returns jitted train steps ``(params, states, x, y) -> (params, states)``."""

  def ls_step(params, states, x, y, scales):
    w_state, o_state = states
    loss, grads = jax.value_and_grad(
        lambda p: jnp.sum(common.mlp_task_losses(p, x, y, scales)))(params)
    updates, o_state = opt.update(grads, o_state, params)
    return optax.apply_updates(params, updates), (w_state, o_state), loss

  one = mtl.value_and_weighted_grad(common.mlp_task_losses, weighting_factory())

  def one_step(params, states, x, y, scales):
    w_state, o_state = states
    losses, grads, w_state = one(w_state, params, x, y, scales)
    updates, o_state = opt.update(grads, o_state, params)
    return optax.apply_updates(params, updates), (w_state, o_state), losses.sum()

  stacked_tx = optax.chain(weighting_factory(), mtl.sum())

  def stacked_step(params, states, x, y, scales):
    w_state, o_state = states
    losses, task_grads = mtl.value_and_jacobian(common.mlp_task_losses)(params, x, y, scales)
    grads, w_state = stacked_tx.update(task_grads, w_state, params, losses=losses)
    updates, o_state = opt.update(grads, o_state, params)
    return optax.apply_updates(params, updates), (w_state, o_state), losses.sum()

  donate = dict(donate_argnums=(0, 1))
  return {
      "LS": (jax.jit(ls_step, **donate), lambda p: optax.EmptyState()),
      "one-backward": (jax.jit(one_step, **donate), weighting_factory().init),
      "stacked": (jax.jit(stacked_step, **donate), stacked_tx.init),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tasks", type=int, default=8)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--in-dim", type=int, default=512)
  parser.add_argument("--hidden", type=int, default=1024)
  parser.add_argument("--depth", type=int, default=3)
  parser.add_argument("--iters", type=int, default=5, help="steps per timing")
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--methods", default="uncertainty,dwa,famo",
                      help="comma list of: uncertainty, dwa, famo, realtime, geometric")
  parser.add_argument("--stacked-iters", type=int, default=2,
                      help="steps per timing of the (slow) stacked path; it is "
                           "timed for the first method only, 0 skips it")
  parser.add_argument("--out", default=str(RESULTS / "one_backward"))
  args = parser.parse_args(argv)

  factories = {
      "uncertainty": lambda: mtl.scale_by_uncertainty(num_tasks=args.tasks),
      "dwa": lambda: mtl.scale_by_dwa(num_tasks=args.tasks, period=5),
      "famo": lambda: mtl.scale_by_famo(num_tasks=args.tasks),
      "realtime": mtl.scale_by_realtime_loss,
      "geometric": mtl.scale_by_geometric_loss,
  }
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  for m in methods:
    if m not in factories:
      parser.error(f"unknown method {m!r}; choose from {sorted(factories)}")

  devices = jax.devices()
  backend = devices[0].platform
  note = ("CPU only: no GPU/TPU in this run; ratios are CPU ratios"
          if backend == "cpu" else f"accelerator: {devices[0].device_kind}")
  print(f"backend={backend} ({note}); jax {jax.__version__}")

  key = jax.random.key(0)
  params0 = common.mlp_model(key, args.in_dim, args.hidden, args.depth, args.tasks)
  num_params = sum(x.size for x in jax.tree.leaves(params0))
  data = common.Data()
  for i in range(4):
    kx, ky = jax.random.split(jax.random.fold_in(key, i + 1))
    data.append((jax.random.normal(kx, (args.batch, args.in_dim)),
                 jax.random.normal(ky, (args.batch, args.tasks))))
  data.scales = jnp.logspace(-2, 2, args.tasks)
  opt = optax.adam(1e-4)
  print(f"model: {num_params / 1e6:.2f}M parameters, T={args.tasks}, "
        f"batch={args.batch}")

  results = []
  for method in methods:
    steps = build_steps(factories[method], args.tasks, opt)
    if args.stacked_iters <= 0 or method != methods[0]:
      steps.pop("stacked")
    carries, compile_s = {}, {}
    for name, (step, init) in steps.items():
      params = jax.tree.map(jnp.copy, params0)
      # Fresh buffers: a state may hold one array twice, and steps donate.
      carry = jax.tree.map(jnp.copy, (params, (init(params), opt.init(params))))
      start = time.perf_counter()
      _, carry = common.time_variant(step, carry, data, 2)  # compile + warm up
      compile_s[name] = time.perf_counter() - start
      carries[name] = carry
    samples = {name: [] for name in steps}
    for r in range(args.repeats):
      order = list(steps) if r % 2 == 0 else list(reversed(steps))
      for name in order:
        iters = args.stacked_iters if name == "stacked" else args.iters
        seconds, carries[name] = common.time_variant(steps[name][0], carries[name], data,
                                              iters)
        samples[name].append(seconds)
    median = {name: statistics.median(v) for name, v in samples.items()}
    row = {
        "method": method,
        "ms": {name: 1e3 * v for name, v in median.items()},
        # Paired per repeat (LS and the variant timed back to back), then the
        # median: robust to load drifting on a shared machine.
        "ratio_to_LS": {name: statistics.median(
            v / ls for v, ls in zip(samples[name], samples["LS"]))
                        for name in median},
        "compile_s": compile_s,
    }
    results.append(row)
    print(f"{method:12s} " + "  ".join(
        f"{n}: {row['ms'][n]:.2f} ms ({row['ratio_to_LS'][n]:.3f}x)" for n in median))

  report = {
      "benchmark": "one_backward",
      "backend": backend,
      "device": str(devices[0].device_kind),
      "note": note,
      "jax": jax.__version__,
      "machine": platform.machine(),
      "config": vars(args) | {"params": int(num_params)},
      "results": results,
      "target": "one-backward / LS <= 1.05",
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
  names = ["LS", "one-backward", "stacked"]
  stacked_note = (f" The stacked path (value_and_jacobian, T backward passes, "
                  f"then the weighting) is timed for {methods[0]} only, over "
                  f"{args.stacked_iters} steps per repeat.")
  lines = [
      "# One-backward path vs. plain summed loss (LS)",
      "",
      f"Backend: **{backend}** ({note}). Model: MLP trunk + {args.tasks} linear "
      f"heads, {num_params / 1e6:.2f}M parameters, batch {args.batch}, Adam. "
      f"Times: median of {args.repeats} interleaved repeats of {args.iters} "
      f"steps. Ratios: median over repeats of (variant / LS), each pair timed "
      f"back to back in the same run." + stacked_note,
      "",
      "| weighting | " + " | ".join(f"{n} ms" for n in names) + " | "
      + " | ".join(f"{n} / LS" for n in names[1:]) + " |",
      "|---|" + "---|" * (2 * len(names) - 1),
  ]
  cell = lambda d, n, fmt: format(d[n], fmt) if n in d else "-"
  for row in results:
    lines.append(f"| {row['method']} | " + " | ".join(
        cell(row["ms"], n, ".2f") for n in names) + " | " + " | ".join(
            cell(row["ratio_to_LS"], n, ".3f") for n in names[1:]) + " |")
  out.with_suffix(".md").write_text("\n".join(lines) + "\n")
  print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
  main()
