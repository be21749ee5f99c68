"""Penalty-based boundary intersection (PBI): progress along a preference ray."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_mtl._src.core import aliases
from optax_mtl._src.core import loss_inputs
from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams

_METHOD = "mtl.scale_by_pbi"
# Below this many float32 ulps of the losses, the distance to the ray is
# rounding noise (L - d1 r is a difference of nearly equal vectors): it is
# taken as 0, where PBI's derivative is that of d1 alone.
_RAY_ULPS = 4.0


def _preference(preference: Any, num_tasks: int | None):
  """``(vector or None, T or None, tasks_argument)`` after validation."""
  if preference is None:
    return None, hyperparams.num_tasks(num_tasks, _METHOD, required=False), "num_tasks"
  vector = loss_inputs.preference(preference, _METHOD)
  size = vector.shape[0]
  if num_tasks is not None and hyperparams.num_tasks(num_tasks, _METHOD) != size:
    raise ValueError(f"{_METHOD}: num_tasks={num_tasks} but preference has "
                     f"{size} entries; pass one preference per task (or omit "
                     f"num_tasks).")
  return vector, size, "len(preference)"


def pbi_weights(losses: jax.Array, direction: jax.Array, theta) -> jax.Array:
  """The derivative of PBI's objective with respect to the losses.

  Args:
    losses: [T] losses minus the reference point.
    direction: [T] preference (any positive scale).
    theta: the penalty.

  Returns:
    [T] float32 ``r + theta * (L - d1 r) / d2`` (``r`` alone on the ray).
  """
  r, _ = loss_inputs.unit_and_norm(direction)
  d1 = jnp.dot(losses, r)
  perp, d2 = loss_inputs.unit_and_norm(losses - d1 * r)
  _, size = loss_inputs.unit_and_norm(losses)
  eps = jnp.finfo(jnp.float32).eps
  on_ray = d2 <= _RAY_ULPS * losses.shape[0] * eps * size
  return r + theta * jnp.where(on_ray, 0.0, perp)


def scale_by_pbi(
    theta: Any = 5.0,
    preference: Any = None,
    *,
    num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Scales the tasks by the gradient of the PBI decomposition of MOEA/D.

  With the unit preference direction ``r = p / ||p||`` and the reference
  point ``z``, the losses are split into their progress along the ray and
  their distance from it:

  .. math::
     d_1 = \\langle L - z, r\\rangle, \\qquad d_2 = \\|L - z - d_1 r\\|,
     \\qquad g(L) = d_1 + \\theta\\, d_2 ,

  .. math::
     d_t = \\frac{\\partial g}{\\partial L_t}
       = r_t + \\theta\\, \\frac{(L - z - d_1 r)_t}{d_2} ,

  so ``sum_t d_t g_t`` is the gradient of ``g``. On the ray (``d_2 = 0``,
  where ``d_2`` is not differentiable) the derivative of ``d_2`` is taken as
  0, its minimum-norm subgradient, and so is a ``d_2`` below float32's
  resolution of the losses. A task whose loss lies below the ray (ahead of
  its share) gets a weight below ``r_t``, negative when ``theta`` is large:
  the penalty pulls the losses back onto the ray.

  The reference point is ``z = 0``, the ideal point of nonnegative losses
  that can reach 0. MOEA/D tracks ``z`` as the best value of each objective
  found by its population; for one model trained by gradient steps that
  running minimum is the current loss of every improving task, which puts
  the losses on ``z`` and leaves no direction to the ray, so it is not used.

  Args:
    theta: penalty ``theta >= 0`` on the distance to the ray (the paper's
      experiments use 5). May be traced.
    preference: optional [T] nonnegative direction with a positive entry
      (any scale; it is normalised); ones by default. It fixes T. May be
      traced.
    num_tasks: optional T; when given, the state keeps the weights of the
      last update in ``task_weights``.

  Returns:
    A task scaling; ``update`` requires ``losses=``.

  Raises:
    ValueError: ``theta`` negative or not finite, or a bad ``preference``.
      (A step with a non-finite loss is skipped: zero update, state kept.)

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.scale_by_pbi(theta=1.0, preference=jnp.array([1.0, 0.0]))
    >>> g = {"w": jnp.array([[1.0], [1.0]])}
    >>> tx.update(g, tx.init(None), losses=jnp.array([3.0, 2.0]))[0]["w"]
    Array([[1.],
           [1.]], dtype=float32)

  References:
    Zhang & Li, "MOEA/D: A Multiobjective Evolutionary Algorithm Based on
    Decomposition", IEEE Transactions on Evolutionary Computation 11(6),
    2007 (Section II-C).
  """
  theta = jnp.asarray(hyperparams.nonnegative(theta, _METHOD, "theta"),
                      jnp.float32)
  vector, size, argument = _preference(preference, num_tasks)

  def rule(inputs, state):
    losses = loss_inputs.finite_losses(inputs.losses)
    direction = jnp.ones_like(losses) if vector is None else vector
    return pbi_weights(losses, direction, theta), state

  claims = {"homogeneous"}
  if preference is None:
    claims.add("permutation_equivariant")
  return transform.task_scaling(weighting.Weighting(
      name=_METHOD, rule=rule, reads={"losses"}, num_tasks=size,
      tasks_argument=argument, claims=claims))


pbi = aliases.alias(scale_by_pbi, "pbi")
