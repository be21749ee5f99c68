"""Helpers shared by the quality benchmarks: CLI, timing, results files."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import optax

# The benchmarks are scripts: make ``import methods`` / ``import optax_mtl``
# work from the repository root without installing anything.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_HERE, _ROOT):
  if _p not in sys.path:
    sys.path.insert(0, _p)

import matplotlib  # noqa: E402

import optax_mtl as mtl  # noqa: E402

matplotlib.use("Agg")

DEFAULT_OUT = os.path.join(_HERE, "results")


def parser(description: str, *, steps: int, seeds: int) -> argparse.ArgumentParser:
  """The flags every benchmark takes; each adds its own afterwards."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--quick", action="store_true",
                 help="small settings (seconds to a minute on a laptop CPU)")
  p.add_argument("--steps", type=int, default=None,
                 help=f"optimisation steps (default {steps}; fewer with --quick)")
  p.add_argument("--seeds", type=int, default=None,
                 help=f"random seeds, vmapped (default {seeds})")
  p.add_argument("--methods", type=str, default=None,
                 help="comma-separated labels from benchmarks/methods.py "
                      "(default: all)")
  p.add_argument("--out", type=str, default=DEFAULT_OUT,
                 help="results directory (JSON, markdown, PNG)")
  p.add_argument("--no-progress", action="store_true",
                 help="disable the progress bar")
  p.add_argument("--fast-compile", action=argparse.BooleanOptionalAction,
                 default=None,
                 help="compile with XLA backend optimisation level 0: about "
                      "3x faster compilation of these small programs for a "
                      "slower run (default: on with --quick, off otherwise)")
  return p


def compiler_options(args) -> dict | None:
  """XLA options for ``Lowered.compile`` (per compilation, nothing global)."""
  fast = args.quick if args.fast_compile is None else args.fast_compile
  return {"xla_backend_optimization_level": 0} if fast else None


def positive(name: str, value: int) -> int:
  if value is None or int(value) < 1:
    raise ValueError(f"--{name} must be a positive integer, got {value}.")
  return int(value)


def device_info() -> dict[str, Any]:
  d = jax.devices()[0]
  return {
      "backend": jax.default_backend(),
      "device": getattr(d, "device_kind", str(d)),
      "num_devices": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "optax": optax.__version__,
      "python": platform.python_version(),
      "platform": platform.platform(),
      "cpu_kernel": cpu_kernel(),
  }


def cpu_kernel() -> str | None:
  """How the Gramian is computed on this backend's CPU (None on accelerators):
  "compiled kernel" or "pure JAX: <why>" (``mtl.cpu_kernel_status()``)."""
  if jax.default_backend() != "cpu":
    return None
  status = mtl.cpu_kernel_status()
  return "compiled kernel" if status.startswith("compiled") else status


