"""The T x T Gramian of the per-task gradients, the input of every Gramian method.

``G[t, s] = <g_t, g_s>`` summed over the shared leaves, one contraction per
leaf accumulated in float32. The gradients are never flattened into one vector
(``ravel_pytree`` would concatenate, and so all-gather, sharded leaves).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from optax_mtl._src import sharding

# Below this largest squared norm, float32 products of gradient entries start
# to underflow; above float32's range they overflow. Both cases are recomputed
# on gradients divided by their largest magnitude (a rare, extra pass).
_TINY_SQUARED_NORM = 1e-30


class Gramian(NamedTuple):
  """The Gramian of the task gradients, kept in range for float32.

  Attributes:
    normalized: [T, T] float32, ``G / scale**2``; its largest diagonal entry is
      1 (all zeros when every task gradient is zero).
    scale: float32 scalar, the largest task-gradient norm ``sqrt(max_t G_tt)``,
      so ``G = scale**2 * normalized`` even when ``scale**2`` would overflow.
  """
  normalized: jax.Array
  scale: jax.Array

  def norms(self) -> jax.Array:
    """Per-task gradient norms ``||g_t||``, [T] float32, without overflow."""
    return self.scale * jnp.sqrt(jnp.maximum(jnp.diagonal(self.normalized), 0.0))


def _leaf_gramian(leaf: jax.Array, divisor=None) -> jax.Array:
  if divisor is not None:
    leaf = leaf.astype(jnp.float32) / divisor
  dims = tuple(range(1, leaf.ndim))
  return lax.dot_general(
      leaf, leaf, ((dims, dims), ((), ())),
      precision=lax.Precision.HIGHEST,
      preferred_element_type=jnp.float32,
      **sharding.replicated_out(leaf))


def _raw_gramian(leaves, num_tasks: int, divisor=None) -> jax.Array:
  total = jnp.zeros((num_tasks, num_tasks), jnp.float32)
  for leaf in leaves:
    total = total + _leaf_gramian(leaf, divisor)
  return total


def _shared_leaves(task_grads: Any, mask: Any | None) -> list:
  leaves = jax.tree.leaves(task_grads)
  if mask is None:
    return leaves
  return [leaf for leaf, shared in zip(leaves, jax.tree.leaves(mask)) if shared]


def gramian(task_grads: Any, mask: Any | None = None) -> Gramian:
  """Computes the Gramian of the per-task gradients over the shared leaves.

  .. math::
     G_{ts} = \\sum_{\\text{shared leaves } \\ell} \\langle g_t^\\ell, g_s^\\ell \\rangle

  One pass over the gradients in the common case. When the result leaves
  float32's range (gradients around 1e20, or norms below 1e-15) a second pass
  on the gradients divided by their largest entry gives the same matrix up to
  the factor returned in ``scale``.

  Args:
    task_grads: pytree whose leaves have a leading task axis T (any floating
      dtype; bf16 and fp16 are accumulated in float32).
    mask: optional pytree of Python bools with the structure of
      ``task_grads``; only leaves marked True enter the Gramian.

  Returns:
    A :class:`Gramian` (normalized matrix and scale).
  """
  leaves = _shared_leaves(task_grads, mask)
  num_tasks = jax.tree.leaves(task_grads)[0].shape[0]
  if not leaves:
    zeros = jnp.zeros((num_tasks, num_tasks), jnp.float32)
    return Gramian(zeros, jnp.zeros((), jnp.float32))

  raw = _raw_gramian(leaves, num_tasks)
  largest = jnp.max(jnp.diagonal(raw))
  in_range = jnp.all(jnp.isfinite(raw)) & (largest >= _TINY_SQUARED_NORM)

  def direct(_):
    return raw / largest, jnp.sqrt(largest)

  def rescaled(_):
    magnitude = jnp.zeros((), jnp.float32)
    for leaf in leaves:
      magnitude = jnp.maximum(magnitude, jnp.max(jnp.abs(leaf)).astype(jnp.float32))
    divisor = jnp.where(magnitude > 0, magnitude, 1.0)
    scaled = _raw_gramian(leaves, num_tasks, divisor)
    top = jnp.max(jnp.diagonal(scaled))
    safe_top = jnp.where(top > 0, top, 1.0)
    return scaled / safe_top, divisor * jnp.sqrt(top)

  normalized, scale = lax.cond(in_range, direct, rescaled, None)
  return Gramian(normalized, scale)
