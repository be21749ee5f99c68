"""Coordinate-wise trimmed mean: a robust average of the task gradients."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams
from optax_mtl._src.engine import masking

_METHOD = "mtl.trimmed_mean"


def _comparators(size: int) -> list[tuple[int, int]]:
  """Batcher's odd-even merge sorting network for ``size`` inputs.

  Built for the next power of two; comparators that touch a padding
  position are dropped, which is valid because padding would hold +inf and
  never move.
  """
  width = 1
  while width < size:
    width *= 2
  pairs = []
  p = 1
  while p < width:
    k = p
    while k >= 1:
      for j in range(k % p, width - k, 2 * k):
        for i in range(min(k, width - j - k)):
          a, b = i + j, i + j + k
          if a // (2 * p) == b // (2 * p) and b < size:
            pairs.append((a, b))
      k //= 2
    p *= 2
  return pairs


def sorted_slices(slices: list) -> list:
  """The task slices of a leaf sorted coordinate-wise, by min/max exchanges.

  A sort along the task axis runs far below bandwidth on CPU; the network's
  elementwise minima and maxima fuse into one pass over the leaf on every
  backend (O(T log^2 T) exchanges).
  """
  slices = list(slices)
  for a, b in _comparators(len(slices)):
    low, high = slices[a], slices[b]
    slices[a], slices[b] = jnp.minimum(low, high), jnp.maximum(low, high)
  return slices


def trimmed_mean(
    trim_number: int,
    *,
    num_tasks: int | None = None,
    shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """Averages each coordinate over the tasks after dropping its extremes.

  For every coordinate ``k`` of the shared parameters, with
  ``g_{(1)k} <= ... <= g_{(T)k}`` the task gradients' entries sorted and
  ``b`` the ``trim_number``:

  .. math::
     u_k = \\frac{1}{T - 2b} \\sum_{i = b + 1}^{T - b} g_{(i)k} .

  The ``b`` largest and ``b`` smallest values of each coordinate are
  discarded, so up to ``b`` tasks with arbitrarily large (or adversarial)
  gradients move no coordinate outside the range of the others. ``b = 0`` is
  the mean. The update is not a weighted sum of the task gradients: it is
  computed in the combination pass, coordinate by coordinate, and reads no
  Gramian. ``task_weights`` in the state records the factor applied to each
  task before the trim (1 here; a task scaling chained before this method
  contributes its own factors).

  Args:
    trim_number: ``b >= 0``, the number of values dropped at each end of every
      coordinate. An update needs ``T > 2 b``.
    num_tasks: optional T; when given, the state keeps ``task_weights`` and T
      is checked against ``trim_number`` at construction.
    shared: optional mask of shared leaves (pytree of bools or callable on
      params); other leaves are task-specific heads, summed over tasks.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` aggregator.

  Raises:
    TypeError: ``trim_number`` is not a Python int.
    ValueError: ``trim_number`` negative, or ``T <= 2 * trim_number``.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.trimmed_mean(1)
    >>> task_grads = {"w": jnp.array([[1.0, -9.0], [2.0, 0.0], [100.0, 1.0]])}
    >>> tx.update(task_grads, tx.init(None))[0]["w"]
    Array([2., 0.], dtype=float32)

  References:
    Yin, Chen, Ramchandran & Bartlett, "Byzantine-Robust Distributed
    Learning: Towards Optimal Statistical Rates", ICML 2018 (coordinate-wise
    trimmed mean, Section 3.2).
  """
  trim = hyperparams.static_integer(trim_number, _METHOD, "trim_number", low=0)
  size = hyperparams.num_tasks(num_tasks, _METHOD, required=False)

  def check(num):
    if num <= 2 * trim:
      raise ValueError(
          f"{_METHOD}: trim_number={trim} drops {2 * trim} of the {num} "
          f"values of every coordinate, leaving none; use trim_number <= "
          f"{(num - 1) // 2} for {num} tasks.")

  if size is not None:
    check(size)

  def rule(inputs, state):
    check(inputs.num_tasks)
    return jnp.ones((inputs.num_tasks,), jnp.float32), state

  def per_coordinate(leaf, state, index):
    del state, index
    num = leaf.shape[0]
    ordered = sorted_slices(list(leaf))
    return sum(ordered[trim:num - trim]) / (num - 2 * trim)

  return transform.aggregator(weighting.Weighting(
      name=_METHOD, rule=rule, num_tasks=size,
      claims={"permutation_equivariant", "homogeneous"},
      per_coordinate=per_coordinate), shared=shared)
