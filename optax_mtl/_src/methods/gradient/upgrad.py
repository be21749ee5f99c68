"""UPGrad and DualProj: projections onto the dual cone of the task gradients."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams
from optax_mtl._src.engine import masking
from optax_mtl._src.engine import platform
from optax_mtl._src.solvers import dual_cone

_UPGRAD = "mtl.upgrad"
_DUALPROJ = "mtl.dualproj"


class DualConeState(NamedTuple):
  """State of :func:`upgrad` and :func:`dualproj`.

  Attributes:
    task_weights: [T] weights of the last update, ``update = sum_t w_t g_t``
      (None without ``num_tasks`` or ``preference``).
    residual: float32 scalar, the largest relative KKT residual of the last
      update's projections (about 1e-7 when solved; see
      :func:`optax_mtl._src.solvers.dual_cone.nonnegative_qp`).
  """
  task_weights: jax.Array
  residual: jax.Array


def _initial_state(size):
  return DualConeState(weighting.initial_weights(size), jnp.zeros((), jnp.float32))


def _resolved(gram_matrix, coefficients, residuals):
  """Zeroes the rows whose combination is below float32's resolution.

  ``||sum_t v_t g_t||^2`` is known to about ``8 eps (sum_t |v_t| ||g_t||)^2``;
  a projection below that cannot be told from 0 (the dual cone is then
  flat there, e.g. opposite gradients), and its rounding noise would be an
  update in an arbitrary direction. Such a row is exactly 0, so its
  residual is too.
  """
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram_matrix), 0.0))
  value = jnp.einsum("it,ts,is->i", coefficients, gram_matrix, coefficients)
  resolution = 8.0 * jnp.finfo(jnp.float32).eps * (jnp.abs(coefficients) @ norms) ** 2
  resolved = value > resolution
  return (jnp.where(resolved[:, None], coefficients, 0.0),
          jnp.where(resolved, residuals, 0.0))


# Compiled once per padded shape, so eager updates do not retrace the loop.
@jax.jit
def _padded_projections(gram_matrix):
  eye = jnp.eye(gram_matrix.shape[0], dtype=jnp.float32)
  project = lambda e: dual_cone.project(gram_matrix, e)
  # On CPU one problem after another: each stops after its own active-set
  # steps, where vmapped problems all run until the slowest is done and a
  # batched factorisation is no faster (measured on a 2-core CPU, T = 40
  # with conflicts: 7.5 ms against 10.8 ms). Accelerators solve them together.
  coefficients, residuals = platform.dependent(
      eye, cpu=lambda rows: jax.lax.map(project, rows), default=jax.vmap(project))
  return _resolved(gram_matrix, coefficients, residuals)


@jax.jit
def _padded_combination(gram_matrix, combination):
  v, residual = dual_cone.project(gram_matrix, combination)
  v, residual = _resolved(gram_matrix, v[None], residual[None])
  return v[0], residual[0]


def projection_coefficients(gram_matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Each task gradient's projection onto the dual cone, as combinations.

  Row i of the result holds ``v^(i) = argmin_{v >= e_i} v^T G v``, so the
  projection of ``g_i`` onto ``{u : <g_t, u> >= 0 for all t}`` is ``sum_t
  v^(i)_t g_t``. The T problems are solved together (vmapped; on CPU one
  after another), on the Gramian padded with zero gradients (see
  :func:`optax_mtl._src.solvers.dual_cone.padded_size`).

  Args:
    gram_matrix: [T, T] Gramian (any global scale).

  Returns:
    ``(coefficients, residuals)``: [T, T] float32 and the [T] relative KKT
    residuals of the solves.
  """
  gram_matrix = jnp.asarray(gram_matrix, jnp.float32)
  num = gram_matrix.shape[0]
  size = dual_cone.padded_size(num)
  coefficients, residuals = _padded_projections(dual_cone.pad(gram_matrix, size))
  return coefficients[:num, :num], residuals[:num]


