"""Every aggregator over 8 devices: the single-device update, no gradient moved.

Run in its own process (the device count is fixed when JAX starts)::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_check.py

For every aggregator of ``tests/method_cases.py``, in two layouts

* ``dp``: data parallel, the parameters and the per-task gradients
  replicated on every device (the gradients as after the ``psum`` of the
  per-device batch gradients);
* ``fsdp``: every parameter and its per-task gradients sharded over the 8
  devices along the first parameter axis;

and both mesh modes (``AxisType.Explicit``, ``AxisType.Auto``), one program
(``init``, then two updates, the second on the state the first left) is
compiled and checked three ways:

1. its updates equal those of the same two steps on one device;
2. each update is laid out like its parameter (sharded under ``fsdp``);
3. the compiled HLO holds no collective (all-gather, all-to-all,
   collective-permute, reduce-scatter, all-reduce, ...) on an array of more
   than T x T entries. The engine reduces each sharded leaf to its [T, T]
   Gramian block (or [T] norms) on its own shard and combines it in place,
   so only T x T numbers ever cross devices; every parameter shard holds
   128 entries or more (a task gradient's shard, 3 x 128), far from T x T = 9,
   so a gathered or reduced gradient cannot pass for a statistic.

One line is printed per check; the exit status is 1 when any check fails,
each failure named by method, layout and mode. ``--only NAME [NAME ...]``
restricts the run to some methods.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import itertools
import multiprocessing
import os
import re
import sys
import traceback

import jax

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  jax.config.update("jax_num_cpu_devices", 8)
# The checks read the partitioned HLO and compare numbers; code generation
# decides neither, and with XLA's defaults (LLVM optimisations, the MLIR
# fusion emitters) it takes most of the compile time: these settings compile
# the checked programs more than twice as fast.
_FAST_CODEGEN = ("--xla_backend_optimization_level=0",
                 "--xla_cpu_use_fusion_emitters=false",
                 "--xla_cpu_parallel_codegen_split_count=1")
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", "")] +
    [f for f in _FAST_CODEGEN
     if f.split("=")[0] not in os.environ.get("XLA_FLAGS", "")]).strip()
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_numpy_rank_promotion", "raise")
# No Python tracebacks in the programs' locations: smaller modules, lowered
# and compiled faster; the HLO keeps each op's name.
jax.config.update("jax_include_full_tracebacks_in_locations", False)
jax.config.update("jax_traceback_in_locations_limit", 0)

import numpy as np  # pylint: disable=g-import-not-at-top
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from method_cases import CASES  # pylint: disable=g-import-not-at-top

NUM_DEVICES = 8
NUM_TASKS = 3
STEPS = 2  # the second update runs on the state the first one left
AXIS = "devices"
# Every leaf's first axis is divisible by 8; each device's shard of every
# parameter has 128 entries or more.
PARAM_SHAPES = {"trunk": {"w": (64, 32), "b": (1024,)}, "head": (128, 16)}
# The largest array a collective may carry: the T x T Gramian.
LARGEST_STATISTIC = NUM_TASKS * NUM_TASKS
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "ragged-all-to-all",
               "collective-permute", "collective-broadcast", "reduce-scatter")
# An instruction line: `%name = <result type> <opcode>(<operands>), ...`.
# Compiled HLO names the operands without their types, so the result type is
# what is measured; a reduce-scatter's result is its operand's shard, still
# gradient-sized.
_INSTRUCTION = re.compile(
    r"=\s*(?P<result>.*?)\s(?P<op>" + "|".join(COLLECTIVES) +
    r")(?:-start|-done)?\(")
_ARRAY = re.compile(r"\b[a-z]+[0-9]*\[([0-9,]*)\]")
RTOL = ATOL = 1e-5


def make_params():
  return jax.tree.map(lambda shape: np.zeros(shape, np.float32), PARAM_SHAPES,
                      is_leaf=lambda x: isinstance(x, tuple))


def task_grads(steps, seed=0):
  """[steps, T, *param.shape] per leaf: the per-task gradients of each step."""
  # numpy inputs: no eager JAX op, so the only programs compiled are the
  # checked ones.
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: rng.standard_normal((steps, NUM_TASKS) + p.shape, np.float32),
      make_params())


def extra_args(steps):
  """[steps, T] losses (positive, changing over steps) and KPIs in (0, 1]."""
  decay = 1.0 + 0.5 * np.arange(steps, dtype=np.float32)[:, None]
  losses = np.linspace(1.0, 2.0, NUM_TASKS, dtype=np.float32)[None, :] / decay
  kpis = np.broadcast_to(np.linspace(0.3, 0.9, NUM_TASKS, dtype=np.float32),
                         (steps, NUM_TASKS))
  return {"losses": losses, "kpis": np.ascontiguousarray(kpis)}


def two_steps(tx):
  """One program: init, then one update per step, each on the last's state.

  The steps are a ``lax.scan``, so the update is compiled once whatever
  their number; its carry also checks that the state keeps its types (and,
  in explicit mode, its shardings) from one step to the next.
  """
  def run(params, grads, extras):
    def step(state, inputs):
      g, e = inputs
      out, state = tx.update(g, state, params, **e)
      return state, out
    _, outs = jax.lax.scan(step, tx.init(params), (grads, extras))
    return outs
  return jax.jit(run)


def element_count(dims: str) -> int:
  return int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1


def collectives(hlo: str):
  """``(opcode, largest array entries, line)`` per collective instruction."""
  found = []
  for line in hlo.splitlines():
    match = _INSTRUCTION.search(line)
    if match is None:
      continue
    # The result type, then the operands up to the closing parenthesis
    # (attributes and metadata follow it).
    start = match.end()
    depth, end = 1, start
    while end < len(line) and depth:
      depth += {"(": 1, ")": -1}.get(line[end], 0)
      end += 1
    arrays = _ARRAY.findall(match.group("result") + " " + line[start:end])
    largest = max((element_count(a) for a in arrays), default=0)
    found.append((match.group("op"), largest, line.strip()))
  return found


def place(tree, mesh, layout, axis):
  """Replicated (``dp``), or sharded along ``axis`` (``fsdp``: the first
  parameter axis)."""
  def put(x):
    dims = [None] * x.ndim
    if layout == "fsdp":
      dims[axis] = AXIS
    return jax.device_put(x, NamedSharding(mesh, P(*dims)))
  return jax.tree.map(put, tree)


def close(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b), "structures differ"
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64),
                               np.asarray(y, np.float64), rtol=RTOL, atol=ATOL)


def check(program, layout, axis_type, reference, grads, extras):
  """Returns ``(error or None, what the HLO holds)`` for one configuration."""
  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,), axis_types=(axis_type,))
  params = place(make_params(), mesh, layout, 0)
  sharded = place(grads, mesh, layout, 2)  # [step, task, parameter axes]
  with jax.set_mesh(mesh):
    compiled = program.lower(params, sharded, extras).compile()
    outs = compiled(params, sharded, extras)
  found = collectives(compiled.as_text())
  summary = (f"{len(found)} collective(s), largest {max(c[1] for c in found)} "
             f"entries" if found else "no collective")
  try:
    close(outs, reference)
  except AssertionError as error:
    return f"the update differs from the single-device one: {error}", summary
  # Every step's update is laid out like its parameter.
  for (path, u), p in zip(jax.tree_util.tree_flatten_with_path(outs)[0],
                          jax.tree.leaves(params)):
    expected = NamedSharding(mesh, P(None, *p.sharding.spec))
    if not u.sharding.is_equivalent_to(expected, u.ndim):
      return (f"the updates of {jax.tree_util.keystr(path)} are laid out as "
              f"{u.sharding.spec}, not as {expected.spec} (steps, then the "
              f"parameter's layout)"), summary
  moved = [line for _, size, line in found if size > LARGEST_STATISTIC]
  if moved:
    return (f"{len(moved)} collective(s) on arrays larger than T x T = "
            f"{LARGEST_STATISTIC} entries (a gradient crossed devices):\n    "
            + "\n    ".join(moved)), summary
  return None, summary


def check_method(case, grads, extras):
  """``[(label, error or None, summary)]``, one per layout and mode."""
  # One jitted function: the five programs differ only in their inputs'
  # shardings and the mesh around them.
  program = two_steps(case.make(NUM_TASKS))
  try:
    reference, failed = program(make_params(), grads, extras), None
  except Exception:  # pylint: disable=broad-except
    failed = "the single-device run raised:\n" + traceback.format_exc()
  results = []
  for layout in ("dp", "fsdp"):
    for axis_type in (AxisType.Explicit, AxisType.Auto):
      label = f"{case.name} {layout} {axis_type.name.lower()}"
      if failed:
        results.append((label, failed, ""))
        continue
      try:
        error, summary = check(program, layout, axis_type, reference, grads,
                               extras)
      except Exception:  # pylint: disable=broad-except
        error, summary = "raised:\n" + traceback.format_exc(), ""
      results.append((label, error, summary))
  return results


def check_named(name):
  """:func:`check_method` by the case's name (what a worker process receives)."""
  case = next(c for c in CASES if c.name == name)
  return check_method(case, task_grads(STEPS), extra_args(STEPS))


