"""Float32 convolutions on the CPU: the compiled kernel against XLA:CPU's own.

On the CPU the gradient paths of ``optax_mtl`` run the float32 NHWC/HWIO
convolutions of the loss function they differentiate on the library's
compiled kernel (``optax_mtl/_src/engine/convolutions.cc``) where the
processor has AVX or AVX-512. This script measures, in one run, with the two
forms interleaved (each timed call after an untimed one of the same form):

* per layer of the CNN of ``benchmarks/models.py`` (3x3, 'SAME', stride 2
  where the width grows): the forward pass, the input gradient and the
  kernel gradient, as the kernel computes them (the engine's convolution
  primitive and its transposes) and as XLA:CPU does
  (``lax.conv_general_dilated`` and its VJP);
* the whole model: ``mtl.value_and_jacobian``, the T per-task gradients that
  the exact path aggregates, against the same T backward passes of
  ``jax.vjp`` one after another with XLA's convolutions (what the path runs
  without the kernel).

Every row also reports the largest difference between the two results,
relative to the largest entry of XLA's, and the Jacobian row each form's
error against the float64 Jacobian. Settings: ``--size medium`` (the
default: a quarter of the widths, 16 to 128 channels, batch 32 of 32x32
images, T = 10), ``--size full`` (64 to 512 channels, batch 64 of 64x64),
``--quick`` (seconds, for the tests). Results go to
``benchmarks/results/convolutions_cpu_<bits>bit.{json,md}``, named by the
width of the vectors the kernel was built with (512 with AVX-512, 256 with
AVX or AVX2).

Usage::

  python benchmarks/convolutions.py               # about 2 minutes on 2 cores
  python benchmarks/convolutions.py --size full --tasks 10
  # the AVX2 build on a processor with AVX-512 (in a cache of its own):
  OPTAX_MTL_MARCH=x86-64-v3 python benchmarks/convolutions.py
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import statistics
import time
from typing import Callable, NamedTuple

import common  # makes ``import optax_mtl`` work from a checkout
import jax
import jax.numpy as jnp
import models
import numpy as np

import optax_mtl as mtl
from optax_mtl._src.engine import convolution as engine_convolution
from optax_mtl._src.engine import native

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


class Size(NamedTuple):
  widths: tuple[int, ...]
  batch: int
  image: int
  tasks: int
  rounds: int


SIZES = {
    "quick": Size((4, 8), 2, 8, 2, 1),
    "medium": Size(tuple(w // 4 for w in models.CNN_WIDTHS), 32, 32, 10, 7),
    "full": Size(models.CNN_WIDTHS, 64, 64, 10, 5),
}


class Layer(NamedTuple):
  """One 3x3 'SAME' convolution of the CNN, on [batch, size, size, c_in]."""
  size: int
  c_in: int
  c_out: int
  stride: int

  @property
  def padding(self) -> tuple[tuple[int, int], tuple[int, int]]:
    pads = jax.lax.padtype_to_pads((self.size,) * 2, (3, 3), (self.stride,) * 2, "SAME")
    return tuple(tuple(pad) for pad in pads)

  @property
  def out_size(self) -> int:
    return -(-self.size // self.stride)

  def label(self) -> str:
    return (f"{self.size}x{self.size}, {self.c_in} -> {self.c_out}, "
            f"stride {self.stride}")


def layers(size: Size) -> list[Layer]:
  """The CNN's layers, strided as ``models.cnn_features`` strides them."""
  out, spatial = [], size.image
  for c_in, c_out, stride in zip((3,) + size.widths[:-1], size.widths,
                                 models.cnn_strides(size.widths)):
    out.append(Layer(spatial, c_in, c_out, stride))
    spatial = out[-1].out_size
  return out


def layer_programs(layer: Layer, batch: int, rng: np.random.Generator):
  """``op -> (kernel_fn, xla_fn, args)`` for the layer's three convolutions."""
  x = jnp.asarray(rng.standard_normal((batch, layer.size, layer.size, layer.c_in),
                                      dtype=np.float32))
  w = jnp.asarray(rng.standard_normal((3, 3, layer.c_in, layer.c_out),
                                      dtype=np.float32) / np.sqrt(9 * layer.c_in))
  g = jnp.asarray(rng.standard_normal(
      (batch, layer.out_size, layer.out_size, layer.c_out), dtype=np.float32))
  strides = (layer.stride, layer.stride)

  def kernel(x, w):
    return engine_convolution.convolution(x, w, strides, layer.padding)

  def xla(x, w):
    return jax.lax.conv_general_dilated(x, w, strides, layer.padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def input_gradient(conv):
    return lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]

  def kernel_gradient(conv):
    return lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0]

  return {
      "forward": (jax.jit(kernel), jax.jit(xla), (x, w)),
      "input gradient": (jax.jit(input_gradient(kernel)), jax.jit(input_gradient(xla)),
                         (x, w, g)),
      "kernel gradient": (jax.jit(kernel_gradient(kernel)),
                          jax.jit(kernel_gradient(xla)), (x, w, g)),
  }