def combination_projection(gram_matrix: jax.Array, combination: jax.Array
                           ) -> tuple[jax.Array, jax.Array]:
  """The projection of ``sum_t u_t g_t`` onto the dual cone, as a combination.

  Args:
    gram_matrix: [T, T] Gramian (any global scale).
    combination: [T] coefficients ``u``.

  Returns:
    ``(v, residual)``: [T] float32 coefficients of the projection and the
    relative KKT residual of the solve.
  """
  gram_matrix = jnp.asarray(gram_matrix, jnp.float32)
  num = gram_matrix.shape[0]
  size = dual_cone.padded_size(num)
  v, residual = _padded_combination(
      dual_cone.pad(gram_matrix, size),
      dual_cone.pad(jnp.asarray(combination, jnp.float32), size))
  return v[:num], residual


def _preference(preference, num_tasks, method):
  """``(vector or None, T or None, tasks_argument)`` after validation."""
  if preference is None:
    return None, hyperparams.num_tasks(num_tasks, method, required=False), "num_tasks"
  vector = hyperparams.weight_vector(preference, method, "preference")
  hyperparams.nonnegative(preference, method, "preference")
  values = hyperparams.concrete(preference)
  if values is not None and not np.any(values > 0):
    raise ValueError(f"{method}: preference must have a positive entry (it "
                     f"weights the tasks' projections), got {values.tolist()}.")
  size = vector.shape[0]
  if num_tasks is not None and hyperparams.num_tasks(num_tasks, method) != size:
    raise ValueError(f"{method}: num_tasks={num_tasks} but preference has "
                     f"{size} entries; pass one preference per task (or omit "
                     f"num_tasks).")
  return vector, size, "len(preference)"


def _claims(preference):
  claims = {"non_conflicting", "homogeneous"}
  if preference is None:
    claims.add("permutation_equivariant")
  return claims


