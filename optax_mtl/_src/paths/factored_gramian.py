"""Gramian blocks of every task's gradient at once, dense-layer weights factored.

A weight used once in a product ``y = dot_general(x, W)`` has, for task t, the
gradient ``W_t' = x^T d_t``: ``d_t`` is the cotangent of ``y`` in task t's
backward pass. Its block of the Gramian is

.. math::
   \\langle W_s', W_t' \\rangle = \\sum_{c, c'} (x x^\\top)_{c c'}\\,
   (d_s d_t^\\top)_{c c'}

(``c`` over the contracted positions: the examples, and the sequence for a
token-wise layer), so it needs ``x`` once and the T cotangents ``d_t``, never
the T weight gradients. For C contracted positions, I inputs and J outputs
it costs ``C^2 I + T C^2 J + T^2 C J`` multiply-adds against ``T C I J + T^2
I J`` for the gradients and their products: chosen leaf by leaf where it is
cheaper (a batch of 128 through a 512 x 512 layer: ~3.6x fewer at T = 10).
TorchJD's "autogram" computes the Gramian layer by layer in the same spirit.

The weight products are found in the jaxpr of the loss function's VJP (jitted
calls inlined): a gradient leaf produced by a ``dot_general`` (possibly
transposed) of a value that does not depend on the cotangent (the layer's
input, kept from the forward pass) with one that does. Every other leaf's
gradient is computed for all tasks at once, as the stacked path computes it,
and contracted as there.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core

from optax_mtl._src.engine import statistics
from optax_mtl._src.paths import jacobian
from optax_mtl._src.paths import jaxpr_eval


class _Product(NamedTuple):
  """A leaf's gradient ``dot_general(x, d)``: the dims of each operand that
  are the product's batch dims and contracted dims, in their pairing order."""
  x: Any
  d: Any
  x_batch: tuple
  x_contract: tuple
  d_batch: tuple
  d_contract: tuple


def _linear_vars(jaxpr) -> set:
  """The variables that depend on the jaxpr's inputs (the cotangent)."""
  linear = set(jaxpr.invars)
  for eqn in jaxpr.eqns:
    if any(not isinstance(v, core.Literal) and v in linear for v in eqn.invars):
      linear.update(eqn.outvars)
  return linear


def _product(producers: dict, linear: set, var) -> _Product | None:
  """The weight product behind a gradient leaf, or None if it is not one."""
  while not isinstance(var, core.Literal) and var in producers:
    eqn = producers[var]
    if eqn.primitive is lax.transpose_p:
      # A permutation of the entries leaves every inner product unchanged.
      var = eqn.invars[0]
      continue
    if eqn.primitive is not lax.dot_general_p:
      return None
    lhs, rhs = eqn.invars
    if isinstance(lhs, core.Literal) or isinstance(rhs, core.Literal):
      return None
    lhs_linear, rhs_linear = lhs in linear, rhs in linear
    if lhs_linear == rhs_linear:
      return None
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
    if lhs_linear:
      return _Product(rhs, lhs, tuple(rhs_batch), tuple(rhs_contract),
                      tuple(lhs_batch), tuple(lhs_contract))
    return _Product(lhs, rhs, tuple(lhs_batch), tuple(lhs_contract),
                    tuple(rhs_batch), tuple(rhs_contract))
  return None


def _sizes(product: _Product):
  """(B, C, I, J): batch, contracted, x-free and d-free sizes."""
  x_shape, d_shape = product.x.aval.shape, product.d.aval.shape
  batch = math.prod(x_shape[i] for i in product.x_batch)
  contract = math.prod(x_shape[i] for i in product.x_contract)
  inner = batch * contract
  if inner == 0:
    return batch, contract, 0, 0
  return batch, contract, math.prod(x_shape) // inner, math.prod(d_shape) // inner


def _factored_is_cheaper(product: _Product, num_tasks: int) -> bool:
  batch, contract, inputs, outputs = _sizes(product)
  if min(batch, contract, inputs, outputs) == 0:
    return False
  factored = batch * contract * (contract * inputs + num_tasks * contract * outputs
                                 + num_tasks * num_tasks * outputs)
  direct = num_tasks * batch * inputs * outputs * (contract + num_tasks)
  return factored < direct


