"""Whole train-step time and compiled memory of every gradient path, against plain summed loss.

One jitted step per row, on the same model, batch and optimizer (Adam, the
update applied): the per-task gradients or statistics a path computes, the
method, ``optax.adam`` and ``optax.apply_updates``. A row is ``path:method``:

* ``ls``: ``jax.value_and_grad`` of ``sum_t L_t`` (the baseline of every ratio);
* ``one-backward:dwa``: ``mtl.value_and_weighted_grad`` (one VJP, the
  loss-based weights as its cotangent);
* ``exact:<method>``: ``mtl.value_and_jacobian`` (T backward passes vmapped,
  the T gradients held at once) then ``tx.update``;
* ``representation:<method>``: ``mtl.value_and_representation_grad`` (T
  backward passes through the heads only, one weighted backward through the
  trunk);
* ``lean:<method>``: ``mtl.value_and_gramian_grad`` (the exact Gramian from a
  VJP and a JVP per task, never T gradients at once, then one weighted VJP).

Methods: ``mean``, ``mgda``, ``pcgrad``, ``upgrad`` (built with
``shared={"trunk": True, "heads": False}`` on the exact and lean paths, so the
heads get their own task's gradient on every path) and ``dwa`` (a loss
weighting: every leaf weighted, as on the one-backward path). Any path runs any
method it supports: ``--methods exact:mgda,lean:mgda``.

Model (``benchmarks/models.py``): by default the eight-layer 3x3 CNN of
``models.CNN_WIDTHS`` (64 to 512 channels, stride 2 where the width grows,
global average pooling) with T linear regression heads, on batches of 64
RGB images of 64x64 (``--size full``); ``--size resnet18`` uses ResNet-18's 17
convolutions (11M parameters). ``--size medium`` (a quarter of the widths, 32x32
images, batch 32) is what a 2-core CPU runs in minutes; it is the default on
CPU, ``full`` elsewhere. ``--model mlp`` swaps
the CNN for an MLP trunk on the flattened images.

Timing: every step is compiled, called once (its first-step losses and
weights recorded) and then timed in interleaved rounds: in each round every
row runs an untimed settle call and one timed call, so load drifting on a
shared machine reaches every row alike; a row's time is the median over
rounds, its ratio the median over rounds of row / LS. Memory: XLA's
``memory_analysis()`` of each compiled step (parameters and optimizer state
donated): ``temp`` (the scratch the step allocates: activations, per-task
gradients, the Gramian's products) and ``peak`` = arguments + outputs -
aliased + temp. It is what the compiled program allocates, deterministic.

Results: ``benchmarks/results/train_step_<platform>.{json,md}``
(``_quick`` with ``--quick``).

Usage::

  python benchmarks/train_step.py --quick          # under a minute
  python benchmarks/train_step.py                  # medium on CPU, full on GPU/TPU
  python benchmarks/train_step.py --size full --tasks 10 --methods ls,exact:upgrad,lean:upgrad
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import statistics
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import common  # makes ``import optax_mtl`` work from a checkout
import models
import optax_mtl as mtl

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
SHARED = {"trunk": True, "heads": False}
PATHS = ("ls", "one-backward", "exact", "representation", "lean")
# Paths whose method is built with the trunk/heads mask; the others refuse
# one (the representation path's split is the mask, the one-backward path
# weights the whole loss).
MASKED_PATHS = ("exact", "lean")
METHODS: dict[str, Callable[[int, Any], optax.GradientTransformationExtraArgs]] = {
    "mean": lambda T, shared: mtl.mean(num_tasks=T, shared=shared),
    "mgda": lambda T, shared: mtl.mgda(num_tasks=T, shared=shared),
    "pcgrad": lambda T, shared: mtl.pcgrad(seed=0, num_tasks=T, shared=shared),
    "upgrad": lambda T, shared: mtl.upgrad(num_tasks=T, shared=shared),
    "dwa": lambda T, shared: mtl.dwa(num_tasks=T),
}
DEFAULT_ROWS = ("ls", "one-backward:dwa", "exact:mean", "exact:mgda",
                "exact:pcgrad", "exact:upgrad", "representation:upgrad",
                "lean:upgrad")


class Size(NamedTuple):
  """One setting: the CNN's widths, square image side, batch, task counts, timed rounds."""
  widths: tuple[int, ...]
  image: int
  batch: int
  tasks: tuple[int, ...]
  rounds: int


