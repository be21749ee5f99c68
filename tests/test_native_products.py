"""The compiled CPU kernel for the Gramian and cross matrix (engine/native.py).

Its products against float64 references on every tile and panel edge, its
derivatives, vmap and concurrent calls; the engine's use of it (and of the
pure-JAX form where it does not apply: other dtypes, the rescue pass, the
accelerator forms, OPTAX_MTL_NATIVE=0, no compiler), with the same results.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl as mtl
from compiler import needs_kernel
from optax_mtl._src.engine import cross as cross_engine
from optax_mtl._src.engine import native
from optax_mtl._src.engine import platform
from optax_mtl._src.engine import statistics


# Rows on both sides of the tile sizes (3 and 5), columns on both sides of
# the vector width, the panel (4096) and the split between threads.
SHAPES = [(1, 1), (1, 70_001), (2, 15), (3, 16), (4, 4097), (5, 8191), (6, 40_000),
          (7, 131_075), (11, 33), (40, 20_003), (64, 3000)]


def _matrix(seed, rows, columns):
  return np.random.default_rng(seed).standard_normal((rows, columns)).astype(np.float32)


def _relative(value, reference, scale):
  return np.max(np.abs(np.asarray(value, np.float64) - reference)) / scale


@needs_kernel
def test_paths_take_the_convolution_kernel_only_with_avx():
  with open("/proc/cpuinfo") as f:
    avx = " avx" in f.read()
  assert native.convolutions_preferred() == avx
  assert ("convolutions: XLA's own" in native.status()) == (not avx)


@needs_kernel
def test_kernel_is_built_where_a_compiler_exists():
  assert native.available(), native.status()
  assert native.status().startswith("compiled: ")


@needs_kernel
@pytest.mark.parametrize("rows,columns", SHAPES)
def test_gramian_matches_float64(rows, columns):
  a = _matrix(rows * 7 + columns, rows, columns)
  reference = a.astype(np.float64) @ a.T.astype(np.float64)
  g = np.asarray(jax.jit(native.gramian)(jnp.asarray(a)))
  assert g.dtype == np.float32 and g.shape == (rows, rows)
  np.testing.assert_array_equal(g, g.T)
  assert _relative(g, reference, np.max(np.diag(reference))) < 1e-6


@needs_kernel
@pytest.mark.parametrize("rows,columns", SHAPES)
def test_cross_matches_float64(rows, columns):
  a = _matrix(columns, rows, columns)
  b = _matrix(columns + 1, rows + 2, columns)
  c, norms_a, norms_b = jax.jit(native.cross)(jnp.asarray(a), jnp.asarray(b))
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  scale = np.sqrt(np.max(np.sum(a64**2, 1)) * np.max(np.sum(b64**2, 1)))
  assert c.shape == (rows, rows + 2)
  assert _relative(c, a64 @ b64.T, scale) < 1e-6
  assert _relative(norms_a, np.sum(a64**2, 1), np.max(np.sum(a64**2, 1))) < 1e-6
  assert _relative(norms_b, np.sum(b64**2, 1), np.max(np.sum(b64**2, 1))) < 1e-6


@needs_kernel
def test_empty_columns_give_zeros():
  g = native.gramian(jnp.zeros((3, 0), jnp.float32))
  c, na, nb = native.cross(jnp.zeros((3, 0), jnp.float32), jnp.zeros((2, 0), jnp.float32))
  assert not np.any(g) and not np.any(c) and not np.any(na) and not np.any(nb)
  assert g.shape == (3, 3) and c.shape == (3, 2)


@needs_kernel
def test_derivatives_and_vmap_match_the_dot():
  a = jnp.asarray(_matrix(0, 4, 5000))
  b = jnp.asarray(_matrix(1, 3, 5000))
  weights = jnp.asarray(_matrix(2, 4, 4))
  dot = lambda x, y: jnp.matmul(x, y.T, precision="highest")
  loss = lambda f: lambda x: jnp.sum(weights * f(x))
  np.testing.assert_allclose(jax.grad(loss(native.gramian))(a),
                             jax.grad(loss(lambda x: dot(x, x)))(a), rtol=1e-5, atol=1e-3)
  _, tangent = jax.jvp(lambda x, y: native.cross(x, y), (a, b), (b[:1] + a, 2 * b))
  _, expected = jax.jvp(lambda x, y: (dot(x, y), jnp.sum(x * x, 1), jnp.sum(y * y, 1)),
                        (a, b), (b[:1] + a, 2 * b))
  for got, want in zip(tangent, expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-2)
  stacked = jnp.stack([a, 2 * a, -a])
  np.testing.assert_allclose(jax.vmap(native.gramian)(stacked),
                             jnp.stack([native.gramian(x) for x in stacked]), rtol=1e-6)


@needs_kernel
def test_concurrent_calls_are_independent():
  matrices = [jnp.asarray(_matrix(seed, 10, 200_000)) for seed in range(8)]
  call = jax.jit(native.gramian)
  expected = [np.asarray(call(m)) for m in matrices]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    got = list(pool.map(lambda m: np.asarray(call(m)), matrices * 3))
  for i, g in enumerate(got):
    np.testing.assert_array_equal(g, expected[i % len(matrices)])


def _big_grads(dtype=jnp.float32, scale=1.0):
  columns = 4 * statistics.CPU_CHUNK + 123
  key_a, key_b = jax.random.split(jax.random.key(3))
  return {"w": (scale * jax.random.normal(key_a, (6, columns))).astype(dtype),
          "b": (scale * jax.random.normal(key_b, (6, 9))).astype(dtype)}


def _custom_calls(fn, *args):
  return jax.jit(fn).lower(*args).as_text().count("optax_mtl_")


@needs_kernel
def test_engine_uses_the_kernel_for_float32_only():
  grads = _big_grads()
  assert _custom_calls(mtl.gramian, grads) == 1
  assert _custom_calls(lambda g: cross_engine.cross_gramian(g, g), grads) == 1
  assert _custom_calls(mtl.gramian, _big_grads(jnp.bfloat16)) == 0
  with platform.accelerator_forms():
    assert _custom_calls(mtl.gramian, grads) == 0


@needs_kernel
@pytest.mark.parametrize("scale", [1.0, 1e20, 1e-20])
def test_engine_results_match_the_accelerator_forms(scale):
  grads = _big_grads(scale=scale)
  other = jax.tree.map(lambda g: g[::-1] + 0.5 * g, grads)
  results = []
  for accelerator in (False, True):
    if accelerator:
      with platform.accelerator_forms():
        g, c = jax.jit(mtl.gramian)(grads), jax.jit(cross_engine.cross_gramian)(grads, other)
    else:
      g, c = jax.jit(mtl.gramian)(grads), jax.jit(cross_engine.cross_gramian)(grads, other)
    results.append((g, c))
  (g, c), (g_ref, c_ref) = results
  # Out-of-range products (scale 1e20 overflows, 1e-20 underflows) are
  # recomputed by the rescue pass; both forms give the matrix in range.
  np.testing.assert_allclose(g.scale, g_ref.scale, rtol=1e-5)
  np.testing.assert_allclose(g.normalized, g_ref.normalized, atol=1e-6)
  np.testing.assert_allclose(c.normalized, c_ref.normalized, atol=1e-6)
  np.testing.assert_allclose(c.first_scale, c_ref.first_scale, rtol=1e-5)


@needs_kernel
def test_non_finite_gradients_give_what_the_dot_gives():
  grads = _big_grads()
  grads["w"] = grads["w"].at[2, 5].set(jnp.inf).at[4, 9].set(jnp.nan)
  g = jax.jit(native.gramian)(grads["w"])
  dot = jnp.matmul(grads["w"], grads["w"].T, precision="highest")
  np.testing.assert_array_equal(np.isfinite(g), np.isfinite(dot))
  np.testing.assert_array_equal(np.isnan(g), np.isnan(dot))


_CHILD = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    import optax_mtl as mtl
    from optax_mtl._src.engine import native, statistics
    jax.config.update("jax_platforms", "cpu")
    w = jax.random.normal(jax.random.key(0), (5, 4 * statistics.CPU_CHUNK + 7))
    text = jax.jit(mtl.gramian).lower({"w": w}).as_text()
    g = mtl.gramian({"w": w})
    ref = np.asarray(w, np.float64) @ np.asarray(w, np.float64).T
    err = np.max(np.abs(np.asarray(g.normalized) * float(g.scale) ** 2 - ref)) / ref.max()
    print(native.status())
    print("custom calls", text.count("optax_mtl_"), "error ok", err < 1e-6)
""")


