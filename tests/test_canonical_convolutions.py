"""The CPU loop bodies' convolution rewrite: same values, the fast layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import convnets
import optax_mtl as mtl
from compiler import kernel_convolutions  # noqa: F401  (a fixture)
from compiler import needs_kernel
from optax_mtl._src.paths import canonical_convolutions

# (input shape, kernel shape, dimension numbers, strides, padding, lhs
# dilation, rhs dilation, feature groups): 1-D to 3-D, NCHW/OIHW layouts,
# strides, dilations, groups.
CASES = [
    ((2, 7, 9, 3), (3, 3, 3, 4), ("NHWC", "HWIO", "NHWC"), (1, 1), "SAME", None, None, 1),
    ((2, 4, 9, 11), (6, 2, 3, 2), ("NCHW", "OIHW", "NCHW"), (2, 1), ((1, 0), (2, 1)),
     (1, 2), (2, 1), 2),
    ((3, 10, 2), (3, 2, 5), ("NWC", "WIO", "NWC"), (2,), "VALID", None, (2,), 1),
    ((1, 2, 5, 4, 6), (2, 2, 3, 2, 4), ("NCDHW", "OIDHW", "NDHWC"), (1, 1, 2), "SAME",
     None, None, 1),
]


def _conv(case):
  _, _, numbers, strides, padding, lhs_dilation, rhs_dilation, groups = case

  def conv(kernel, x):
    return lax.conv_general_dilated(
        x, kernel, strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=numbers,
        feature_group_count=groups)
  return conv


@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
def test_forward_jvp_and_both_gradients_unchanged(case):
  conv = _conv(case)
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], case[0])
  kernel = jax.random.normal(keys[1], case[1])
  out, vjp = jax.vjp(conv, kernel, x)
  cotangent = jax.random.normal(keys[2], out.shape)

  def every_form(c):
    # The forward pass inside a jitted call: rewritten after inlining.
    forward = jax.jit(conv)(kernel, x)
    tangent = jax.jvp(lambda k: conv(k, x), (kernel,), (2.0 * kernel,))[1]
    return forward, tangent, vjp(c)

  want = every_form(cotangent)
  for got in (canonical_convolutions.canonical(every_form)(cotangent),
              jax.jit(canonical_convolutions.canonical(every_form))(cotangent)):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert a.shape == b.shape and a.dtype == b.dtype
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_loop_body_holds_the_batch_spatial_feature_form(monkeypatch):
  # Without the compiled kernel: XLA's convolutions, in the fast order.
  monkeypatch.setenv("OPTAX_MTL_NATIVE", "0")
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  kernel = jax.random.normal(jax.random.key(2), (3, 3, 3, 5))
  conv = lambda k: lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
  _, vjp = jax.vjp(conv, kernel)
  cotangents = jax.random.normal(jax.random.key(3), (3, 4, 8, 8, 5))
  kernel_grads = lambda c: vjp(c)[0]

  def labels(fn):
    text = jax.jit(lambda c: lax.map(fn, c)).lower(cotangents).compile().as_text()
    return {line.split("dim_labels=")[1].split(",")[0]
            for line in text.splitlines() if " convolution(" in line}

  # The kernel gradient as JAX differentiates it: input features as the
  # batch; rewritten, every convolution is batch-spatial-feature.
  assert labels(kernel_grads) != {"b01f_01io->b01f"}
  assert labels(canonical_convolutions.canonical(kernel_grads)) == {"b01f_01io->b01f"}
  np.testing.assert_allclose(
      canonical_convolutions.loop_map(kernel_grads, cotangents),
      lax.map(kernel_grads, cotangents), rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.usefixtures("kernel_convolutions")
def test_loop_body_convolutions_run_on_the_kernel():
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  kernel = jax.random.normal(jax.random.key(2), (3, 3, 3, 5))
  # NCHW: rewritten to the kernel's order first, then to the kernel (the
  # kernel gradient JAX derived is a convolution of its own).
  conv = lambda k: lax.conv_general_dilated(x.transpose(0, 3, 1, 2), k, (1, 1), "SAME",
                                            dimension_numbers=("NCHW", "HWIO", "NCHW"))
  _, vjp = jax.vjp(conv, kernel)
  cotangents = jax.random.normal(jax.random.key(3), (3, 4, 5, 8, 8))
  kernel_grads = lambda c: vjp(c)[0]
  rewritten = jax.jit(lambda c: lax.map(canonical_convolutions.canonical(kernel_grads), c))
  text = rewritten.lower(cotangents).compile().as_text()
  assert '"optax_mtl_convolution"' in text
  assert " convolution(" not in text
  np.testing.assert_allclose(rewritten(cotangents), lax.map(kernel_grads, cotangents),
                             rtol=1e-5, atol=1e-4)


def test_lean_and_chunked_paths_on_a_convnet_match_the_stacked_path():
  params, x = convnets.problem()
  losses, task_grads = mtl.value_and_jacobian(convnets.losses)(params, x)
  _, chunked = jax.jit(mtl.value_and_jacobian(convnets.losses, chunk_size=2))(params, x)
  for a, b in zip(jax.tree.leaves(chunked), jax.tree.leaves(task_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  lean_losses, gram = jax.jit(mtl.value_and_gramian(convnets.losses))(params, x)
  stacked = mtl.gramian(task_grads)
  np.testing.assert_allclose(lean_losses, losses, rtol=1e-6)
  np.testing.assert_allclose(gram.normalized, stacked.normalized, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gram.scale, stacked.scale, rtol=1e-5)
