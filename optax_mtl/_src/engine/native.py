"""Compiled CPU kernels: the task-by-task products of float32 leaves, and convolutions.

``gramian(a)`` is ``a @ a.T`` and ``cross(a, b)`` is ``a @ b.T`` for
row-major [T, n] float32 matrices, computed by ``products.cc`` through XLA's
FFI: register-blocked dot products along the contiguous rows, the Gramian's
symmetric half skipped, the columns split over XLA's intra-op threads. On a
2-core AVX-512 machine it is 2.3x faster than torch's MKL product at
T = 40 and at memory bandwidth at T = 10 (``benchmarks/compare_torchjd.py``),
where XLA:CPU's own contraction is slower than BLAS. ``convolutions.cc``
holds the float32 convolutions of ``convolution.py``. Both are built into
one library.

The kernel is compiled for the host the first time a CPU program needs it,
with the C++ compiler named by ``$CXX`` (default ``c++``), and cached under
``$OPTAX_MTL_CACHE_DIR`` (default ``~/.cache/optax_mtl``, or the temporary
directory when that is not writable), keyed by the source, the compiler, the
JAX version, the processor and the target: ``-march=native``, or
``-march=$OPTAX_MTL_MARCH`` where that is set (``x86-64-v3`` builds the AVX2
form on a processor with AVX-512, for a cache shared with older machines).
Without a compiler, or with ``OPTAX_MTL_NATIVE=0``, the engine keeps its
pure-JAX CPU form: same results, slower. :func:`status` says which is in use and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Any, Sequence

import jax
import jax.numpy as jnp

_HERE = pathlib.Path(__file__).parent
_SOURCES = (_HERE / "products.cc", _HERE / "convolutions.cc")
_HEADERS = (_HERE / "parallel.h",)
_GRAMIAN = "optax_mtl_gramian"
_CROSS = "optax_mtl_cross"
CONVOLUTION = "optax_mtl_convolution"
CONVOLUTION_INPUT_GRADIENT = "optax_mtl_convolution_input_gradient"
CONVOLUTION_KERNEL_GRADIENT = "optax_mtl_convolution_kernel_gradient"
# Target names and the handlers' symbols in the library.
_TARGETS = {
    _GRAMIAN: "OptaxMtlGramian",
    _CROSS: "OptaxMtlCross",
    CONVOLUTION: "OptaxMtlConvolution",
    CONVOLUTION_INPUT_GRADIENT: "OptaxMtlConvolutionInputGradient",
    CONVOLUTION_KERNEL_GRADIENT: "OptaxMtlConvolutionKernelGradient",
}
_COMPILE_SECONDS = 300

_lock = threading.Lock()
_status: str | None = None
_library = None  # kept alive: XLA holds pointers into it
_convolution_lanes = 0


def status() -> str:
  """Whether the compiled CPU kernels are in use, and why not.

  The kernels compute the engine's Gramian and cross matrix of float32
  leaves, and the float32 ``NHWC``/``HWIO`` convolutions of the loss
  functions the gradient paths differentiate (``value_and_jacobian``,
  ``value_and_gramian``, the representation and one-backward paths...).
  ``"compiled: <path of the library>"`` when they are in use (followed by
  a note where the convolutions stay XLA's: on a processor without AVX,
  where the kernel has 4-float vectors and was not measured faster);
  otherwise
  ``"pure JAX: <reason>"`` (disabled by ``OPTAX_MTL_NATIVE=0``, no C++
  compiler, or the compiler's error): XLA's own contraction and
  convolutions, the same results up to float32 rounding, slower.
  The first call builds the library if it is not cached yet (a few
  seconds). Accelerators always use XLA's own operations.

  Returns:
    One line, for logs and bug reports.

  Example:
    >>> import optax_mtl as mtl
    >>> mtl.cpu_kernel_status().startswith(("compiled: ", "pure JAX: "))
    True
  """
  if _disabled():
    return "pure JAX: disabled by OPTAX_MTL_NATIVE=0"
  if not available() or convolutions_preferred():
    return _status
  return (f"{_status} (convolutions: XLA's own; the kernel's need AVX, "
          f"which this processor lacks)")


def _disabled() -> bool:
  return os.environ.get("OPTAX_MTL_NATIVE", "1") == "0"


def available() -> bool:
  """Whether the compiled kernel is registered (compiling it if needed)."""
  global _status
  if _disabled():
    return False
  with _lock:
    if _status is None:
      _status = _load()
    return _status.startswith("compiled")


def convolutions_preferred() -> bool:
  """Whether the gradient paths run float32 convolutions on the kernel.

  Where it was built with 8- or 16-float vectors (AVX, AVX-512): there
  its forward pass and gradients took less time than XLA:CPU's per layer
  of a small convnet, and the unrolled per-task Jacobian of that convnet
  less than XLA's (``benchmarks/convolutions.py``, on 2-core AMD EPYC
  machines with AVX2 and with AVX-512). Built with 4-float vectors (no
  AVX) it was not measured, and XLA's convolutions stay.
  """
  return available() and _convolution_lanes >= 8


def applies(leaves: Sequence[jax.Array], dtype, divisors: Sequence[Any]) -> bool:
  """Whether the engine's CPU products of ``leaves`` come from the kernel:
  float32 leaves accumulated in float32, on the first pass (no divisors: the
  rescue pass divides the leaves, which the blocked form does block by
  block), with the kernel available."""
  return (all(divisor is None for divisor in divisors)
          and jnp.dtype(dtype) == jnp.float32
          and all(leaf.dtype == jnp.float32 for leaf in leaves) and available())


def _cache_dir() -> pathlib.Path:
  configured = os.environ.get("OPTAX_MTL_CACHE_DIR")
  if configured:
    return pathlib.Path(configured)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  candidate = pathlib.Path(base) / "optax_mtl"
  try:
    candidate.mkdir(parents=True, exist_ok=True)
    if os.access(candidate, os.W_OK):
      return candidate
  except OSError:
    pass
  return pathlib.Path(tempfile.gettempdir()) / f"optax_mtl-{os.getuid()}"


def _processor() -> str:
  """The processor's model and features: a library built with -march=native
  for one machine must not be loaded on another sharing the cache."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [l for l in f if l.startswith(("model name", "flags", "Features"))]
    return "".join(sorted(set(lines)))
  except OSError:
    return platform.processor() + platform.machine()


