"""How much the tasks conflict, read off the T x T Gramian.

Whether a problem needs a gradient method at all shows in two numbers: the
cosines between the task gradients (negative: a step along one task's
gradient raises the other's loss) and the ratio of their norms (a large
ratio: the sum is dominated by one task). Both are functions of the Gramian
``G = J J^T``, which the Gramian methods compute anyway, so the diagnostics
cost T x T arithmetic and no pass over the gradients when kept by such a
method (:func:`with_diagnostics`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_mtl._src.engine import masking
from optax_mtl._src.engine import statistics


class ConflictDiagnostics(NamedTuple):
  """The conflict between the task gradients of one step.

  Attributes:
    task_norms: [T] norms ``||g_t||``.
    task_cosines: [T, T] cosines ``<g_s, g_t> / (||g_s|| ||g_t||)``; 0 where a
      gradient is zero (1 on the diagonal of a nonzero one).
    conflict_fraction: scalar, the fraction of the ``T (T - 1) / 2`` pairs of
      tasks whose cosine is negative (0 for one task).
    most_conflicting_pair: [2] int32, the pair ``(s, t)``, ``s < t``, with the
      lowest cosine (``(0, 0)`` for one task).
    most_conflicting_cosine: scalar, that cosine (1 for one task).
    norm_ratio: scalar, the largest over the smallest nonzero task-gradient
      norm (1 when at most one gradient is nonzero).
  """
  task_norms: jax.Array
  task_cosines: jax.Array
  conflict_fraction: jax.Array
  most_conflicting_pair: jax.Array
  most_conflicting_cosine: jax.Array
  norm_ratio: jax.Array


def empty(num_tasks: int) -> ConflictDiagnostics:
  """The diagnostics before the first step: no task seen, no conflict."""
  dtype = jnp.result_type(float)
  return ConflictDiagnostics(
      task_norms=jnp.zeros((num_tasks,), dtype),
      task_cosines=jnp.zeros((num_tasks, num_tasks), jnp.float32),
      conflict_fraction=jnp.zeros((), jnp.float32),
      most_conflicting_pair=jnp.zeros((2,), jnp.int32),
      most_conflicting_cosine=jnp.ones((), jnp.float32),
      norm_ratio=jnp.ones((), dtype))


def _as_gramian(value: Any, shared: Any) -> statistics.Gramian:
  if isinstance(value, statistics.Gramian):
    return value
  if isinstance(value, (jax.Array, jnp.ndarray)) and jnp.ndim(value) == 2:
    matrix = jnp.asarray(value, jnp.result_type(value, jnp.float32))
    if matrix.shape[0] != matrix.shape[1]:
      raise ValueError(
          f"mtl.conflict_diagnostics: a Gramian must be square [T, T]; got "
          f"shape {matrix.shape}. Pass the per-task gradients (every leaf "
          f"[T, ...]) or mtl.Gramian / a [T, T] matrix J J^T.")
    scale = jnp.sqrt(jnp.maximum(jnp.max(jnp.diagonal(matrix)), 0.0))
    safe = jnp.where(scale > 0, scale, 1.0)
    return statistics.Gramian(matrix / safe ** 2, scale)
  mask = masking.resolve_shared(shared, value, None, "mtl.conflict_diagnostics")
  return statistics.gramian(value, mask)


def from_gramian(gram: statistics.Gramian) -> ConflictDiagnostics:
  """The diagnostics of a :class:`~optax_mtl.Gramian` (T x T arithmetic)."""
  normalized = gram.normalized.astype(jnp.result_type(gram.normalized, jnp.float32))
  num_tasks = normalized.shape[0]
  unit_sq = jnp.maximum(jnp.diagonal(normalized), 0.0)
  present = unit_sq > 0
  inv = jnp.where(present, jax.lax.rsqrt(jnp.where(present, unit_sq, 1.0)), 0.0)
  cosines = jnp.clip(normalized * inv[:, None] * inv[None, :], -1.0, 1.0)
  norms = gram.scale * jnp.sqrt(unit_sq)
  if num_tasks > 1:
    rows, cols = jnp.triu_indices(num_tasks, k=1)
    pairs = cosines[rows, cols]
    worst = jnp.argmin(pairs)
    fraction = jnp.mean((pairs < 0).astype(jnp.float32))
    pair = jnp.stack([rows[worst], cols[worst]]).astype(jnp.int32)
    lowest = pairs[worst]
  else:
    fraction = jnp.zeros((), jnp.float32)
    pair = jnp.zeros((2,), jnp.int32)
    lowest = jnp.ones((), cosines.dtype)
  # The ratio of unit norms (<= 1 each) stays in range whatever the scale.
  unit = jnp.sqrt(unit_sq)
  smallest = jnp.min(jnp.where(present, unit, jnp.inf))
  ratio = jnp.where(jnp.sum(present) > 1, jnp.max(unit) / jnp.where(
      jnp.isfinite(smallest), smallest, 1.0), 1.0)
  return ConflictDiagnostics(
      task_norms=norms.astype(jnp.result_type(float)),
      task_cosines=cosines.astype(jnp.float32),
      conflict_fraction=fraction,
      most_conflicting_pair=pair,
      most_conflicting_cosine=lowest.astype(jnp.float32),
      norm_ratio=ratio.astype(jnp.result_type(float)))


def conflict_diagnostics(task_grads_or_gramian: Any, *,
                         shared: Any = None) -> ConflictDiagnostics:
  """Per-task norms, pairwise cosines and how much the tasks conflict.

  .. math::
     c_{st} = \\frac{G_{st}}{\\sqrt{G_{ss} G_{tt}}}, \\quad
     \\text{conflict fraction} = \\frac{|\\{s < t : c_{st} < 0\\}|}{T (T-1) / 2},
     \\quad \\text{norm ratio} = \\frac{\\max_t \\|g_t\\|}{\\min_t \\|g_t\\|}

  A cosine near -1 between two tasks means a step for one undoes the other:
  the plain sum cancels them and a gradient method (MGDA, UPGrad, PCGrad...)
  changes the direction. A norm ratio of 1e3 means the sum follows the
  largest task almost alone: a loss or gradient scaling (or a scale-free
  method) fixes that even without conflict.

  Args:
    task_grads_or_gramian: per-task gradients (every leaf ``[T, ...]``, as
      ``mtl.value_and_jacobian`` returns), or their Gramian: an
      :class:`~optax_mtl.Gramian` (``mtl.value_and_gramian`` gives one) or
      a [T, T] array ``J J^T``.
    shared: for gradients, an optional mask of the leaves to read (a
      pytree of bools, possibly a prefix of the gradients' structure), e.g.
      the shared trunk only.

  Returns:
    A :class:`ConflictDiagnostics`; jit-compatible, never NaN (zero
    gradients count as orthogonal to every task).

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> grads = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0], [0.0, 3.0]])}
    >>> d = mtl.conflict_diagnostics(grads)
    >>> d.most_conflicting_pair, round(float(d.most_conflicting_cosine), 4)
    (Array([0, 1], dtype=int32), -0.7071)
    >>> round(float(d.conflict_fraction), 4), float(d.norm_ratio)
    (0.3333, 3.0)
  """
  return from_gramian(_as_gramian(task_grads_or_gramian, shared))