SIZES = {
    "quick": Size((8, 8), 16, 8, (3,), 2),
    "medium": Size(tuple(w // 4 for w in models.CNN_WIDTHS), 32, 32, (10, 40), 3),
    "full": Size(models.CNN_WIDTHS, 64, 64, (10, 40), 11),
    "resnet18": Size(models.RESNET18_WIDTHS, 64, 64, (10, 40), 11),
}


class Model(NamedTuple):
  """A trunk and linear heads: ``features(params["trunk"], x)`` -> [B, C]."""
  name: str
  params: Any
  features: Callable[[Any, jax.Array], jax.Array]

  def losses(self, params, x, y):
    return models.head_losses(params["heads"], self.features(params["trunk"], x), y)


def parse_row(label: str) -> tuple[str, str | None]:
  """``"exact:mgda"`` -> ``("exact", "mgda")``; ``"ls"`` -> ``("ls", None)``."""
  path, _, method = label.partition(":")
  if path not in PATHS:
    raise ValueError(f"row {label!r}: unknown path {path!r}; a row is "
                     f"'path:method' with path one of {PATHS} (or 'ls').")
  if path == "ls":
    if method:
      raise ValueError(f"row {label!r}: 'ls' takes no method (it is the "
                       f"summed loss); write 'ls'.")
    return path, None
  if method not in METHODS:
    raise ValueError(f"row {label!r}: unknown method {method!r}; choose one of "
                     f"{sorted(METHODS)}, e.g. '{path}:upgrad'.")
  return path, method


def gradient_fn(label: str, model: Model, num_tasks: int,
                lean_chunk_size: int | None = 1):
  """The gradients of one row, before the optimizer.

  Args:
    label: a row, ``"ls"`` or ``"path:method"``.
    model: the model whose losses are differentiated.
    num_tasks: T.
    lean_chunk_size: ``chunk_size`` of the lean path (tasks per VJP/JVP
      batch; None for all T at once, which holds T gradients).

  Returns:
    ``(grads_fn, init)``: ``grads_fn(method_state, params, x, y) -> (losses,
    grads, new_method_state)`` with ``grads`` shaped as ``params``, and
    ``init(params)``, the method's initial state.
  """
  path, name = parse_row(label)
  if path == "ls":
    def ls(state, params, x, y):
      def summed(p):
        losses = model.losses(p, x, y)
        return jnp.sum(losses), losses
      (_, losses), grads = jax.value_and_grad(summed, has_aux=True)(params)
      return losses, grads, state
    return ls, lambda params: optax.EmptyState()

  tx = METHODS[name](num_tasks, SHARED if path in MASKED_PATHS else None)
  if path == "one-backward":
    one = mtl.value_and_weighted_grad(model.losses, tx)
    return one, tx.init
  if path == "exact":
    jacobian = mtl.value_and_jacobian(model.losses)

    def exact(state, params, x, y):
      losses, task_grads = jacobian(params, x, y)
      grads, state = tx.update(task_grads, state, params, losses=losses)
      return losses, grads, state
    return exact, tx.init
  if path == "representation":
    step = mtl.value_and_representation_grad(model.features, models.head_losses, tx)

    def representation(state, params, x, y):
      losses, (trunk, heads), state = step(state, params["trunk"], params["heads"], x, y)
      return losses, {"trunk": trunk, "heads": heads}, state
    return representation, tx.init
  return (mtl.value_and_gramian_grad(model.losses, tx, chunk_size=lean_chunk_size),
          tx.init)


def train_step(grads_fn, opt: optax.GradientTransformation):
  """``(params, (method_state, opt_state), x, y) -> (params, states, losses)``."""

  def step(params, states, x, y):
    method_state, opt_state = states
    losses, grads, method_state = grads_fn(method_state, params, x, y)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), (method_state, opt_state), losses

  return step


def stepper(compiled, carry):
  """A compiled train step as ``call(x, y)``, its donated carry threaded through.

  ``carry`` is what the step returned last, ``(params, states, losses)``.
  """
  cell = {"carry": carry}

  def call(x, y):
    cell["carry"] = compiled(*cell["carry"][:2], x, y)
    jax.block_until_ready(cell["carry"])
  return call


def time_calls(calls, rounds: int, slow_call_s: float | None = None,
               slow_rounds: int = 3) -> dict[str, list[float]]:
  """Seconds of each timed ``call(x, y)``, the calls timed in turn every round.

  Args:
    calls: ``name -> (call, batches)``; ``call`` blocks until its result is
      ready and cycles through its own ``batches``.
    rounds: timed calls per name; each follows an untimed settle call of the
      same name, so that no call pays for the memory the previous one
      released, and load drifting on a shared machine reaches every name.
    slow_call_s: if given, every call is first warmed up once, and a name
      whose warm-up took longer is timed in the first ``slow_rounds`` rounds
      only, without settle calls (at seconds per call the released memory
      does not show, and full rounds would take hours).
    slow_rounds: timed calls of a slow name.

  Returns:
    ``name -> [seconds of each timed call]``, in round order.
  """
  slow = set()
  if slow_call_s is not None:
    for name, (call, batches) in calls.items():
      start = time.perf_counter()
      call(*batches[0])
      if time.perf_counter() - start > slow_call_s:
        slow.add(name)
  times = {name: [] for name in calls}
  count = 0
  for r in range(rounds):
    for name, (call, batches) in calls.items():
      if name in slow and r >= slow_rounds:
        continue
      for timed in ((True,) if name in slow else (False, True)):
        x, y = batches[count % len(batches)]
        count += 1
        start = time.perf_counter()
        call(x, y)
        if timed:
          times[name].append(time.perf_counter() - start)
  return times


def make_model(args, size: Size, num_tasks: int, key) -> Model:
  if args.model == "mlp":
    params = models.mlp_init(key, num_tasks, size.image * size.image * 3,
                             args.mlp_width, args.mlp_depth)
    return Model(f"MLP {args.mlp_depth} x {args.mlp_width}", params,
                 models.mlp_features)
  params = models.cnn_init(key, num_tasks, 3, size.widths)
  return Model("CNN " + "-".join(map(str, size.widths)), params, models.cnn_features)


def make_batches(size: Size, num_tasks: int, seed: int = 0, count: int = 2):
  """``count`` batches ``(x [B, H, W, 3], y [B, T])`` of standard normal values."""
  rng = np.random.default_rng(seed)
  shapes = ((size.batch, size.image, size.image, 3), (size.batch, num_tasks))
  return [tuple(jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in shapes)
          for _ in range(count)]


def run_case(args, size: Size, num_tasks: int, rows, compiler_options):
  """Compiles, checks and times every row for T tasks; one results entry."""
  model = make_model(args, size, num_tasks, jax.random.key(0))
  batches = make_batches(size, num_tasks, seed=1)
  opt = optax.adam(1e-4)
  calls, entry_rows = {}, {}
  for label in rows:
    grads_fn, init = gradient_fn(label, model, num_tasks, args.lean_chunk_size)
    params = model.params
    # Fresh buffers per row: the steps donate them, and a state may hold one
    # array twice.
    carry = jax.tree.map(jnp.copy, (params, (init(params), opt.init(params))))
    start = time.perf_counter()
    step = jax.jit(train_step(grads_fn, opt), donate_argnums=(0, 1)).lower(
        *carry, *batches[0]).compile(compiler_options)
    compile_s = time.perf_counter() - start
    carry = step(*carry, *batches[0])
    calls[label] = (stepper(step, carry), batches)
    params, (method_state, _), losses = carry
    weights = mtl.applied_weights(method_state)
    entry_rows[label] = {
        "memory_bytes": common.compiled_memory(step),
        "compile_s": compile_s,
        "first_losses": np.asarray(losses).tolist(),
        "first_task_weights": None if weights is None else np.asarray(weights).tolist(),
        "finite": bool(all(np.isfinite(np.asarray(l)).all()
                           for l in jax.tree.leaves(params))),
    }
  times = time_calls(calls, size.rounds)
  for label, row in entry_rows.items():
    row["ms"] = 1e3 * statistics.median(times[label])
    # Paired per round (the rows run back to back), then the median.
    row["time_ratio_to_LS"] = statistics.median(
        t / ls for t, ls in zip(times[label], times["ls"]))
    base, mem = entry_rows["ls"]["memory_bytes"], row["memory_bytes"]
    if base is not None and mem is not None:
      row["temp_ratio_to_LS"] = mem["temp"] / max(base["temp"], 1)
      row["peak_ratio_to_LS"] = mem["peak"] / base["peak"]
  return {"tasks": num_tasks, "model": model.name,
          "params": models.num_params(model.params),
          "trunk_params": models.num_params(model.params["trunk"]),
          "rows": entry_rows, "agreement": agreement(entry_rows)}


def agreement(rows) -> dict[str, float]:
  """Largest first-step weight difference between paths that must agree.

  The exact and lean paths give the same weights for a method (same
  Gramian, same rule), and so do the exact and one-backward paths for a
  loss weighting; the representation path balances other gradients.
  """
  out = {}
  for label, row in rows.items():
    path, method = parse_row(label)
    for other in ("lean", "one-backward"):
      twin = rows.get(f"{other}:{method}")
      if path == "exact" and twin is not None and row["first_task_weights"] is not None:
        out[f"{label} vs {other}:{method}"] = float(np.max(np.abs(
            np.subtract(row["first_task_weights"], twin["first_task_weights"]))))
  return out


def markdown(report) -> str:
  cfg = report["config"]
  mib = lambda b: f"{b / 2 ** 20:.1f}"
  lines = [
      f"# Train step time and memory of every gradient path ({report['device']})",
      "",
      f"Measured {report['date']} on {report['device']} (JAX backend "
      f"`{report['backend']}`, {report['cpu_count']} host cores), jax "
      f"{report['jax']}, optax {report['optax']}; `benchmarks/train_step.py "
      f"--size {cfg['size']}`."
      + (f" Gramian on the CPU: {report['cpu_kernel']}." if report.get("cpu_kernel") else "")
      + (" Host load average (1, 5, 15 min) at the start: "
         + ", ".join(f"{v:.1f}" for v in report["load_average"])
         + f" on {report['cpu_count']} cores." if report.get("load_average") else ""),
      "",
  ]
  if report.get("gpu_note"):
    lines += [f"**{report['gpu_note']}**", ""]
  lines += [
      f"Setting `{cfg['size']}`: {report['cases'][0]['model']} with T linear "
      f"regression heads, batch {cfg['batch']} of {cfg['image']}x{cfg['image']} "
      f"RGB images, float32, Adam, the update applied, one jitted step per "
      f"row. Times: median of {cfg['rounds']} interleaved rounds (each timed "
      f"call after an untimed one of the same row); time / LS: median over "
      f"rounds of row / LS. Memory: XLA `memory_analysis()` of the compiled "
      f"step (parameters and optimizer state donated): temp = scratch, peak "
      f"= arguments + outputs - aliased + temp, MiB. The exact and lean "
      f"paths build the method with `shared={{trunk: True, heads: False}}`; "
      f"the lean path runs with `chunk_size="
      f"{cfg['lean_chunk_size']}`.",
      "",
      "| T | params | row | step ms | time / LS | temp MiB | temp / LS | peak MiB | peak / LS |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for case in report["cases"]:
    for label, row in case["rows"].items():
      m = row["memory_bytes"]
      lines.append(
          f"| {case['tasks']} | {case['params']:,} | {label} | "
          f"{row['ms']:.1f} | {row['time_ratio_to_LS']:.2f} | "
          + (f"{mib(m['temp'])} | {row['temp_ratio_to_LS']:.2f} | "
             f"{mib(m['peak'])} | {row['peak_ratio_to_LS']:.2f} |" if m else
             "- | - | - | - |"))
  checks = [(case["tasks"], pair, diff) for case in report["cases"]
            for pair, diff in case["agreement"].items()]
  if checks:
    lines += ["", "First-step task weights, largest difference between paths "
              "that must agree (same batch, same parameters):", "",
              "| T | rows | max abs difference |", "|---|---|---|"]
    lines += [f"| {t} | {pair} | {diff:.2e} |" for t, pair, diff in checks]
  lines += [
      "",
      "The stacked exact path holds T per-task gradients (its temp grows with "
      "T); the lean path holds about one gradient whatever T and pays about "
      "2T backward passes; the representation path runs the T backward "
      "passes through the heads only; the one-backward path costs one "
      "summed-loss step.",
  ]
  return "\n".join(lines) + "\n"


def _chunk(text: str) -> int | None:
  if text == "all":
    return None
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be a positive integer or 'all', got {text}")
  return value


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="the tiny setting (same as --size quick): seconds")
  parser.add_argument("--size", choices=sorted(SIZES), default=None,
                      help="model and batch (default: medium on CPU, full "
                           "on GPU/TPU)")
  parser.add_argument("--model", choices=("cnn", "mlp"), default="cnn")
  parser.add_argument("--mlp-width", type=int, default=512)
  parser.add_argument("--mlp-depth", type=int, default=4)
  parser.add_argument("--tasks", default=None,
                      help="comma list of task counts T (default: the size's)")
  parser.add_argument("--methods", default=",".join(DEFAULT_ROWS),
                      help="comma list of rows 'path:method' (ls is always "
                           f"run); default {','.join(DEFAULT_ROWS)}")
  parser.add_argument("--rounds", type=int, default=None,
                      help="timed rounds (default: the size's)")
  parser.add_argument("--fast-compile", action=argparse.BooleanOptionalAction,
                      default=None,
                      help="compile with XLA backend optimisation level 0 "
                           "(default: on with --quick only)")
  parser.add_argument("--lean-chunk-size", type=_chunk, default=1,
                      help="tasks per VJP/JVP batch on the lean path, or "
                           "'all' (default 1, the library's)")
  parser.add_argument("--out", default=str(RESULTS), help="results directory")
  args = parser.parse_args(argv)

  backend = jax.default_backend()
  if args.quick and args.size not in (None, "quick"):
    parser.error("--quick is --size quick; give one of them.")
  size_name = "quick" if args.quick else args.size or (
      "medium" if backend == "cpu" else "full")
  size = SIZES[size_name]
  try:
    if args.tasks is not None:
      size = size._replace(tasks=tuple(int(t) for t in args.tasks.split(",") if t.strip()))
    if args.rounds is not None:
      size = size._replace(rounds=args.rounds)
  except ValueError:
    parser.error(f"--tasks must be a comma list of integers, got {args.tasks!r}.")
  if not size.tasks or min(size.tasks) < 2:
    parser.error("--tasks: give task counts >= 2, e.g. 10,40.")
  if size.rounds < 1 or args.mlp_width < 1 or args.mlp_depth < 1:
    parser.error("--rounds, --mlp-width and --mlp-depth must be positive integers.")
  rows = ["ls"] + [r.strip() for r in args.methods.split(",")
                   if r.strip() and r.strip() != "ls"]
  try:
    for label in rows:
      parse_row(label)
  except ValueError as e:
    parser.error(str(e))
  rows = list(dict.fromkeys(rows))
  fast = size_name == "quick" if args.fast_compile is None else args.fast_compile
  options = {"xla_backend_optimization_level": 0} if fast else None

  device = jax.devices()[0]
  print(f"{device.device_kind} ({backend}), {os.cpu_count()} host cores; size "
        f"{size_name}, model {args.model}", flush=True)
  # Other jobs on the host skew the times (not the memory): say how busy it was.
  load_average = list(os.getloadavg())
  cases = []
  for num_tasks in size.tasks:
    case = run_case(args, size, num_tasks, rows, options)
    cases.append(case)
    print(f"T={num_tasks} ({case['params']:,} parameters): " + ", ".join(
        f"{label} {row['ms']:.1f} ms ({row['time_ratio_to_LS']:.2f}x"
        + (f", temp {row['temp_ratio_to_LS']:.2f}x" if "temp_ratio_to_LS" in row else "")
        + ")" for label, row in case["rows"].items()), flush=True)

  out = pathlib.Path(args.out)
  stem = f"train_step_{backend}" + ("_quick" if size_name == "quick" else "")
  gpu_note = None
  if backend == "cpu" and not (out / "train_step_gpu.json").exists():
    gpu_note = ("CPU figures only. The full setting (batch 64 of 64x64 images, "
                "T = 10 and 40) is meant for a GPU; its GPU figures are not "
                "measured yet: no GPU was available for this run.")
  report = {
      "benchmark": "train_step",
      "date": datetime.date.today().isoformat(),
      "backend": backend,
      "device": str(device.device_kind),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "optax": optax.__version__,
      "machine": platform.machine(),
      "load_average": load_average,
      "cpu_kernel": common.cpu_kernel(),
      "gpu_note": gpu_note,
      "config": {"size": size_name, "model": args.model,
                 "widths": list(size.widths), "image": size.image,
                 "batch": size.batch, "tasks": list(size.tasks),
                 "rounds": size.rounds, "rows": rows, "fast_compile": fast,
                 "lean_chunk_size": args.lean_chunk_size,
                 **({"mlp_width": args.mlp_width, "mlp_depth": args.mlp_depth}
                    if args.model == "mlp" else {})},
      "cases": cases,
  }
  common.write_report(str(out), stem, report, markdown(report))
  return report


if __name__ == "__main__":
  main()