def cpu_name() -> str:
  """The processor's model name (``/proc/cpuinfo``), or what Python knows."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def write_report(out: str, stem: str, report: dict, text: str) -> None:
  """``out/stem.json`` (compact) and ``out/stem.md``; says where they went."""
  write_json(os.path.join(out, f"{stem}.json"), report, compact=True)
  write_text(os.path.join(out, f"{stem}.md"), text)
  print(f"wrote {os.path.join(out, stem)}.json and .md")


def device_line() -> str:
  info = device_info()
  return (f"Measured on {info['backend'].upper()} ({info['device']}, "
          f"{info['cpu_count']} host cores), jax {info['jax']}.")


def progress(items: Sequence[Any], desc: str, disable: bool = False) -> Iterable[Any]:
  from tqdm.auto import tqdm
  return tqdm(items, desc=desc, disable=disable, leave=True, dynamic_ncols=True)


class Timer:
  """Wall-clock seconds of a block, after ``jax.block_until_ready``."""

  def __enter__(self):
    self.start = time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self.start
    return False


def task_weights(state) -> jax.Array | None:
  """The weights applied to the shared leaves, or None if none are logged."""
  return mtl.applied_weights(state)


def has_task_weights(state) -> bool:
  """Whether an optimizer state (or its ``jax.eval_shape``) logs weights."""
  return any(leaf is not None for _, leaf in
             optax.tree.get_all_with_path(state, "task_weights"))


def method_error(e: Exception) -> str:
  """One line for a method that refused this benchmark's inputs.

  Only the library's own contract errors (their messages name the method,
  ``mtl.<name>: ...``) are reported and skipped; anything else is a bug of
  the benchmark and is raised again.
  """
  message = str(e)
  if "mtl." not in message:
    raise e
  text = f"{type(e).__name__}: {message.splitlines()[0]}".replace("|", "/")
  print(f"skipped: {text}", file=sys.stderr)
  return text


def finite_or_none(x: float) -> float | None:
  x = float(x)
  return x if math.isfinite(x) else None


def significant(x: float, digits: int = 4) -> float | None:
  """``x`` rounded to ``digits`` significant digits (None if not finite).

  For the curves of a results file: plotted, never compared digit by digit.
  """
  x = finite_or_none(x)
  if x is None or x == 0.0:
    return x
  return round(x, digits - 1 - math.floor(math.log10(abs(x))))


def write_json(path: str, payload: dict, *, compact: bool = False) -> None:
  """Writes ``payload``; ``compact`` drops the indentation and spaces.

  Compact suits the results files that hold long curves: indentation alone
  makes them several times larger.
  """
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    if compact:
      json.dump(payload, f, separators=(",", ":"), allow_nan=False)
    else:
      json.dump(payload, f, indent=1, sort_keys=False, allow_nan=False)
    f.write("\n")


def compiled_memory(compiled) -> dict[str, int] | None:
  """Bytes a compiled program allocates, from XLA's ``memory_analysis()``.

  ``temp`` is its scratch, ``peak`` = arguments + outputs - aliased (donated)
  + temp; None where the backend does not say.
  """
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  out = {k: int(getattr(analysis, k + "_size_in_bytes"))
         for k in ("temp", "argument", "output", "alias")}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  def cell(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
  return "\n".join(lines)


def write_text(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text if text.endswith("\n") else text + "\n")


def mlp_model(key, in_dim, hidden, depth, tasks):
  """An MLP trunk (ReLU) with one linear head per task, as a pytree."""
  keys = jax.random.split(key, depth + 1)
  dims = [in_dim] + [hidden] * depth
  trunk = [{"w": jax.random.normal(k, (a, b)) / jnp.sqrt(a), "b": jnp.zeros(b)}
           for k, a, b in zip(keys[:-1], dims[:-1], dims[1:])]
  heads = jax.random.normal(keys[-1], (hidden, tasks)) / jnp.sqrt(hidden)
  return {"trunk": trunk, "heads": heads}


def mlp_task_losses(params, x, y, scales):
  """[T] squared errors of :func:`mlp_model`'s heads, task t scaled by scales[t]."""
  h = x
  for layer in params["trunk"]:
    h = jax.nn.relu(h @ layer["w"] + layer["b"][None, :])
  pred = h @ params["heads"]
  return scales * jnp.mean((pred - y) ** 2, axis=0)


class Data(list):
  """Batches ``(x, y)`` of an MLP benchmark, with the tasks' loss scales."""
  scales: jax.Array


def time_variant(step, carry, data: Data, iters: int):
  """Seconds per call of a train step ``(params, states, x, y, scales)``.

  Returns the time per step and the carry after ``iters`` steps, so that a
  donated carry is never reused.
  """
  params, states = carry
  start = time.perf_counter()
  for i in range(iters):
    x, y = data[i % len(data)]
    params, states, loss = step(params, states, x, y, data.scales)
  jax.block_until_ready((params, states, loss))
  return (time.perf_counter() - start) / iters, (params, states)
