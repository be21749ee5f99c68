"""The cross matrix of two mini-batches' per-task gradients, kept in range.

``C[t, s] = <g_t^(1), g_s^(2)>``, the product ``J1 J2^T`` of the Jacobians of
two mini-batches taken at the same parameters. Unlike the Gramian it is
neither symmetric nor positive semi-definite, but for independent batches it
is an unbiased estimate of the Gramian of the expected gradients, which is
what the stochastic methods SDMGrad and MoDo need.

It is computed as :mod:`optax_mtl._src.engine.statistics` computes the
Gramian: one pass over the leaves (per leaf one [T, T] contraction and the
two batches' [T] squared norms), never ``ravel_pytree``, accumulated in
float32 (float64 for float64 gradients). When a result leaves that range
(entries near 1e20 in float32, norms below 1e-15) the pass is redone on each
batch divided by its largest magnitude, only when needed, also under
``vmap``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from optax_mtl._src.engine import native
from optax_mtl._src.engine import platform
from optax_mtl._src.engine import sharding
from optax_mtl._src.engine import statistics


class CrossGramian(NamedTuple):
  """``J1 J2^T`` of two mini-batches, divided by their largest norms.

  Attributes:
    normalized: [T, T], ``C / (first_scale * second_scale)`` with ``C[t, s]
      = <g_t^(1), g_s^(2)>``; by Cauchy-Schwarz every entry is in [-1, 1]
      (all zeros when either batch's gradients are all zero). float32, or
      float64 for float64 gradients.
    first_scale: scalar, the largest task-gradient norm of the first batch.
    second_scale: scalar, the same for the second batch, so ``C =
      first_scale * second_scale * normalized`` even where that product
      would overflow.
  """
  normalized: jax.Array
  first_scale: jax.Array
  second_scale: jax.Array


def _divide(leaf, dtype, divisor):
  leaf = leaf.astype(dtype)
  return leaf if divisor is None else leaf / divisor


def _portable(first, second, dtype, divisors):
  a = _divide(first, dtype, divisors[0])
  b = _divide(second, dtype, divisors[1])
  dims = tuple(range(1, a.ndim))
  cross = lax.dot_general(a, b, ((dims, dims), ((), ())),
                          precision=lax.Precision.HIGHEST,
                          preferred_element_type=dtype,
                          **sharding.replicated_out(first))
  return cross, jnp.sum(jnp.square(a), axis=dims), jnp.sum(jnp.square(b), axis=dims)


def _cpu(first, second, dtype, divisors):
  """The leaf's terms on XLA's CPU backend.

  The compiled kernel where it applies (as for the Gramian,
  statistics._cpu_block). Otherwise, XLA's CPU dot of two [T, n] matrices
  over the long axis is about 3x slower than the same product laid out as
  [n, T], so the columns are taken in cache-sized blocks. Each block
  of the two batches is transposed into one [chunk, 2T] matrix whose [2T, 2T]
  product holds the cross block and both squared norms: one dot reading
  the block once (a dot plus two sums of squares took 1.5x longer).
  """
  num_tasks = first.shape[0]
  flat_a = first.reshape(num_tasks, -1)
  flat_b = second.reshape(num_tasks, -1)
  if native.applies([first, second], dtype, divisors):
    return native.cross(flat_a, flat_b)
  steps = flat_a.shape[1] // statistics.CPU_CHUNK

  def gram(block_a, block_b):
    block_a = _divide(block_a, dtype, divisors[0])
    block_b = _divide(block_b, dtype, divisors[1])
    # The barrier keeps the transpose physical; folded into the dot, it
    # would give back the slow layout.
    columns = lax.optimization_barrier(jnp.concatenate([block_a.T, block_b.T], axis=1))
    return lax.dot_general(columns, columns, (((0,), (0,)), ((), ())),
                           preferred_element_type=dtype)

  def body(i, total):
    start = i * statistics.CPU_CHUNK
    return total + gram(lax.dynamic_slice_in_dim(flat_a, start, statistics.CPU_CHUNK, axis=1),
                        lax.dynamic_slice_in_dim(flat_b, start, statistics.CPU_CHUNK, axis=1))

  total = lax.fori_loop(0, steps, body,
                        jnp.zeros((2 * num_tasks, 2 * num_tasks), dtype))
  if flat_a.shape[1] > steps * statistics.CPU_CHUNK:
    total = total + gram(flat_a[:, steps * statistics.CPU_CHUNK:], flat_b[:, steps * statistics.CPU_CHUNK:])
  diagonal = jnp.diagonal(total)
  return (total[:num_tasks, num_tasks:], diagonal[:num_tasks],
          diagonal[num_tasks:])


def _leaf_terms(first, second, dtype, divisors):
  portable = lambda a, b: _portable(a, b, dtype, divisors)
  # Blocks of a sharded leaf would be gathered; small leaves gain nothing.
  if (first.size < 4 * statistics.CPU_CHUNK * first.shape[0] or sharding.replicated_out(first)
      or not jax.sharding.get_abstract_mesh().empty):
    return portable(first, second)
  return platform.dependent(
      first, second, cpu=lambda a, b: _cpu(a, b, dtype, divisors), default=portable)


def _raw(pairs, num_tasks, dtype, divisors):
  cross = jnp.zeros((num_tasks, num_tasks), dtype)
  first_sq = jnp.zeros((num_tasks,), dtype)
  second_sq = jnp.zeros((num_tasks,), dtype)
  for a, b in pairs:
    c, sa, sb = _leaf_terms(a, b, dtype, divisors)
    cross, first_sq, second_sq = cross + c, first_sq + sa, second_sq + sb
  return cross, first_sq, second_sq


def cross_gramian(first: Any, second: Any, mask: Any | None = None) -> CrossGramian:
  """Computes ``J1 J2^T`` over the selected leaves, in one pass.

  .. math::
     C_{ts} = \\sum_{\\text{leaves } \\ell}
       \\langle g_t^{(1),\\ell}, g_s^{(2),\\ell} \\rangle

  Args:
    first: per-task gradients of the first mini-batch, a pytree whose leaves
      have a leading task axis T.
    second: those of the second mini-batch, with the same structure and
      shapes.
    mask: optional pytree of Python bools with the structure of ``first``;
      only leaves marked True enter the matrix.

  Returns:
    A :class:`CrossGramian`. With ``second`` equal to ``first`` it is the
    Gramian: ``normalized`` equals :func:`optax_mtl.gramian`'s (and when
    ``second`` is ``first``, the very same arrays, that is how it is computed).

  Example:
    >>> import jax.numpy as jnp
    >>> from optax_mtl._src.engine import cross
    >>> c = cross.cross_gramian({"w": jnp.array([[2.0, 0.0], [0.0, 1.0]])},
    ...                         {"w": jnp.array([[1.0, 1.0], [0.0, -2.0]])})
    >>> c.normalized, c.first_scale, c.second_scale
    (Array([[ 0.5 ,  0.  ],
           [ 0.25, -0.5 ]], dtype=float32), Array(2., dtype=float32), Array(2., dtype=float32))
  """
  a_leaves = jax.tree.leaves(first)
  b_leaves = jax.tree.leaves(second)
  if len(a_leaves) == len(b_leaves) and all(a is b for a, b in zip(a_leaves, b_leaves)):
    # One batch read twice (mtl.same_batch): its Gramian, a quarter of the
    # products of the [2T, 2T] pass.
    gram = statistics.gramian(first, mask)
    return CrossGramian(gram.normalized, gram.scale, gram.scale)
  selected = (tuple(True for _ in a_leaves) if mask is None
              else tuple(bool(m) for m in jax.tree.leaves(mask)))
  return _cross_gramian(a_leaves, b_leaves, selected)


# Compiled once per signature: an eager update would otherwise trace the
# rescue's lax.cond (whose branches are new closures) and compile it anew.
@functools.partial(jax.jit, static_argnums=(2,))
def _cross_gramian(a_leaves, b_leaves, selected) -> CrossGramian:
  pairs = [(a, b) for a, b, s in zip(a_leaves, b_leaves, selected) if s]
  num_tasks = a_leaves[0].shape[0]
  dtype = statistics.accumulation_dtype(a_leaves + b_leaves)
  raw = _raw(pairs, num_tasks, dtype, (None, None))

  if pairs:
    cross, first_sq, second_sq = raw
    bad = (~jnp.all(jnp.isfinite(cross)) | ~jnp.all(jnp.isfinite(first_sq))
           | ~jnp.all(jnp.isfinite(second_sq))
           | statistics.out_of_range(jnp.max(first_sq), dtype)
           | statistics.out_of_range(jnp.max(second_sq), dtype))
  else:
    bad = jnp.zeros((), bool)

  def rescue(raw):
    divisors = (statistics.magnitude_divisor([a for a, _ in pairs], dtype),
                statistics.magnitude_divisor([b for _, b in pairs], dtype))
    return _raw(pairs, num_tasks, dtype, divisors), divisors

  def keep(raw):
    return raw, (jnp.ones((), dtype), jnp.ones((), dtype))

  (cross, first_sq, second_sq), (div_a, div_b) = lax.cond(
      statistics.any_in_batch(bad), rescue, keep, raw)
  # Under vmap the rescue runs for every member when one needs it; each
  # member keeps its own first result unless it was bad.
  rescued, kept = (cross, first_sq, second_sq), raw
  cross, first_sq, second_sq = jax.tree.map(
      lambda r, k: jnp.where(bad, r, k), rescued, kept)
  div_a = jnp.where(bad, div_a, 1.0).astype(dtype)
  div_b = jnp.where(bad, div_b, 1.0).astype(dtype)

  root_a = jnp.sqrt(jnp.maximum(jnp.max(first_sq), 0.0))
  root_b = jnp.sqrt(jnp.maximum(jnp.max(second_sq), 0.0))
  # Divided one root at a time: their product may overflow where the
  # quotient does not.
  normalized = (cross / jnp.where(root_a > 0, root_a, 1.0)) / jnp.where(
      root_b > 0, root_b, 1.0)
  return CrossGramian(normalized, div_a * root_a, div_b * root_b)