def jacobian_programs(size: Size, rng: np.random.Generator):
  """The CNN's per-task Jacobian: ``mtl.value_and_jacobian`` and XLA's
  T unrolled ``jax.vjp`` backward passes."""
  params = models.cnn_init(0, size.tasks, 3, size.widths)
  x = jnp.asarray(rng.standard_normal((size.batch, size.image, size.image, 3),
                                      dtype=np.float32))
  y = jnp.asarray(rng.standard_normal((size.batch, size.tasks), dtype=np.float32))

  def losses(p, x, y):
    return models.head_losses(p["heads"], models.cnn_features(p["trunk"], x), y)

  def xla(p, x, y):
    values, vjp = jax.vjp(lambda p: losses(p, x, y), p)
    eye = jnp.eye(size.tasks, dtype=values.dtype)
    rows = [vjp(eye[t])[0] for t in range(size.tasks)]
    return values, jax.tree.map(lambda *r: jnp.stack(r), *rows)

  return jax.jit(mtl.value_and_jacobian(losses)), jax.jit(xla), (params, x, y)


def float64_errors(kernel: Callable, xla: Callable, args) -> dict:
  """Each form's largest error against the float64 result (XLA's form in
  float64), per leaf relative to the leaf's largest entry."""
  with jax.enable_x64(True):
    wide = jax.tree.map(lambda a: np.asarray(a, np.float64), args)
    reference = jax.jit(xla)(*wide)
    reference = jax.tree.map(np.asarray, reference)

  def error(result):
    return max(float(np.max(np.abs(np.asarray(r, np.float64) - e))
                     / (np.max(np.abs(e)) or 1.0))
               for r, e in zip(jax.tree.leaves(result), jax.tree.leaves(reference)))
  return {"kernel_error": error(kernel(*args)), "xla_error": error(xla(*args))}


def relative_difference(a, b) -> float:
  a_leaves, b_leaves = jax.tree.leaves(a), jax.tree.leaves(b)
  scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in b_leaves) or 1.0
  return max(float(jnp.max(jnp.abs(p - q))) for p, q in zip(a_leaves, b_leaves)) / scale


def time_pair(kernel: Callable, xla: Callable, args, rounds: int) -> dict:
  """Both forms timed in turn every round, each call after an untimed one."""
  difference = relative_difference(kernel(*args), xla(*args))
  times = {"kernel": [], "xla": []}
  ratios = []
  for _ in range(rounds):
    for name, fn in (("kernel", kernel), ("xla", xla)):
      jax.block_until_ready(fn(*args))
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
    ratios.append(times["kernel"][-1] / times["xla"][-1])
  return {"kernel_ms": 1e3 * statistics.median(times["kernel"]),
          "xla_ms": 1e3 * statistics.median(times["xla"]),
          "ratio": statistics.median(ratios),
          "relative_difference": difference}


def markdown(report: dict) -> str:
  cfg = report["config"]
  lines = [
      "# Float32 convolutions on the CPU: the compiled kernel against XLA:CPU's",
      "",
      f"Measured {report['date']} on {report['processor']} ({report['cpu_count']} "
      f"cores, {report['vector']}; the kernel built with "
      f"`-march={report['march']}`, {report['kernel_lanes']}-float vectors), "
      f"jax {report['jax']}; "
      f"`benchmarks/convolutions.py --size {cfg['size']}`. Host load average "
      f"(1, 5, 15 min) at the start: "
      + ", ".join(f"{v:.1f}" for v in report["load_average"]) + ". "
      f"Gradient paths' convolutions: {report['paths_take']}.",
      "",
      f"CNN {'-'.join(map(str, cfg['widths']))}, 3x3 'SAME', batch {cfg['batch']} "
      f"of {cfg['image']}x{cfg['image']}x3 images, float32. Times: median of "
      f"{cfg['rounds']} interleaved rounds (each timed call after an untimed one "
      f"of the same form); kernel / XLA: median over rounds of the two calls' "
      f"ratio (below 1: the kernel is faster). Difference: largest absolute "
      f"difference of the results over the largest entry of XLA's.",
      "",
      "## Per layer",
      "",
      "| layer | op | kernel ms | XLA ms | kernel / XLA | difference |",
      "|---|---|---|---|---|---|",
  ]
  for row in report["layers"]:
    lines.append(f"| {row['layer']} | {row['op']} | {row['kernel_ms']:.2f} | "
                 f"{row['xla_ms']:.2f} | {row['ratio']:.2f} | "
                 f"{row['relative_difference']:.1e} |")
  totals = report["totals"]
  lines += ["", "Sum over layers, kernel / XLA: " + ", ".join(
      f"{op} {value:.2f}" for op, value in totals.items()) + ".", "",
            "## Per-task Jacobian of the whole CNN", "",
            "| T | parameters | kernel ms | XLA ms | kernel / XLA | difference | "
            "kernel error | XLA error |",
            "|---|---|---|---|---|---|---|---|"]
  j = report["jacobian"]
  lines.append(f"| {cfg['tasks']} | {j['params']:,} | {j['kernel_ms']:.1f} | "
               f"{j['xla_ms']:.1f} | {j['ratio']:.2f} | "
               f"{j['relative_difference']:.1e} | {j['kernel_error']:.1e} | "
               f"{j['xla_error']:.1e} |")
  lines += ["", "Kernel: `mtl.value_and_jacobian` (on the CPU its T backward passes "
            "run one after another, their convolutions on the kernel). XLA: the "
            "same T backward passes of `jax.vjp`, XLA:CPU's convolutions. Errors: each "
            "form's largest difference from the float64 Jacobian (XLA's form in "
            "float64), per parameter leaf relative to the leaf's largest entry."]
  return "\n".join(lines) + "\n"