def scanner_sees_a_gather() -> str | None:
  """The scan must flag a gradient gathered onto every device."""
  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,), axis_types=(AxisType.Auto,))
  leaf = task_grads(1)["trunk"]["w"][0]
  sharded = jax.device_put(leaf, NamedSharding(mesh, P(None, AXIS)))
  gather = jax.jit(lambda g: g * 2.0, out_shardings=NamedSharding(mesh, P()))
  found = collectives(gather.lower(sharded).compile().as_text())
  if not any(op == "all-gather" and size == leaf.size for op, size, _ in found):
    return f"the HLO scan missed the all-gather of a {leaf.shape} gradient: {found}"
  return None


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", nargs="+", metavar="NAME",
                      help="check only these methods (names in method_cases)")
  parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                      help="worker processes, each checking one method at a "
                           "time (1: all in this process)")
  args = parser.parse_args(argv)
  if jax.device_count() != NUM_DEVICES:
    print(f"FAIL: {jax.device_count()} devices, not {NUM_DEVICES}: start the "
          f"process with XLA_FLAGS=--xla_force_host_platform_device_count="
          f"{NUM_DEVICES}, without jax_num_cpu_devices set otherwise.")
    return 1
  cases = [c for c in CASES if c.kind == "aggregator"]
  if args.only:
    unknown = set(args.only) - {c.name for c in cases}
    if unknown:
      print(f"FAIL: no aggregator named {sorted(unknown)} in method_cases.CASES")
      return 1
    cases = [c for c in cases if c.name in args.only]

  error = scanner_sees_a_gather()
  print(f"{'FAIL' if error else 'ok'}   HLO scan flags a gathered gradient"
        + (f": {error}" if error else ""), flush=True)
  if error:
    return 1
  failures, total = [], 0
  names = [c.name for c in cases]
  # Processes, not threads: tracing and compiling hold the GIL. The workers
  # start afresh (spawn) with this module's settings and the XLA_FLAGS above.
  pool = (concurrent.futures.ProcessPoolExecutor(
      min(args.jobs, len(names)), mp_context=multiprocessing.get_context("spawn"))
          if args.jobs > 1 and len(names) > 1 else None)
  with pool or contextlib.nullcontext():
    for label, error, summary in itertools.chain.from_iterable(
        pool.map(check_named, names) if pool else map(check_named, names)):
      total += 1
      if error:
        failures.append(label)
        print(f"FAIL {label}: {error}", flush=True)
      else:
        print(f"ok   {label} ({summary})", flush=True)
  print(f"{total - len(failures)} of {total} checks passed"
        + (f"; failed: {', '.join(failures)}" if failures else ""))
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