def _factored_block(product: _Product, x, d, dtype) -> jax.Array:
  """``<W_s', W_t'>`` from the input ``x`` and the cotangents ``d`` [T, ...]."""
  batch, contract, inputs, outputs = _sizes(product)
  num_tasks = d.shape[0]
  x_free = tuple(i for i in range(x.ndim)
                 if i not in product.x_batch + product.x_contract)
  d_free = tuple(i for i in range(d.ndim - 1)
                 if i not in product.d_batch + product.d_contract)
  xm = jnp.transpose(x, product.x_batch + product.x_contract + x_free).reshape(
      batch, contract, inputs).astype(dtype)
  dm = jnp.transpose(d, (0,) + tuple(1 + i for i in product.d_batch + product.d_contract
                                     + d_free)).reshape(
      num_tasks, batch, contract, outputs).astype(dtype)
  einsum = lambda spec, a, b: jnp.einsum(spec, a, b, precision=lax.Precision.HIGHEST,
                                         preferred_element_type=dtype)
  kernel = einsum("bci,bki->bck", xm, xm)
  mixed = einsum("bck,tbkj->tbcj", kernel, dm)
  return einsum("tbcj,sbcj->ts", mixed, dm)


class Analysis(NamedTuple):
  """The VJP's jaxpr (jitted calls inlined) and the weight product behind each leaf."""
  jaxpr: Any
  products: dict

  def factored(self, num_tasks: int) -> set:
    """The leaves whose blocks are cheaper from their factors than from their gradients."""
    return {i for i, p in self.products.items() if _factored_is_cheaper(p, num_tasks)}


def analyse(vjp, cotangent: jax.Array) -> Analysis:
  """Finds the weight products of ``vjp``, the linear map from a [T] cotangent
  (``cotangent`` gives its shape and dtype) to the list of gradient leaves."""
  flat = jaxpr_eval.inlined(vjp, jax.ShapeDtypeStruct(cotangent.shape, cotangent.dtype))
  jaxpr = flat.jaxpr
  producers = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}
  linear = _linear_vars(jaxpr)
  products = {}
  for index, var in enumerate(jaxpr.outvars):
    product = _product(producers, linear, var)
    if product is not None:
      products[index] = product
  return Analysis(flat, products)


def leaf_blocks(analysis: Analysis, wanted: Sequence[int], dtype) -> dict[int, jax.Array]:
  """The raw [T, T] Gramian block of each wanted gradient leaf, all tasks at once.

  Factored where that is cheaper; otherwise from the leaf's T gradients,
  computed as the stacked path computes them.
  """
  closed = analysis.jaxpr
  jaxpr = closed.jaxpr
  (cotangent,) = jaxpr.invars
  num_tasks, = cotangent.aval.shape
  cheaper = analysis.factored(num_tasks)
  products = {i: analysis.products[i] for i in wanted if i in cheaper}
  direct = [i for i in wanted if i not in cheaper]
  inputs = jaxpr_eval.evaluate(
      jaxpr, closed.consts, [jnp.zeros(cotangent.aval.shape, cotangent.aval.dtype)],
      outvars=[p.x for p in products.values()])
  batched_vars = [p.d for p in products.values()] + [jaxpr.outvars[i] for i in direct]
  # As the stacked path runs its backward passes (on CPU one after another).
  batched = jacobian.backward_passes(
      lambda row: (jaxpr_eval.evaluate(jaxpr, closed.consts, [row],
                                       outvars=batched_vars),),
      num_tasks, cotangent.aval.dtype, None)
  blocks = {}
  for (index, product), x, d in zip(products.items(), inputs, batched):
    blocks[index] = _factored_block(product, x, d, dtype)
  for index, leaf in zip(direct, batched[len(products):]):
    blocks[index] = statistics.leaf_gramian(leaf, dtype)
  return blocks