def _march() -> str | None:
  """``$OPTAX_MTL_MARCH``, the target the user asked for, if any."""
  return os.environ.get("OPTAX_MTL_MARCH") or None


def _compile(compiler: str, output: pathlib.Path) -> None:
  output.parent.mkdir(parents=True, exist_ok=True)
  flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}"]
  # Unique per process: concurrent test workers may build the same library.
  partial = output.with_name(f"{output.name}.{os.getpid()}.{threading.get_ident()}")
  # A target the user named is built or refused; native falls back to the
  # compiler's default target where it cannot build for the host.
  march = _march()
  attempts = [flags + [f"-march={march}"]] if march else [flags + ["-march=native"], flags]
  for attempt in attempts:
    result = subprocess.run([compiler, *attempt, *map(str, _SOURCES), "-o", str(partial)],
                            capture_output=True, text=True, timeout=_COMPILE_SECONDS)
    if result.returncode == 0:
      os.replace(partial, output)
      return
  lines = result.stderr.strip().splitlines()
  errors = [line for line in lines if "error" in line] or lines[-1:]
  message = errors[0] if errors else f"{compiler} exited with {result.returncode}"
  if march:
    message = f"OPTAX_MTL_MARCH={march}: {message}"
  raise RuntimeError(message)


def _load() -> str:
  global _library, _convolution_lanes
  if not jax.ffi.include_dir() or not os.path.isdir(jax.ffi.include_dir()):
    return "pure JAX: this jaxlib ships no FFI headers"
  compiler = shutil.which(os.environ.get("CXX", "c++"))
  if compiler is None:
    return "pure JAX: no C++ compiler (set CXX to one)"
  try:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    key = hashlib.sha256("\0".join([
        *(path.read_text() for path in _SOURCES + _HEADERS), compiler, version,
        jax.__version__, _processor(), _march() or "native",
    ]).encode()).hexdigest()[:20]
    path = _cache_dir() / f"products-{key}.so"
    if not path.exists():
      _compile(compiler, path)
    library = ctypes.cdll.LoadLibrary(str(path))
    for target, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                  platform="cpu")
  except (OSError, RuntimeError, subprocess.SubprocessError) as error:
    return f"pure JAX: the kernel could not be built ({error})"
  _library = library
  _convolution_lanes = library.OptaxMtlConvolutionLanes()
  return f"compiled: {path}"


def require() -> None:
  # Registers the targets before a program using them is traced (a program
  # loaded from JAX's persistent cache needs them too).
  if not available():
    raise RuntimeError(f"the compiled CPU kernel is not available: {status()}")


@jax.custom_jvp
def gramian(a: jax.Array) -> jax.Array:
  """``a @ a.T`` for a [T, n] float32 matrix (requires :func:`available`)."""
  require()
  call = jax.ffi.ffi_call(_GRAMIAN, jax.ShapeDtypeStruct((a.shape[0],) * 2, jnp.float32),
                          vmap_method="sequential")
  return call(a)


@gramian.defjvp
def _gramian_jvp(primals, tangents):
  (a,), (da,) = primals, tangents
  half = jnp.matmul(a, da.T, precision="highest")
  return gramian(a), half + half.T


@jax.custom_jvp
def cross(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(a @ b.T, |a_t|^2, |b_s|^2)`` for [T, n] and [S, n] float32 matrices,
  from one read of each (requires :func:`available`)."""
  require()
  rows, cols = a.shape[0], b.shape[0]
  call = jax.ffi.ffi_call(_CROSS, jax.ShapeDtypeStruct((rows * cols + rows + cols,),
                                                       jnp.float32),
                          vmap_method="sequential")
  out = call(a, b)
  return (out[:rows * cols].reshape(rows, cols), out[rows * cols:rows * cols + rows],
          out[rows * cols + rows:])


@cross.defjvp
def _cross_jvp(primals, tangents):
  (a, b), (da, db) = primals, tangents
  highest = lambda x, y: jnp.matmul(x, y.T, precision="highest")
  tangent = (highest(da, b) + highest(a, db),
             2 * jnp.sum(a * da, axis=1), 2 * jnp.sum(b * db, axis=1))
  return cross(a, b), tangent
