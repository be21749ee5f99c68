"""Leaf-by-leaf combinations of the per-task gradients.

``combine`` contracts the task axis with a weight vector (the update of every
aggregator); ``scale_tasks`` multiplies each task's gradient by its own factor
(the output of every task scaling). Both keep each leaf's dtype and layout.
Every pass over the task axis is a contraction: a reduction such as
``g.sum(0)`` runs far below memory bandwidth on CPU.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from optax_mtl._src.engine import sharding


def _weighted_leaf(weights: jax.Array, leaf: jax.Array) -> jax.Array:
  accumulate = jnp.promote_types(jnp.float32, leaf.dtype)
  weights = weights.astype(accumulate)
  narrow = jnp.finfo(leaf.dtype).bits < 32
  largest = jnp.ones((), accumulate)
  if narrow:
    # The weights enter the contraction in the leaf's dtype: divided by
    # their largest magnitude first, so a weight beyond float16's range
    # (1 / L_t for a loss of 1e-5) does not overflow; the factor is applied
    # after the float32 accumulation.
    largest = jnp.max(jnp.abs(weights))
    largest = jnp.where((largest > 0) & jnp.isfinite(largest), largest, 1.0)
    weights = weights / largest
  contracted = lax.dot_general(
      weights.astype(leaf.dtype), leaf, (((0,), (0,)), ((), ())),
      precision=lax.Precision.HIGHEST,
      preferred_element_type=accumulate,
      **sharding.drop_task_axis_out(leaf))
  if narrow:
    contracted = contracted * largest
  return contracted.astype(leaf.dtype)


def combine(weights: jax.Array, task_grads: Any, mask: Any | None = None,
            head_weights: jax.Array | None = None) -> Any:
  """Returns ``sum_t weights[t] * g_t`` per shared leaf, ``sum_t g_t`` per head.

  .. math::
     u^\\ell = \\sum_t w_t\\, g_t^\\ell \\ \\text{(shared)}, \\qquad
     u^\\ell = \\sum_t h_t\\, g_t^\\ell \\ \\text{(task-specific)}

  Args:
    weights: [T] vector (any float dtype; applied in the leaf's dtype and
      accumulated in float32, or float64 for float64 leaves).
    task_grads: pytree whose leaves have a leading task axis T.
    mask: optional pytree of Python bools, True for shared leaves; leaves
      marked False are combined with ``head_weights``.
    head_weights: [T] weights of the task-specific leaves; ones by default
      (each head keeps its own task's gradient). A task scaling before an
      aggregator scales the heads too, so a chain passes its factors here.

  Returns:
    A pytree with the parameters' structure, shapes and dtypes.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> mtl.combine(jnp.array([0.5, 2.0]), {"w": jnp.array([[2.0], [1.0]])})
    {'w': Array([3.], dtype=float32)}
  """
  if mask is None:
    return jax.tree.map(lambda g: _weighted_leaf(weights, g), task_grads)
  if head_weights is None:
    head_weights = jnp.ones(weights.shape, weights.dtype)
  return jax.tree.map(
      lambda g, shared: _weighted_leaf(weights if shared else head_weights, g),
      task_grads, mask)


def combine_groups(group_weights: jax.Array, task_grads: Any, groups: tuple,
                   head_weights: jax.Array | None = None) -> Any:
  """Returns ``sum_t W[k, t] g_t`` on each leaf of group k, heads as :func:`combine`.

  The combination pass of a per-layer method: every group of leaves has its
  own [T] weights, still one contraction per leaf.

  Args:
    group_weights: [K, T], row k the weights of group k.
    task_grads: pytree whose leaves have a leading task axis T.
    groups: per leaf (flattening order) its group index, or -1 for a
      task-specific leaf, combined with ``head_weights`` (ones by default).
    head_weights: [T] weights of the task-specific leaves.

  Returns:
    A pytree with the parameters' structure, shapes and dtypes.
  """
  leaves, treedef = jax.tree.flatten(task_grads)
  if head_weights is None:
    head_weights = jnp.ones(group_weights.shape[1:], group_weights.dtype)
  out = [_weighted_leaf(head_weights if k < 0 else group_weights[k], leaf)
         for leaf, k in zip(leaves, groups)]
  return jax.tree.unflatten(treedef, out)


def reduce_tasks(reduce: Any, weights: jax.Array, task_grads: Any,
                 mask: Any | None = None,
                 head_weights: jax.Array | None = None) -> Any:
  """Per shared leaf, ``reduce(w_t g_t stack, index)``; heads as :func:`combine`.

  The combination pass of a coordinate-wise aggregator: ``reduce`` maps the
  [T, ...] stack of weighted task gradients of one leaf to that leaf's
  update (computed in float32, or float64 for float64 leaves, and cast back
  to the leaf's dtype); ``index`` is the leaf's position in the tree.
  """
  leaves, treedef = jax.tree.flatten(task_grads)
  shared = ([True] * len(leaves) if mask is None else jax.tree.leaves(mask))
  if head_weights is None:
    head_weights = jnp.ones(weights.shape, weights.dtype)
  out = []
  for index, (leaf, is_shared) in enumerate(zip(leaves, shared)):
    if not is_shared:
      out.append(_weighted_leaf(head_weights, leaf))
      continue
    compute = jnp.promote_types(jnp.float32, leaf.dtype)
    stack = scale_tasks(weights, leaf.astype(compute))
    out.append(jnp.asarray(reduce(stack, index)).astype(leaf.dtype))
  return jax.tree.unflatten(treedef, out)


def scale_tasks(scales: jax.Array, task_grads: Any) -> Any:
  """Multiplies the gradient of task t by ``scales[t]`` on every leaf.

  Args:
    scales: [T] vector.
    task_grads: pytree whose leaves have a leading task axis T.

  Returns:
    Per-task gradients of the same structure, shapes and dtypes.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> mtl.scale_tasks(jnp.array([2.0, 0.0]), jnp.array([[1.0], [3.0]]))
    Array([[2.],
           [0.]], dtype=float32)
  """
  def scale_leaf(g):
    # In float32 (or wider) for narrow leaves: the factor itself may lie
    # outside float16's range while the product does not.
    compute = jnp.promote_types(jnp.float32, g.dtype)
    factor = scales.astype(compute).reshape((g.shape[0],) + (1,) * (g.ndim - 1))
    return (g.astype(compute) * factor).astype(g.dtype)
  return jax.tree.map(scale_leaf, task_grads)