def _vector_width() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      flags = f.read()
  except OSError:
    return "vector width unknown"
  for flag, name in ((" avx512f", "AVX-512"), (" avx2", "AVX2"), (" avx", "AVX")):
    if flag in flags:
      return name
  return "no AVX"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="the tiny setting (same as --size quick): seconds")
  parser.add_argument("--size", choices=sorted(SIZES), default=None,
                      help="model and batch (default medium)")
  parser.add_argument("--tasks", type=int, default=None,
                      help="T of the Jacobian row (default: the size's)")
  parser.add_argument("--rounds", type=int, default=None,
                      help="timed rounds (default: the size's)")
  parser.add_argument("--out", default=str(RESULTS), help="results directory")
  args = parser.parse_args(argv)
  if args.quick and args.size not in (None, "quick"):
    parser.error("--quick is --size quick; give one of them.")
  if jax.default_backend() != "cpu":
    parser.error("this benchmark compares CPU convolutions; run it with "
                 "JAX_PLATFORMS=cpu.")
  size_name = "quick" if args.quick else args.size or "medium"
  size = SIZES[size_name]
  if args.tasks is not None:
    if args.tasks < 1:
      parser.error(f"--tasks must be a positive integer, got {args.tasks}.")
    size = size._replace(tasks=args.tasks)
  if args.rounds is not None:
    if args.rounds < 1:
      parser.error(f"--rounds must be a positive integer, got {args.rounds}.")
    size = size._replace(rounds=args.rounds)
  status = mtl.cpu_kernel_status()
  if not status.startswith("compiled"):
    parser.error(f"the compiled CPU kernel is not in use here ({status}); "
                 f"install a C++ compiler or unset OPTAX_MTL_NATIVE.")

  print(f"{common.cpu_name()}, {os.cpu_count()} cores, {_vector_width()}, kernel "
        f"built with {native._convolution_lanes}-float vectors; size {size_name}",
        flush=True)
  load_average = list(os.getloadavg())
  rng = np.random.default_rng(0)
  rows = []
  for layer in layers(size):
    for op, (kernel, xla, op_args) in layer_programs(layer, size.batch, rng).items():
      row = {"layer": layer.label(), "op": op,
             **time_pair(kernel, xla, op_args, size.rounds)}
      rows.append(row)
      print(f"  {row['layer']:<28} {op:<16} kernel {row['kernel_ms']:7.2f} ms  "
            f"XLA {row['xla_ms']:7.2f} ms  ({row['ratio']:.2f}x)", flush=True)
  totals = {op: sum(r["kernel_ms"] for r in rows if r["op"] == op)
            / sum(r["xla_ms"] for r in rows if r["op"] == op)
            for op in ("forward", "input gradient", "kernel gradient")}
  kernel, xla, jac_args = jacobian_programs(size, rng)
  jacobian = {"params": models.num_params(jac_args[0]),
              **time_pair(kernel, xla, jac_args, size.rounds),
              **float64_errors(kernel, xla, jac_args)}
  print(f"  Jacobian, T = {size.tasks}: kernel {jacobian['kernel_ms']:.1f} ms  "
        f"XLA {jacobian['xla_ms']:.1f} ms  ({jacobian['ratio']:.2f}x)", flush=True)

  report = {
      "benchmark": "convolutions",
      "date": datetime.date.today().isoformat(),
      "processor": common.cpu_name(),
      "vector": _vector_width(),
      "kernel_lanes": native._convolution_lanes,
      "march": os.environ.get("OPTAX_MTL_MARCH") or "native",
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "load_average": load_average,
      "paths_take": ("the kernel" if engine_convolution.in_use()
                     else "XLA's (" + status.split("(", 1)[-1]),
      "config": {"size": size_name, "widths": list(size.widths), "batch": size.batch,
                 "image": size.image, "tasks": size.tasks, "rounds": size.rounds},
      "layers": rows,
      "totals": totals,
      "jacobian": jacobian,
  }
  out = pathlib.Path(args.out)
  stem = "convolutions_cpu_" + ("quick" if size_name == "quick"
                                else f"{32 * native._convolution_lanes}bit")
  common.write_report(str(out), stem, report, markdown(report))
  return report


if __name__ == "__main__":
  main()
