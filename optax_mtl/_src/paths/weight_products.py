"""Dense-layer weight gradients in a VJP's jaxpr: products of an input and a cotangent.

A weight used once in a product ``y = dot_general(x, W)`` gets, from the
cotangent ``d`` of ``y``, the gradient ``dot_general(x, d)`` (up to a
transpose). ``x`` is the layer's input, kept from the forward pass: it does not
depend on the cotangent, so it is the same in every task's backward pass; only
``d`` differs. Two gradient paths build on this: the stacked Jacobian computes
the T weight gradients as one batched product (``jacobian``), the memory-lean
Gramian contracts ``x x^T`` with the T cotangents (``factored_gramian``).

The products are found in the jaxpr of the loss function's VJP, jitted calls
inlined: a gradient leaf produced by a ``dot_general``, possibly through
transposes, of a value that does not depend on the cotangent with one that
does.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core

from optax_mtl._src.engine import convolution
from optax_mtl._src.paths import jaxpr_eval


class Product(NamedTuple):
  """A gradient leaf ``transpose(dot_general(x, d))``.

  Attributes:
    x: the variable that does not depend on the cotangent.
    d: the variable that does.
    x_batch, x_contract, d_batch, d_contract: the dims of each operand that
      are the product's batch and contracted dims, in their pairing order.
    x_is_lhs: whether ``x`` is the product's left operand.
    params: the ``dot_general`` equation's parameters.
    permutations: the transposes from the product to the leaf, in order.
  """
  x: Any
  d: Any
  x_batch: tuple
  x_contract: tuple
  d_batch: tuple
  d_contract: tuple
  x_is_lhs: bool
  params: dict
  permutations: tuple


def _linear_vars(jaxpr) -> set:
  """The variables that depend on the jaxpr's inputs (the cotangent)."""
  linear = set(jaxpr.invars)
  for eqn in jaxpr.eqns:
    if any(not isinstance(v, core.Literal) and v in linear for v in eqn.invars):
      linear.update(eqn.outvars)
  return linear


def _product(producers: dict, linear: set, var) -> Product | None:
  """The weight product behind a gradient leaf, or None if it is not one."""
  permutations = []
  while not isinstance(var, core.Literal) and var in producers:
    eqn = producers[var]
    if eqn.primitive is lax.transpose_p:
      permutations.append(tuple(eqn.params["permutation"]))
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
    order = tuple(reversed(permutations))
    if lhs_linear:
      return Product(rhs, lhs, tuple(rhs_batch), tuple(rhs_contract),
                     tuple(lhs_batch), tuple(lhs_contract), False, eqn.params, order)
    return Product(lhs, rhs, tuple(lhs_batch), tuple(lhs_contract),
                   tuple(rhs_batch), tuple(rhs_contract), True, eqn.params, order)
  return None


class Analysis(NamedTuple):
  """The VJP's closed jaxpr (jitted calls inlined) and the product behind each leaf.

  Attributes:
    jaxpr: closed jaxpr from the [T] cotangent to the list of gradient leaves.
    products: leaf index -> :class:`Product`, for the leaves that are one.
  """
  jaxpr: Any
  products: dict

  @property
  def num_tasks(self) -> int:
    (cotangent,) = self.jaxpr.jaxpr.invars
    return cotangent.aval.shape[0]

  def has_convolution(self) -> bool:
    """Whether a convolution (XLA's or the CPU kernel's) is among the VJP's
    top-level equations."""
    return any(eqn.primitive is lax.conv_general_dilated_p
               or eqn.primitive in convolution.PRIMITIVES
               for eqn in self.jaxpr.jaxpr.eqns)

  def inputs(self, products) -> list:
    """The value of each product's ``x``, from one evaluation of the jaxpr."""
    closed = self.jaxpr
    (cotangent,) = closed.jaxpr.invars
    # x does not depend on the cotangent: any row gives it.
    return jaxpr_eval.evaluate(
        closed.jaxpr, closed.consts,
        [jnp.zeros(cotangent.aval.shape, cotangent.aval.dtype)],
        outvars=[p.x for p in products])

  def row_fn(self, outvars):
    """``row -> (values of outvars,)`` for a cotangent row, as a VJP is called."""
    closed = self.jaxpr
    return lambda row: (jaxpr_eval.evaluate(closed.jaxpr, closed.consts, [row],
                                            outvars=outvars),)


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


def every_task(product: Product, x: jax.Array, d: jax.Array) -> jax.Array:
  """The leaf for each of T cotangents, [T, ...], as one batched product.

  ``x`` is broadcast over the tasks and the task axis made a batch dimension
  of the product, so the result comes out with the task axis leading: no
  transpose, no stacking of T separate gradients.
  """
  num_tasks = d.shape[0]
  xs = jnp.broadcast_to(x, (num_tasks,) + x.shape)
  shift = lambda dims: tuple(i + 1 for i in dims)
  if product.x_is_lhs:
    lhs, rhs = xs, d
    numbers = ((shift(product.x_contract), shift(product.d_contract)),
               ((0,) + shift(product.x_batch), (0,) + shift(product.d_batch)))
  else:
    lhs, rhs = d, xs
    numbers = ((shift(product.d_contract), shift(product.x_contract)),
               ((0,) + shift(product.d_batch), (0,) + shift(product.x_batch)))
  out = lax.dot_general(lhs, rhs, numbers, precision=product.params["precision"],
                        preferred_element_type=product.params["preferred_element_type"])
  for permutation in product.permutations:
    out = jnp.transpose(out, (0,) + shift(permutation))
  return out
