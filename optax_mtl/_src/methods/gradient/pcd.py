"""PCD: descent on the primary task, constrained to progress on the others."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams
from optax_mtl._src.engine import masking
from optax_mtl._src.solvers import dual_cone

_METHOD = "mtl.pcd"
# Relative KKT residual above which the constraints count as infeasible
# together (solved problems reach about 1e-7; contradictory ones about 1).
_FEASIBLE_TOL = 1e-3


class PCDState(NamedTuple):
  """State of :func:`pcd`.

  Attributes:
    task_weights: [T] weights of the last update on the raw gradients,
      ``update = sum_t w_t g_t``.
    sq_norm_ema: [T] float32 exponential moving average of ``||g_t||^2``
      (not bias-corrected) in units of ``norm_scale**2``: the EMA itself is
      ``norm_scale**2 * sq_norm_ema``, kept apart so that gradients of norm
      1e20 do not overflow float32.
    norm_scale: scalar, the largest task-gradient norm seen so far (float32;
      float64 under ``jax_enable_x64``).
    count: int32 number of updates (for the bias correction).
    feasible: bool scalar, whether the last update's constraints could be
      met together (False: the update was ``g_0`` itself).
    residual: float32 scalar, the relative KKT residual of the last solve.
  """
  task_weights: jax.Array
  sq_norm_ema: jax.Array
  norm_scale: jax.Array
  count: jax.Array
  feasible: jax.Array
  residual: jax.Array


# Compiled once per padded shape, so eager updates do not retrace the loop.
@jax.jit
def _padded_direction(gram_matrix, levels, free):
  primary = jnp.zeros((gram_matrix.shape[0],), jnp.float32).at[0].set(1.0)
  return dual_cone.project(gram_matrix, primary,
                           offsets=levels * jnp.diagonal(gram_matrix), free=free)


def constrained_direction(gram_matrix: jax.Array, tau: jax.Array
                          ) -> tuple[jax.Array, jax.Array]:
  """PCD's direction as a combination of the (normalised) gradients.

  Solves ``min 1/2 ||d - h_0||^2`` subject to ``<h_j, d> >= tau_j ||h_j||^2``
  for ``j >= 1`` on the Gramian ``H`` of the ``h_t``: ``d = h_0 + sum_j
  lam_j h_j`` with ``lam >= 0`` the multipliers (its dual is a
  nonnegative QP on ``H``; see :mod:`optax_mtl._src.solvers.dual_cone`),
  on ``H`` padded with zero gradients.

  Args:
    gram_matrix: [T, T] Gramian ``H`` of the ``h_t`` (any global scale).
    tau: [T - 1] constraint levels of the secondary tasks.

  Returns:
    ``(z, residual)``: [T] coefficients ``z = (1, lam)`` of ``d`` and the
    solver's relative KKT residual (of order 1 when the constraints are
    infeasible together).
  """
  gram_matrix = jnp.asarray(gram_matrix, jnp.float32)
  num = gram_matrix.shape[0]
  size = dual_cone.padded_size(num)
  levels = jnp.concatenate([jnp.zeros((1,), jnp.float32),
                            jnp.asarray(tau, jnp.float32)])
  free = (jnp.arange(size) > 0) & (jnp.arange(size) < num)
  z, residual = _padded_direction(dual_cone.pad(gram_matrix, size),
                                  dual_cone.pad(levels, size), free)
  return z[:num], residual


# The T x T arithmetic around the solve, compiled once per T so that eager
# updates do not dispatch (and compile) it operation by operation.
@jax.jit
def _normalised_gramian(normalized, scale, sq_norm_ema, norm_scale, count, beta, eps):
  """The Gramian of the h_t up to a common factor, and the updated EMA."""
  beta = jnp.asarray(beta, jnp.float32)
  normalized = jnp.asarray(normalized, jnp.float32)
  # The norms stay in the statistics' dtype (float64 under x64: a norm of
  # 1e150 is not a float32); only their ratios, <= 1, become float32.
  wide = jnp.result_type(scale, norm_scale)
  scale, norm_scale = jnp.asarray(scale, wide), jnp.asarray(norm_scale, wide)
  unit_sq = jnp.maximum(jnp.diagonal(normalized), 0.0)  # (||g_t|| / scale)^2
  # The EMA in units of the largest norm seen: both ratios are <= 1.
  reference = jnp.maximum(norm_scale, scale)
  safe = jnp.where(reference > 0, reference, 1.0)
  old_ratio = (norm_scale / safe).astype(jnp.float32)
  new_ratio = (scale / safe).astype(jnp.float32)
  ema = (beta * sq_norm_ema * old_ratio ** 2
         + (1.0 - beta) * new_ratio ** 2 * unit_sq)
  corrected = ema / (1.0 - beta ** count.astype(jnp.float32))
  # log(v_t + eps) with v_t = reference^2 corrected_t, in range at any scale.
  positive = (corrected > 0) & (reference > 0)
  log_v = jnp.where(positive, 2.0 * jnp.log(safe).astype(jnp.float32)
                    + jnp.log(jnp.where(positive, corrected, 1.0)), -jnp.inf)
  log_denominator = jnp.logaddexp(log_v, jnp.log(jnp.asarray(eps, jnp.float32)))
  # ||h_t|| up to a common factor (the problem is homogeneous in the h's).
  present = unit_sq > 1e4 * jnp.finfo(jnp.float32).tiny
  log_h = jnp.where(present, 0.5 * jnp.log(jnp.where(present, unit_sq, 1.0))
                    - 0.5 * log_denominator, -jnp.inf)
  top = jnp.max(log_h)
  relative = jnp.where(present, jnp.exp(log_h - jnp.where(jnp.isfinite(top), top, 0.0)),
                       0.0)
  inv_unit = jnp.where(present, jax.lax.rsqrt(jnp.where(present, unit_sq, 1.0)), 0.0)
  cosines = normalized * inv_unit[:, None] * inv_unit[None, :]
  h_gram = cosines * relative[:, None] * relative[None, :]
  return h_gram, relative, unit_sq, ema, reference


@jax.jit
def _raw_weights(z, residual, h_gram, relative, unit_sq):
  """Weights on the raw gradients, with the fallbacks; and the feasibility."""
  num = z.shape[0]
  feasible = residual <= _FEASIBLE_TOL
  present = unit_sq > 1e4 * jnp.finfo(jnp.float32).tiny
  inv_unit = jnp.where(present, jax.lax.rsqrt(jnp.where(present, unit_sq, 1.0)), 0.0)
  # ||d||^2 and its float32 resolution, in the units of h_gram.
  d_sq = z @ h_gram @ z
  resolution = 8.0 * jnp.finfo(jnp.float32).eps * jnp.dot(jnp.abs(z), relative) ** 2
  moving = d_sq > resolution
  # w_t = z_t s_t ||g_0|| / ||d||, s_t = ||h_t|| / ||g_t||, in ratios only.
  ratio = jnp.sqrt(unit_sq[0]) * inv_unit
  direction = z * relative * ratio * jax.lax.rsqrt(jnp.where(moving, d_sq, 1.0))
  first = jnp.zeros((num,), jnp.float32).at[0].set(1.0)
  weights = jnp.where(feasible, jnp.where(moving, direction, 0.0), first)
  return jnp.where(present[0], weights, 0.0), feasible


def pcd(
    tau=0.02,
    beta: float = 0.999,
    eps: float = 1e-8,
    *,
    num_tasks: int,
    shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """Priority-constrained descent: task 0 is primary, the others constrain it.

  Each gradient is normalised by a bias-corrected EMA of its squared norm,
  ``h_t = g_t / sqrt(v_t + eps)``, with ``v_t = m_t / (1 - beta^k)``,
  ``m_t <- beta m_t + (1 - beta) ||g_t||^2`` at step ``k``. The direction
  stays as close as possible to the primary one while guaranteeing progress
  on every secondary task:

  .. math::
     d^* = \\arg\\min_d \\tfrac12 \\|d - h_0\\|^2 \\ \\text{s.t.}\\
       \\langle h_j, d\\rangle \\ge \\tau_j \\|h_j\\|^2,\\ j = 1..T-1,
     \\qquad \\text{update} = \\|g_0\\| \\frac{d^*}{\\|d^*\\|} .

  With ``d = h_0 + sum_j lam_j h_j``, ``lam >= 0`` the multipliers, this is
  a linear complementarity problem on the T x T Gramian of the ``h_t``
  (``S G S``, ``S = diag(1 / sqrt(v + eps))``), solved exactly by an
  active-set method. The weights on the raw gradients are ``w_0 = c s_0``,
  ``w_j = c lam_j s_j`` with ``c = ||g_0|| / ||d*||``.

  Fallbacks: ``g_0 = 0`` gives a zero update; ``d* = 0`` (possible only with
  some ``tau_j = 0``) gives a zero update; when the constraints cannot hold
  together (e.g. two secondary gradients are opposite and ``tau > 0``), or
  hold only with multipliers so large that float32 cannot resolve them (the
  solver's relative KKT residual stays above 1e-3), the update is ``g_0``
  itself and the state's ``feasible`` is False. One task gives ``g_0``.

  ``eps`` is in squared-gradient units (added to ``v_t``, like Adam's second
  moment): for gradients far above ``sqrt(eps)`` the direction does not
  depend on any task's scale and the update scales with ``||g_0||``; for
  gradients near or below it the normalisation fades and ``h_t`` tends to
  ``g_t / sqrt(eps)``. The EMA is kept in units of the largest norm seen
  and the normalisation is computed in log space, so gradients of 1e-20 or
  1e20 neither underflow nor overflow (as in the Gramian, a task more than
  about 1e18 times smaller than the largest counts as zero). Not
  permutation equivariant (task 0
  is special), nor exactly homogeneous (``eps``), nor non-conflicting (the
  primary task may be conflicted when the constraints demand it).

  Args:
    tau: constraint level in [0, 1]: a scalar, or one value per secondary
      task, shape ``(T - 1,)``. 0 asks only for no conflict with the
      secondary tasks. May be traced (``optax.inject_hyperparams``).
    beta: EMA decay of the squared norms, in [0, 1).
    eps: positive constant added to ``v_t`` (squared-gradient units).
    num_tasks: T (the state holds one EMA per task).
    shared: optional mask of shared leaves (pytree of bools or callable on
      params); other leaves are task-specific heads, summed over tasks.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` aggregator whose state is a
    :class:`PCDState`.

  Raises:
    TypeError: ``num_tasks`` is not a positive int.
    ValueError: ``tau`` is outside [0, 1] or has the wrong shape, ``beta``
      is outside [0, 1), ``eps`` is not positive.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.pcd(tau=0.0, num_tasks=2)
    >>> task_grads = {"w": jnp.array([[2.0, 0.0], [-1.0, 1.0]])}
    >>> update, state = tx.update(task_grads, tx.init(None))
    >>> print(update["w"].round(4), state.feasible)
    [1.4142 1.4142] True

  References:
    Varam & AlHajri, "Not All Objectives Are Born Equal: Priority-Constrained
    Descent for Hierarchical Multi-Objective Optimization", TMLR 2026
    (arXiv:2606.29521).
  """
  size = hyperparams.num_tasks(num_tasks, _METHOD)
  levels = hyperparams.vector_or_scalar(tau, size - 1, _METHOD, "tau")
  hyperparams.in_range(tau, _METHOD, "tau", 0.0, 1.0)
  hyperparams.in_range(beta, _METHOD, "beta", 0.0, 1.0, high_open=True)
  hyperparams.positive(eps, _METHOD, "eps")

  def init(num):
    return PCDState(weighting.initial_weights(num),
                    jnp.zeros((num,), jnp.float32),
                    jnp.zeros((), jnp.result_type(float)),
                    jnp.zeros((), jnp.int32), jnp.array(True),
                    jnp.zeros((), jnp.float32))

  def rule(inputs, state):
    gram = inputs.gramian
    h_gram, relative, unit_sq, ema, reference = _normalised_gramian(
        gram.normalized, gram.scale, state.sq_norm_ema, state.norm_scale,
        state.count + 1, beta, eps)
    z, residual = constrained_direction(h_gram, levels)
    weights, feasible = _raw_weights(z, residual, h_gram, relative, unit_sq)
    return weights, state._replace(sq_norm_ema=ema, norm_scale=reference,
                                   count=state.count + 1, feasible=feasible,
                                   residual=residual)

  return transform.aggregator(weighting.Weighting(
      name=_METHOD, rule=rule, init=init, reads={"gramian"}, num_tasks=size,
      claims=frozenset()), shared=shared)
