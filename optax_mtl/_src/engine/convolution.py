"""Two-dimensional float32 convolutions with a compiled CPU kernel.

:func:`convolution` is ``lax.conv_general_dilated`` in ``NHWC``/``HWIO``/
``NHWC`` order (no dilation, no groups, non-negative padding), bound as a
primitive whose derivatives are the two other primitives here: the gradient
with respect to the input and the one with respect to the kernel, each
bilinear, so that forward and reverse differentiation to any order stay
among the three. On CPU all three run ``convolutions.cc`` (see
``native.py``), faster than XLA:CPU's convolutions at the sizes of a
small convnet's layers with AVX or AVX-512 (``benchmarks/convolutions.py``),
and the gradient paths use it there; on other backends they lower to the
same ``lax`` convolutions JAX would emit, so an accelerator program is
unchanged.

The gradient paths rewrite the convolutions of a loss function to this
form when they differentiate it on CPU (``paths/canonical_convolutions``):
the per-task backward passes are convolutions.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core
from jax.interpreters import ad
from jax.interpreters import batching
from jax.interpreters import mlir

from optax_mtl._src.engine import native
from optax_mtl._src.engine import platform

_NUMBERS = ("NHWC", "HWIO", "NHWC")
_CANONICAL = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                      out_spec=(0, 3, 1, 2))


def in_use() -> bool:
  """Whether CPU programs take the kernel: built with AVX or AVX-512
  (``native.convolutions_preferred``) and outside
  ``platform.accelerator_forms``."""
  return not platform.accelerator_forms_active() and native.convolutions_preferred()


def supported(lhs, rhs, params: dict) -> bool:
  """Whether a ``conv_general_dilated`` equation's ``params`` on ``lhs`` and
  ``rhs`` should run as :func:`convolution` on CPU (:func:`in_use`).

  Not under a mesh: XLA cannot partition the kernel's call, it would gather
  sharded operands onto every device.
  """
  return (params["dimension_numbers"] == _CANONICAL
          and jax.sharding.get_abstract_mesh().empty
          and lhs.ndim == 4 and rhs.ndim == 4
          and lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
          and params.get("preferred_element_type") in (None, jnp.float32)
          and params["feature_group_count"] == 1 and params["batch_group_count"] == 1
          and all(d == 1 for d in params["lhs_dilation"])
          and all(d == 1 for d in params["rhs_dilation"])
          and all(lo >= 0 and hi >= 0 for lo, hi in params["padding"])
          and in_use())


def convolution(x: jax.Array, w: jax.Array, strides: Sequence[int],
                padding: Sequence[tuple[int, int]], precision: Any = None) -> jax.Array:
  """``lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=
  ("NHWC", "HWIO", "NHWC"), precision=precision)`` for float32 ``x`` and
  ``w``; on CPU the compiled kernel (``precision`` is then float32's own)."""
  return _forward_p.bind(x, w, **_params(strides, padding, precision))


def _params(strides, padding, precision) -> dict:
  return dict(strides=tuple(int(s) for s in strides),
              padding=tuple((int(lo), int(hi)) for lo, hi in padding),
              precision=precision)


# The portable definitions: what accelerators run, and the reference.

def _portable_forward(x, w, *, strides, padding, precision):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NUMBERS,
                                  precision=precision)


def _portable_input_gradient(g, w, *, strides, padding, precision, input_hw):
  shape = jax.ShapeDtypeStruct((g.shape[0], *input_hw, w.shape[2]), g.dtype)
  (dx,) = jax.linear_transpose(
      lambda x: _portable_forward(x, w, strides=strides, padding=padding,
                                  precision=precision), shape)(g)
  return dx


def _portable_kernel_gradient(x, g, *, strides, padding, precision, kernel_hw):
  shape = jax.ShapeDtypeStruct((*kernel_hw, x.shape[3], g.shape[3]), g.dtype)
  transpose = jax.linear_transpose(
      lambda w: _portable_forward(x, w, strides=strides, padding=padding,
                                  precision=precision), shape)
  groups = _groups(x.shape, g.shape)
  if groups == 1:
    return transpose(g)[0]
  dw = jax.vmap(lambda g: transpose(g)[0])(g.reshape(groups, x.shape[0], *g.shape[1:]))
  return _channels_last(dw, 3)