_MARCH_CHILD = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax import lax
    import optax_mtl as mtl
    from optax_mtl._src.engine import convolution, native
    jax.config.update("jax_platforms", "cpu")
    print(native.status())
    x = jax.random.normal(jax.random.key(0), (3, 9, 7, 5))
    w = jax.random.normal(jax.random.key(1), (3, 3, 5, 21))
    pads = ((1, 1), (0, 2))
    kernel = jax.jit(lambda x, w: convolution.convolution(x, w, (2, 1), pads))(x, w)
    ref = lax.conv_general_dilated(x, w, (2, 1), pads,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   precision="highest")
    err = float(jnp.max(jnp.abs(kernel - ref)) / jnp.max(jnp.abs(ref)))
    print(native._convolution_lanes, native.convolutions_preferred(), err < 1e-5)
""")


@needs_kernel
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 targets")
def test_a_named_target_builds_its_vector_width(tmp_path):
  # The baseline x86-64 target: 4-float vectors, on which the paths keep
  # XLA's convolutions, while the kernel still computes them right.
  env = {**os.environ, "OPTAX_MTL_CACHE_DIR": str(tmp_path), "OPTAX_MTL_MARCH": "x86-64"}
  result = subprocess.run([sys.executable, "-c", _MARCH_CHILD], env=env,
                          capture_output=True, text=True, timeout=300, check=True)
  status, checks = result.stdout.strip().splitlines()[-2:]
  assert status.startswith("compiled: "), status
  assert status.endswith("(convolutions: XLA's own; the kernel's need AVX, which "
                         "this processor lacks)")
  assert checks == "4 False True"


@needs_kernel
def test_a_target_the_compiler_refuses_is_reported(tmp_path):
  env = {**os.environ, "OPTAX_MTL_CACHE_DIR": str(tmp_path),
         "OPTAX_MTL_MARCH": "no-such-target"}
  result = subprocess.run([sys.executable, "-c", _MARCH_CHILD.split("x = ")[0]], env=env,
                          capture_output=True, text=True, timeout=300, check=True)
  status = result.stdout.strip().splitlines()[-1]
  assert status.startswith("pure JAX: the kernel could not be built ("), status
  assert "no-such-target" in status


@pytest.mark.parametrize("environment,expected", [
    ({"OPTAX_MTL_NATIVE": "0"}, "pure JAX: disabled by OPTAX_MTL_NATIVE=0"),
    ({"CXX": "no-such-compiler"}, "pure JAX: no C++ compiler (set CXX to one)"),
])
def test_pure_jax_form_without_the_kernel(environment, expected, tmp_path):
  env = {**os.environ, "OPTAX_MTL_CACHE_DIR": str(tmp_path), **environment}
  result = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                          text=True, timeout=300, check=True)
  status, calls = result.stdout.strip().splitlines()[-2:]
  assert status == expected
  assert calls == "custom calls 0 error ok True"
  assert not list(tmp_path.iterdir())
