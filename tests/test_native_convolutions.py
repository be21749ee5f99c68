"""The compiled CPU convolutions (engine/convolution.py, convolutions.cc).

The three kernels (the convolution, its input gradient, its kernel
gradient) against float64 references over strides, paddings, kernel sizes
and channel counts on both sides of the register tiles; derivatives to the
second order in both modes, vmap of either operand and both; the gradient
paths' rewrite of a loss function's convolutions (what it covers, what it
leaves to XLA, the accelerator forms, OPTAX_MTL_NATIVE=0) and the paths'
results with it against the accelerator forms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import convnets
import optax_mtl as mtl
from compiler import kernel_convolutions  # noqa: F401  (a fixture)
from compiler import needs_kernel
from optax_mtl._src.engine import convolution
from optax_mtl._src.engine import platform
from optax_mtl._src.paths import canonical_convolutions

pytestmark = [needs_kernel, pytest.mark.usefixtures("kernel_convolutions")]

NHWC = ("NHWC", "HWIO", "NHWC")

# (batch, height, width, in channels, out channels, kernel h, kernel w,
# strides, padding): channels below, at and above the vector (16 lanes)
# and tile (6 pixels, 4 vectors) sizes; strides beyond the kernel; padding
# asymmetric, zero, and beyond the kernel.
GEOMETRIES = [
    (2, 5, 7, 3, 5, 3, 3, (1, 1), ((1, 1), (1, 1))),
    (3, 8, 8, 17, 33, 3, 3, (2, 2), ((1, 1), (1, 1))),
    (2, 9, 6, 4, 20, 3, 2, (2, 3), ((0, 2), (1, 0))),
    (1, 4, 4, 70, 19, 1, 1, (1, 1), ((0, 0), (0, 0))),
    (2, 6, 6, 5, 7, 5, 5, (3, 1), ((2, 2), (0, 1))),
    (2, 3, 3, 2, 3, 3, 3, (4, 4), ((1, 1), (1, 1))),
    (1, 11, 13, 16, 64, 3, 3, (1, 1), ((1, 1), (1, 1))),
    (2, 7, 7, 8, 130, 3, 3, (2, 2), ((0, 1), (0, 1))),
    (1, 5, 5, 1, 1, 2, 2, (1, 1), ((3, 4), (0, 3))),
]


def _operands(geometry, seed=0):
  b, h, w, c, n, kh, kw, strides, padding = geometry
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((b, h, w, c)).astype(np.float32)
  k = rng.standard_normal((kh, kw, c, n)).astype(np.float32)
  return x, k, strides, padding


def _xla(x, k, strides, padding):
  return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=NHWC,
                                  precision="highest")


def _assert_close(got, want):
  want = np.asarray(want, np.float64)
  got = np.asarray(got)
  assert got.shape == want.shape and got.dtype == np.float32
  scale = max(float(np.max(np.abs(want))), 1e-30) if want.size else 1.0
  assert np.max(np.abs(got - want), initial=0.0) / scale < 2e-6


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=range(len(GEOMETRIES)))
def test_kernels_match_float64(geometry):
  x, k, strides, padding = _operands(geometry)
  with jax.enable_x64():
    x64, k64 = jnp.asarray(x, jnp.float64), jnp.asarray(k, jnp.float64)
    out64, vjp64 = jax.vjp(lambda a, b: _xla(a, b, strides, padding), x64, k64)
    g = np.random.default_rng(1).standard_normal(out64.shape)
    dx64, dk64 = vjp64(jnp.asarray(g))
  conv = jax.jit(lambda a, b: convolution.convolution(a, b, strides, padding))
  out, vjp = jax.vjp(conv, jnp.asarray(x), jnp.asarray(k))
  dx, dk = jax.jit(vjp)(jnp.asarray(g, jnp.float32))
  _assert_close(out, out64)
  _assert_close(dx, dx64)
  _assert_close(dk, dk64)


# The first three, and one whose 64 output channels fill whole vectors (vmap
# over the output gradients then stacks them along the kernel's batch).
@pytest.mark.parametrize("geometry", GEOMETRIES[:3] + GEOMETRIES[6:7], ids=[0, 1, 2, 6])
def test_derivatives_and_batching_match_xla(geometry):
  x, k, strides, padding = _operands(geometry)
  x, k = jnp.asarray(x), jnp.asarray(k)
  native = lambda a, b: convolution.convolution(a, b, strides, padding)
  xla = lambda a, b: _xla(a, b, strides, padding)
  g = jax.random.normal(jax.random.key(2), xla(x, k).shape)

  def forms(conv):
    return {
        "eager": conv(x, k),
        "jvp": jax.jvp(conv, (x, k), (2 * x, -k))[1],
        "vjp": jax.vjp(conv, x, k)[1](g),
        # Second order, reverse over reverse and forward over reverse.
        "hessian": jax.grad(lambda b: jnp.sum(jax.grad(
            lambda a: jnp.sum(conv(a, b) ** 2))(x) ** 2))(k),
        "hvp": jax.jvp(jax.grad(lambda b: jnp.sum(jnp.sin(conv(x, b)))), (k,), (k,))[1],
        "vmap images": jax.vmap(conv, (0, None))(jnp.stack([x, -2 * x]), k),
        "vmap kernels": jax.vmap(conv, (None, 0))(x, jnp.stack([k, 3 * k])),
        "vmap both": jax.vmap(conv)(jnp.stack([x, x]), jnp.stack([k, -k])),
        "vmap cotangents": jax.vmap(jax.vjp(conv, x, k)[1])(jnp.stack([g, 0.5 * g])),
        "vmap of vmap cotangents": jax.vmap(jax.vmap(jax.vjp(conv, x, k)[1]))(
            jnp.stack([jnp.stack([g, 0.5 * g, -g])] * 2)),
        # Derivatives of a Jacobian: through the stacked kernel gradients, in
        # the images and in the cotangents.
        "derivatives of vmapped cotangents": jax.grad(
            lambda a, cts: jnp.sum(jnp.cos(jax.vmap(jax.vjp(conv, a, k)[1])(cts)[1])),
            argnums=(0, 1))(x, jnp.stack([g, 0.5 * g])),
        "vmap of vjp of kernels": jax.vmap(
            lambda b: jax.vjp(conv, x, b)[1](g))(jnp.stack([k, -k])),
        "linear transpose": jax.linear_transpose(
            lambda a: conv(a, k), jax.ShapeDtypeStruct(x.shape, x.dtype))(g),
    }

  want = forms(xla)
  got = forms(native)
  for name in want:
    for a, b in zip(jax.tree.leaves(got[name]), jax.tree.leaves(want[name])):
      assert a.shape == b.shape, name
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))),
                                 err_msg=name)


def test_empty_operands_give_zeros():
  conv = jax.jit(lambda a, b: convolution.convolution(a, b, (1, 1), ((1, 1), (1, 1))))
  out, vjp = jax.vjp(conv, jnp.ones((2, 4, 4, 0)), jnp.ones((3, 3, 0, 5)))
  assert out.shape == (2, 4, 4, 5) and not np.any(out)
  dx, dk = vjp(jnp.ones(out.shape))
  assert dx.shape == (2, 4, 4, 0) and dk.shape == (3, 3, 0, 5)
  assert conv(jnp.ones((0, 4, 4, 3)), jnp.ones((3, 3, 3, 5))).shape == (0, 4, 4, 5)


def test_non_finite_inputs_give_what_xla_gives():
  x, k, strides, padding = _operands(GEOMETRIES[1])
  x[1, 2, 3, 4] = np.nan
  x[2, 5, 0, 0] = np.inf
  got = convolution.convolution(jnp.asarray(x), jnp.asarray(k), strides, padding)
  want = _xla(jnp.asarray(x), jnp.asarray(k), strides, padding)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  assert np.isnan(got).any()


def _custom_calls(fn, *args):
  text = jax.jit(fn).lower(*args).compile().as_text()
  return {name for name in ("optax_mtl_convolution", "optax_mtl_convolution_input_gradient",
                            "optax_mtl_convolution_kernel_gradient")
          if f'"{name}"' in text}, text.count(" convolution(")


def _jacobian(params, x):
  return mtl.value_and_jacobian(convnets.losses)(params, x)


def test_paths_run_their_convolutions_on_the_kernel():
  params, x = convnets.problem()
  calls, xla_convolutions = _custom_calls(_jacobian, params, x)
  assert calls == {"optax_mtl_convolution", "optax_mtl_convolution_input_gradient",
                   "optax_mtl_convolution_kernel_gradient"}
  assert xla_convolutions == 0


def test_accelerator_forms_and_the_switch_keep_xla_convolutions(monkeypatch):
  params, x = convnets.problem()
  with platform.accelerator_forms():
    assert _custom_calls(_jacobian, params, x)[0] == set()
  monkeypatch.setenv("OPTAX_MTL_NATIVE", "0")
  calls, xla_convolutions = _custom_calls(_jacobian, params, x)
  assert calls == set() and xla_convolutions > 0


@pytest.mark.parametrize("what", ["groups", "dilation", "bfloat16", "negative padding"])
def test_convolutions_the_kernel_does_not_cover_stay_xla(what):
  x = jnp.ones((2, 8, 8, 4), jnp.bfloat16 if what == "bfloat16" else jnp.float32)
  k = jnp.ones((3, 3, 2 if what == "groups" else 4, 6), x.dtype)

  def loss(kernel):
    out = lax.conv_general_dilated(
        x, kernel, (1, 1), ((-1, 1), (1, 1)) if what == "negative padding" else "SAME",
        rhs_dilation=(2, 2) if what == "dilation" else None, dimension_numbers=NHWC,
        feature_group_count=2 if what == "groups" else 1)
    return jnp.sum(out.astype(jnp.float32))

  rewritten = canonical_convolutions.native(jax.grad(loss))
  calls, xla_convolutions = _custom_calls(rewritten, k)
  assert calls == set() and xla_convolutions > 0
  np.testing.assert_array_equal(rewritten(k), jax.grad(loss)(k))


def test_rewrite_keeps_outputs_that_are_not_arrays():
  params, x = convnets.problem()
  fn = lambda p: (convnets.losses(p, x), ("note", 3, None))
  losses, aux = canonical_convolutions.native(fn)(params)
  assert aux == ("note", 3, None)
  np.testing.assert_allclose(losses, convnets.losses(params, x), rtol=1e-5)


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(3, 8, (3, 3), strides=2, rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, (3, 3), rngs=rngs)
    self.head = nnx.Linear(16, 2, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
    return self.head(h.mean(axis=(1, 2)))


def test_flax_convolutions_are_covered_and_paths_agree_with_the_accelerator_forms():
  model = _Net(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 9, 9, 3))
  y = jax.random.normal(jax.random.key(2), (4, 2))
  losses_fn = lambda m: jnp.mean((m(x) - y) ** 2, axis=0)
  params, images = convnets.problem()

  def encoder_fn(convs, inputs):
    h = inputs
    for kernel in convs:
      h = jax.nn.relu(lax.conv_general_dilated(h, kernel, (2, 2), "SAME",
                                               dimension_numbers=NHWC))
    return jnp.mean(h, axis=(1, 2))

  heads_fn = lambda head, z: jnp.mean((z @ head) ** 2, axis=0)
  upgrad = mtl.upgrad()
  uncertainty = mtl.scale_by_uncertainty(num_tasks=2)

  def run():
    return {
        "jacobian": mtl.value_and_jacobian(losses_fn)(model),
        "jacobian, chunked": mtl.value_and_jacobian(losses_fn, chunk_size=1)(model),
        "lean, forward mode": mtl.value_and_gramian(losses_fn)(model),
        "lean, reverse mode": mtl.value_and_gramian(losses_fn, chunk_size=None)(model),
        "gramian grad": mtl.value_and_gramian_grad(losses_fn, upgrad)(
            upgrad.init(None), model)[:2],
        "weighted": mtl.value_and_weighted_grad(losses_fn, uncertainty)(
            uncertainty.init(None), model)[:2],
        "representation": mtl.value_and_representation_grad(encoder_fn, heads_fn, upgrad)(
            upgrad.init(None), params["convs"], params["head"], images)[:2],
    }

  calls, _ = _custom_calls(lambda m: mtl.value_and_jacobian(losses_fn)(m)[1], model)
  assert "optax_mtl_convolution_kernel_gradient" in calls
  got = run()
  with platform.accelerator_forms():
    want = run()
  for name in want:
    got_leaves, want_leaves = jax.tree.leaves(got[name]), jax.tree.leaves(want[name])
    assert len(got_leaves) == len(want_leaves) > 0
    for a, b in zip(got_leaves, want_leaves):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5,
                                 atol=2e-6 * max(1.0, float(np.max(np.abs(b)))),
                                 err_msg=name)


# Output channels in whole vectors or not; 200 input channels make the
# kernel sum its columns in several panels.
@pytest.mark.parametrize("inputs,channels", [(4, 5), (4, 32), (200, 32)])
def test_stacked_kernel_gradients_on_every_lowering(inputs, channels):
  # Three output gradients of the same images stacked along the batch give
  # their kernel gradients side by side, on the CPU kernel and in the form
  # other backends lower to.
  x, k, strides, padding = _operands((2, 7, 6, inputs, channels, 3, 3, (2, 1),
                                      ((1, 1), (0, 1))))
  x = jnp.asarray(x)
  out_shape = _xla(x, jnp.asarray(k), strides, padding).shape
  g = jax.random.normal(jax.random.key(3), (3, *out_shape))
  vjp = jax.vjp(lambda w: _xla(x, w, strides, padding), jnp.asarray(k))[1]
  want = jax.vmap(lambda g: vjp(g)[0])(g)
  want = jnp.moveaxis(want, 0, 3).reshape(*k.shape[:3], 3 * channels)
  params = dict(strides=strides, padding=padding, precision=None, kernel_hw=k.shape[:2])
  stacked = g.reshape(-1, *g.shape[2:])
  cpu = jax.jit(lambda x, g: convolution._kernel_gradient_p.bind(x, g, **params))(x, stacked)
  portable = jax.jit(lambda x, g: convolution._portable_kernel_gradient(x, g, **params))(
      x, stacked)
  for got in (cpu, portable):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))