def _output_size(size, window, stride, low, high):
  return max(0, (size + low + high - window) // stride + 1)


def _forward_shape(x, w, strides, padding):
  return (x.shape[0],
          *(_output_size(x.shape[1 + i], w.shape[i], strides[i], *padding[i])
            for i in range(2)), w.shape[3])


def _abstract_forward(x, w, *, strides, padding, precision):
  return jax.core.ShapedArray(_forward_shape(x, w, strides, padding), jnp.float32)


def _abstract_input_gradient(g, w, *, strides, padding, precision, input_hw):
  return jax.core.ShapedArray((g.shape[0], *input_hw, w.shape[2]), jnp.float32)


def _abstract_kernel_gradient(x, g, *, strides, padding, precision, kernel_hw):
  groups = _groups(x.shape, g.shape)
  if groups < 1 or g.shape[0] != groups * x.shape[0]:
    raise ValueError(f"kernel gradient: the output gradient's batch {g.shape[0]} must "
                     f"be a positive multiple of the images' {x.shape[0]}")
  return jax.core.ShapedArray((*kernel_hw, x.shape[3], groups * g.shape[3]), jnp.float32)


# The kernel gradient takes `groups` output gradients of the same images,
# stacked along the batch ([groups * B, oh, ow, n]), and gives their kernel
# gradients side by side along the output channels (column k * n + j for
# channel j of group k): what vmap over the output gradient makes of it,
# with no transposed copy of the gradients.

def _groups(x_shape, g_shape) -> int:
  return g_shape[0] // x_shape[0] if x_shape[0] else 1


def _channels_last(stacked, axis):
  """[groups, ...] to the groups merged, outer, into axis ``axis`` (of the
  unstacked value), which is the last axis."""
  moved = jnp.moveaxis(stacked, 0, axis)
  return moved.reshape(*moved.shape[:axis], -1)


def _groups_into_batch(value, groups):
  """[B, oh, ow, groups * n] to [groups * B, oh, ow, n]."""
  b, h, w, c = value.shape
  return jnp.moveaxis(value.reshape(b, h, w, groups, c // groups), 3, 0).reshape(
      groups * b, h, w, c // groups)


def _groups_into_channels(value, groups):
  """[groups * B, oh, ow, n] to [B, oh, ow, groups * n]."""
  return _channels_last(value.reshape(groups, value.shape[0] // groups, *value.shape[1:]), 3)


# The kernels take their weight rows padded to whole vectors, and the kernel
# gradient one slot per thread, from XLA (whose memory accounting then sees
# every buffer); images and gradients are read in place, padding included.
_ROW_MULTIPLE = 16
_SLOTS_BYTES = 64 << 20


@functools.lru_cache(maxsize=1)
def _threads() -> int:
  """The CPUs this process may run on (XLA's intra-op pool has as many)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def _round_up(value):
  return -(-value // _ROW_MULTIPLE) * _ROW_MULTIPLE


def _pad_channels(a, size):
  return jnp.pad(a, [(0, 0)] * 3 + [(0, size - a.shape[3])])


def _kernel_call(target, shape, a, b, strides, padding):
  native.require()
  call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32))
  return call(a, b, stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
              pad_top=np.int64(padding[0][0]), pad_left=np.int64(padding[1][0]))


def _cpu_forward(x, w, *, strides, padding, precision):
  shape = _forward_shape(x, w, strides, padding)
  if 0 in shape or 0 in x.shape:
    return jnp.zeros(shape, jnp.float32)
  return _kernel_call(native.CONVOLUTION, shape, x, _pad_channels(w, _round_up(w.shape[3])),
                      strides, padding)


def _cpu_input_gradient(g, w, *, strides, padding, precision, input_hw):
  shape = (g.shape[0], *input_hw, w.shape[2])
  if 0 in shape or 0 in g.shape:
    return jnp.zeros(shape, jnp.float32)
  kernel = _pad_channels(w.transpose(0, 1, 3, 2), _round_up(w.shape[2]))
  return _kernel_call(native.CONVOLUTION_INPUT_GRADIENT, shape, g, kernel, strides, padding)


def _cpu_kernel_gradient(x, g, *, strides, padding, precision, kernel_hw):
  groups = _groups(x.shape, g.shape)
  shape = (*kernel_hw, x.shape[3], groups * g.shape[3])
  if 0 in shape or 0 in g.shape:
    return jnp.zeros(shape, jnp.float32)
  if groups > 1 and g.shape[3] % _ROW_MULTIPLE:
    # The kernel reads whole vectors of one group's channels; these take
    # the same columns as one gradient with the groups' channels side by side.
    g = _groups_into_channels(g, groups)
  wide = _round_up(shape[3])
  # Each thread sums its pixels into a slot of its own, up to the threads
  # and to _SLOTS_BYTES of slots.
  slots = max(1, min(_threads(), _SLOTS_BYTES // (4 * int(np.prod(shape[:3])) * wide)))
  out = _kernel_call(native.CONVOLUTION_KERNEL_GRADIENT, (slots, *shape[:3], wide), x, g,
                     strides, padding)
  return out[0, ..., :shape[3]]


def _primitive(name, abstract, cpu, portable):
  primitive = core.Primitive(name)
  primitive.def_abstract_eval(abstract)

  @functools.lru_cache(maxsize=256)
  def compiled(**params):
    return jax.jit(lambda a, b: primitive.bind(a, b, **params))

  primitive.def_impl(lambda a, b, **params: compiled(**params)(a, b))
  mlir.register_lowering(primitive, mlir.lower_fun(cpu, multiple_results=False),
                         platform="cpu")
  mlir.register_lowering(primitive, mlir.lower_fun(portable, multiple_results=False))
  return primitive


_forward_p = _primitive("optax_mtl_convolution", _abstract_forward, _cpu_forward,
                        _portable_forward)
_input_gradient_p = _primitive("optax_mtl_convolution_input_gradient",
                               _abstract_input_gradient, _cpu_input_gradient,
                               _portable_input_gradient)
_kernel_gradient_p = _primitive("optax_mtl_convolution_kernel_gradient",
                                _abstract_kernel_gradient, _cpu_kernel_gradient,
                                _portable_kernel_gradient)


PRIMITIVES = (_forward_p, _input_gradient_p, _kernel_gradient_p)


def _shape(value):
  # An operand being transposed is a placeholder that has only its aval.
  return value.aval.shape if hasattr(value, "aval") else jnp.shape(value)


def _conv_params(params):
  return {k: params[k] for k in ("strides", "padding", "precision")}


# Transposes. With y = conv(x, w): input_gradient(g, w) = dy/dx^T g and
# kernel_gradient(x, g) = dy/dw^T g, and each of those is the transpose of
# the others in its other argument.

def _forward_lhs(ct, x, w, **params):
  return _input_gradient_p.bind(ct, w, input_hw=tuple(_shape(x)[1:3]), **params)


def _forward_rhs(ct, x, w, **params):
  return _kernel_gradient_p.bind(x, ct, kernel_hw=tuple(_shape(w)[:2]), **params)


def _input_gradient_lhs(ct, g, w, *, input_hw, **params):
  return _forward_p.bind(ct, w, **params)


def _input_gradient_rhs(ct, g, w, *, input_hw, **params):
  return _kernel_gradient_p.bind(ct, g, kernel_hw=tuple(_shape(w)[:2]), **params)


def _kernel_gradient_lhs(ct, x, g, *, kernel_hw, **params):
  groups = _groups(_shape(x), _shape(g))
  if groups > 1:
    g = _groups_into_channels(g, groups)
  return _input_gradient_p.bind(g, ct, input_hw=tuple(_shape(x)[1:3]), **params)


def _kernel_gradient_rhs(ct, x, g, *, kernel_hw, **params):
  groups = _groups(_shape(x), _shape(g))
  out = _forward_p.bind(x, ct, **params)
  return _groups_into_batch(out, groups) if groups > 1 else out


ad.defbilinear(_forward_p, _forward_lhs, _forward_rhs)
ad.defbilinear(_input_gradient_p, _input_gradient_lhs, _input_gradient_rhs)
ad.defbilinear(_kernel_gradient_p, _kernel_gradient_lhs, _kernel_gradient_rhs)


# Batching: a mapped axis of one operand folds into an axis the kernel
# already has (images into the batch, maps of a kernel or of a gradient
# into its channels); with both operands mapped, one call per index.

def _fold(value, axis, into):
  """``value`` with mapped ``axis`` moved before axis ``into`` (of the
  unmapped value) and merged into it."""
  value = jnp.moveaxis(value, axis, into)
  shape = value.shape
  return value.reshape(shape[:into] + (shape[into] * shape[into + 1],) + shape[into + 2:])


def _unfold(value, size, axis):
  """Axis ``axis`` of ``value`` split into the mapped axis (of ``size``),
  which takes its place, and the original."""
  shape = value.shape
  return value.reshape(shape[:axis] + (size, shape[axis] // size) + shape[axis + 1:]), axis


def _each(primitive, a, b, a_axis, b_axis, params):
  size = a.shape[a_axis] if a_axis is not None else b.shape[b_axis]
  a = (jnp.moveaxis(a, a_axis, 0) if a_axis is not None
       else jnp.broadcast_to(a, (size, *a.shape)))
  b = (jnp.moveaxis(b, b_axis, 0) if b_axis is not None
       else jnp.broadcast_to(b, (size, *b.shape)))
  return lax.map(lambda ab: primitive.bind(*ab, **params), (a, b)), 0


def _folding(primitive, a_fold, b_fold):
  """The batching rule folding a mapped first operand into its axis
  ``a_fold[0]`` (out axis ``a_fold[1]``), a mapped second one into ``b_fold``
  (None where another rule takes a mapped second operand alone)."""

  def rule(args, axes, **params):
    (a, b), (a_axis, b_axis) = args, axes
    if a_axis is not None and b_axis is not None:
      return _each(primitive, a, b, a_axis, b_axis, params)
    if a_axis is not None:
      size, (into, out_axis) = a.shape[a_axis], a_fold
      out = primitive.bind(_fold(a, a_axis, into), b, **params)
    else:
      size, (into, out_axis) = b.shape[b_axis], b_fold
      out = primitive.bind(a, _fold(b, b_axis, into), **params)
    return _unfold(out, size, out_axis)

  return rule


# (operand axis, output axis): conv(x, w): images into the batch, kernels
# into the output channels; input_gradient(g, w): gradients into the batch,
# kernels into the input channels; kernel_gradient(x, g): images into the
# input channels (its output gradients alone join its groups, below).
batching.primitive_batchers[_forward_p] = _folding(_forward_p, (0, 0), (3, 3))
batching.primitive_batchers[_input_gradient_p] = _folding(_input_gradient_p, (0, 0), (2, 3))
_fold_images = _folding(_kernel_gradient_p, (3, 2), None)


def _kernel_gradient_batcher(args, axes, **params):
  """Mapped output gradients alone join the groups along the batch (a free
  reshape where the mapped axis leads); otherwise the general rule."""
  (x, g), (x_axis, g_axis) = args, axes
  if x_axis is not None or g_axis is None:
    return _fold_images(args, axes, **params)
  size = g.shape[g_axis]
  g = jnp.moveaxis(g, g_axis, 0)
  out = _kernel_gradient_p.bind(x, g.reshape(size * g.shape[1], *g.shape[2:]), **params)
  return _unfold(out, size, 3)


batching.primitive_batchers[_kernel_gradient_p] = _kernel_gradient_batcher
