"""Convolutions in XLA:CPU's fast layout and on the compiled CPU kernel, for the gradient paths.

:func:`native` moves the float32 ``NHWC``/``HWIO`` convolutions of a loss
function (Flax's order) to ``engine/convolution``, whose compiled CPU kernel
is about twice as fast as XLA:CPU's convolutions for the forward pass and
the kernel gradient: every path differentiates the loss through it, so the
T per-task backward passes of a convnet run on the kernel. Nothing changes
off the CPU, without the kernel, or for convolutions it does not cover.

Inside a loop body (``lax.map``, as the lean path and chunked backward passes
run), XLA:CPU leaves a convolution in the dimension order that JAX's
differentiation rules give it; a kernel gradient's order (input features as
the batch, the batch as the features) then runs on a generic loop,
measured 50-100x slower than the same convolution outside a loop, where the
compiler moves it to batch-spatial-feature order. :func:`canonical` rewrites
every convolution of a function to that order itself (``NHWC`` inputs,
``HWIO`` kernels, ``NHWC`` outputs, with transposes around it), so the loop
body holds the fast form. The values are the same: only the layout changes.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax import lax

from optax_mtl._src.engine import convolution
from optax_mtl._src.engine import platform
from optax_mtl._src.paths import jaxpr_eval


def _bind(lhs, rhs, params):
  """The convolution on the kernel where it applies, else as it is."""
  if convolution.supported(lhs, rhs, params):
    return convolution.convolution(lhs, rhs, params["window_strides"], params["padding"],
                                   params["precision"])
  return lax.conv_general_dilated_p.bind(lhs, rhs, **params)


def _canonical_convolution(lhs, rhs, params):
  """One ``conv_general_dilated`` in batch-spatial-feature order."""
  numbers = params["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = numbers.lhs_spec, numbers.rhs_spec, numbers.out_spec
  rank = len(lhs_spec)
  spatial = tuple(range(1, rank - 1))
  canonical = lax.ConvDimensionNumbers(
      lhs_spec=(0, rank - 1) + spatial,
      rhs_spec=(rank - 1, rank - 2) + tuple(range(rank - 2)),
      out_spec=(0, rank - 1) + spatial)
  if numbers == canonical:
    return _bind(lhs, rhs, params)
  lhs = lhs.transpose((lhs_spec[0],) + tuple(lhs_spec[2:]) + (lhs_spec[1],))
  rhs = rhs.transpose(tuple(rhs_spec[2:]) + (rhs_spec[1], rhs_spec[0]))
  # Kept physical: folded back into the convolution they would restore the
  # slow order.
  lhs, rhs = lax.optimization_barrier((lhs, rhs))
  out = _bind(lhs, rhs, dict(params, dimension_numbers=canonical))
  # Original output dimension d sits at position place[d] of the canonical one.
  place = [0] * rank
  place[out_spec[0]] = 0
  place[out_spec[1]] = rank - 1
  for j, d in enumerate(out_spec[2:]):
    place[d] = 1 + j
  return out.transpose(tuple(place))


def _rewrite(eqn, values):
  if eqn.primitive is lax.conv_general_dilated_p:
    return [_canonical_convolution(*values, eqn.params)]
  return None


def _native_rewrite(eqn, values):
  if eqn.primitive is lax.conv_general_dilated_p and convolution.supported(*values,
                                                                           eqn.params):
    return [_bind(*values, eqn.params)]
  return None


def _has_native(jaxpr) -> bool:
  """Whether ``jaxpr`` (or a jitted call in it) has a convolution the kernel
  covers."""
  for eqn in jaxpr.eqns:
    if eqn.primitive is lax.conv_general_dilated_p and convolution.supported(
        *(v.aval for v in eqn.invars), eqn.params):
      return True
    if eqn.primitive.name in jaxpr_eval.CALLS:
      inner = eqn.params["jaxpr" if "jaxpr" in eqn.params else "call_jaxpr"]
      if _has_native(inner.jaxpr):
        return True
  return False


def native(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` with its float32 ``NHWC``/``HWIO`` convolutions (also inside
  jitted calls) on the compiled CPU kernel, when the default backend is the
  CPU; ``fn`` itself otherwise, or when it has none.

  Same values up to float32 rounding; differentiable to any order, in both
  modes, and batchable, like the convolutions it replaces. Outputs that are
  not arrays (an auxiliary string, a Python number) come back as they are.
  """

  def wrapped(*args):
    # Where no convolution can move (off the CPU, or a kernel the paths do
    # not take), fn is traced once, as it is.
    if jax.default_backend() != "cpu" or not convolution.in_use():
      return fn(*args)
    outputs = {}

    def arrays(*a):
      leaves, outputs["tree"] = jax.tree.flatten(fn(*a))
      outputs["static"] = [None if isinstance(l, (jax.Array, jax.core.Tracer)) else l
                           for l in leaves]
      return [l for l, s in zip(leaves, outputs["static"]) if s is None]

    closed = jax.make_jaxpr(arrays)(*args)
    if not _has_native(closed.jaxpr):
      return fn(*args)
    computed = iter(jaxpr_eval.evaluate(closed.jaxpr, closed.consts, jax.tree.leaves(args),
                                        _native_rewrite))
    leaves = [next(computed) if s is None else s for s in outputs["static"]]
    return jax.tree.unflatten(outputs["tree"], leaves)

  return wrapped


def canonical(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` with every convolution (also inside jitted calls) in ``NHWC``/``HWIO`` order.

  Convolutions inside other control flow (a user's ``scan``, ``cond`` or
  ``while``) are left as they are.
  """

  def wrapped(*args):
    closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
    outs = jaxpr_eval.evaluate(closed.jaxpr, closed.consts, jax.tree.leaves(args),
                               _rewrite)
    return jax.tree.unflatten(jax.tree.structure(shapes), outs)

  return wrapped


def loop_map(fn: Callable[..., Any], xs: Any, batch_size: int | None = None) -> Any:
  """``lax.map(fn, xs, batch_size=...)``, with ``fn``'s convolutions canonical on CPU."""
  return platform.dependent(
      xs, cpu=lambda xs: lax.map(canonical(fn), xs, batch_size=batch_size),
      default=lambda xs: lax.map(fn, xs, batch_size=batch_size))