def upgrad(
    preference=None,
    *,
    num_tasks: int | None = None,
    shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """UPGrad: averages the projections of the task gradients onto their dual cone.

  Each gradient is projected onto the dual cone of all of them, the set of
  updates that conflict with no task, and the projections are averaged with
  the preference weights ``p`` (``1/T`` by default):

  .. math::
     \\pi(g_i) = \\arg\\min_{u:\\ \\langle g_t, u\\rangle \\ge 0\\ \\forall t}
       \\|u - g_i\\|^2, \\qquad \\text{update} = \\sum_i p_i\\, \\pi(g_i).

  In Gramian space (Quinton & Rey 2024) ``pi(g_i) = sum_t
  v^(i)_t g_t`` with ``v^(i) = argmin_{v >= e_i} v^T G v``, a box-constrained
  QP on the T x T Gramian; its optimality conditions ``G v^(i) >= 0`` are the
  constraints, so the update conflicts with no task. The T problems are
  solved together (on CPU one after another) by an exact active-set method (see
  :mod:`optax_mtl._src.solvers.dual_cone`), with the active constraints met a
  few ulps inside so they still hold after rounding. The weights ``w = sum_i
  p_i v^(i)`` depend on the Gramian only up to its scale, so the method is
  homogeneous; it is permutation equivariant with the uniform preference.

  Gradients that conflict with no other task are their own projections, so
  without conflicts the update is ``sum_i p_i g_i`` (the mean by default).
  It need not vanish at a Pareto-stationary point: with ``g_1 = -g_2`` and
  ``g_3`` orthogonal to both, 0 is in the convex hull yet ``pi(g_3) = g_3``.
  A projection below float32's resolution of its combination is taken as 0.

  Args:
    preference: optional [T] nonnegative weights of the projections (with a
      positive entry); None for ``1/T`` each. It fixes T (``num_tasks`` may
      then be omitted). May be traced (``optax.inject_hyperparams``).
    num_tasks: optional T; when given, the state keeps the weights of the
      last update in ``task_weights``.
    shared: optional mask of shared leaves (pytree of bools or callable on
      params); other leaves are task-specific heads, summed over tasks.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` aggregator whose state is a
    :class:`DualConeState`.

  Raises:
    ValueError: ``preference`` is not a non-empty vector of finite
      nonnegative values with a positive entry, or its length is not
      ``num_tasks``.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.upgrad()
    >>> task_grads = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
    >>> update, state = tx.update(task_grads, tx.init(None))
    >>> print(update["w"].round(4))
    [0.25 0.75]

  References:
    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization",
    arXiv:2406.16232, 2024.
  """
  vector, size, argument = _preference(preference, num_tasks, _UPGRAD)

  def rule(inputs, state):
    num = inputs.num_tasks
    weights_of = (jnp.full((num,), 1.0 / num, jnp.float32) if vector is None
                  else vector)
    coefficients, residuals = projection_coefficients(inputs.gramian.normalized)
    used = weights_of > 0
    residual = jnp.max(jnp.where(used, residuals, 0.0))
    return weights_of @ coefficients, state._replace(residual=residual)

  return transform.aggregator(weighting.Weighting(
      name=_UPGRAD, rule=rule, init=_initial_state, reads={"gramian"},
      num_tasks=size, tasks_argument=argument,
      claims=_claims(preference)), shared=shared)


def dualproj(
    preference=None,
    *,
    num_tasks: int | None = None,
    shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """DualProj: projects the preference-weighted gradient onto the dual cone.

  .. math::
     \\text{update} = \\arg\\min_{u:\\ \\langle g_t, u\\rangle \\ge 0\\ \\forall t}
       \\Big\\|u - \\sum_t p_t g_t\\Big\\|^2
       = \\sum_t v_t g_t, \\quad v = \\arg\\min_{v \\ge p} v^\\top G v ,

  with ``p = 1/T`` by default: the mean gradient when it conflicts with no
  task, else the closest update that conflicts with none. One box-constrained
  QP on the T x T Gramian, solved exactly (the same solver as
  :func:`upgrad`), its active constraints met a few ulps inside, so the
  update conflicts with no task even when gradients are nearly opposite (a
  regularised solve would leave conflicts of the size of its
  regularisation). Homogeneous; permutation equivariant with the uniform
  preference; like UPGrad it need not vanish at a Pareto-stationary point.

  Args:
    preference: optional [T] nonnegative weights ``p`` (with a positive
      entry); None for ``1/T`` each. It fixes T. May be traced.
    num_tasks: optional T; when given, the state keeps the weights of the
      last update in ``task_weights``.
    shared: optional mask of shared leaves (pytree of bools or callable on
      params); other leaves are task-specific heads, summed over tasks.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` aggregator whose state is a
    :class:`DualConeState`.

  Raises:
    ValueError: as :func:`upgrad`.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.dualproj()
    >>> task_grads = {"w": jnp.array([[1.0, 0.0], [-2.0, 1.0]])}
    >>> update, state = tx.update(task_grads, tx.init(None))
    >>> print(update["w"].round(4))
    [0.  0.5]

  References:
    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization",
    arXiv:2406.16232, 2024 (DualProj, the projection of the mean).
  """
  vector, size, argument = _preference(preference, num_tasks, _DUALPROJ)

  def rule(inputs, state):
    num = inputs.num_tasks
    combination = (jnp.full((num,), 1.0 / num, jnp.float32) if vector is None
                   else vector)
    weights, residual = combination_projection(inputs.gramian.normalized,
                                               combination)
    return weights, state._replace(residual=residual)

  return transform.aggregator(weighting.Weighting(
      name=_DUALPROJ, rule=rule, init=_initial_state, reads={"gramian"},
      num_tasks=size, tasks_argument=argument,
      claims=_claims(preference)), shared=shared)
