"""Nash-MTL: the Nash bargaining solution among the tasks' gradients."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams
from optax_mtl._src.engine import masking
from optax_mtl._src.solvers import positive_system

_METHOD = "mtl.nash_mtl"
# Largest relative residual |a_t (G a)_t - 1| accepted as converged.
_TOL = 1e-5


class NashMTLState(NamedTuple):
  """State of :func:`nash_mtl`.

  Attributes:
    task_weights: [T] float32 weights applied at the last update (the
      bargaining weights times the norm cap), ``update = sum_t w_t g_t``.
    weights: [T] float32 bargaining weights of the last solve (before the
      cap) times that step's largest gradient norm ``s``, i.e. the weights
      of the gradients divided by ``s``: scale-free, so they stay in float32
      whatever the gradients' scale. Reused until the next solve.
    log_scale: float32, ``log s`` of the last solve (``a = weights /
      exp(log_scale)``).
    count: int32, updates since ``weights`` were solved for (0 at a solve);
      the weights are recomputed when it is 0.
    residual: float32, ``max_t |a_t (G a)_t - 1|`` of the last solve (scale
      free; at least 1 when no solution exists).
    converged: bool, whether the last solve converged. When it did not, the
      weights are the last Newton iterate if it conflicts with no task, else
      zeros (a Pareto-stationary point among the nonzero gradients: no
      update improves every task), never equal weights in disguise.
  """
  task_weights: jax.Array
  weights: jax.Array
  log_scale: jax.Array
  count: jax.Array
  residual: jax.Array
  converged: jax.Array


def _log(x):
  """``log x`` for x > 0, else 0 (a factor that plays no part)."""
  return jnp.log(jnp.where(x > 0, x, 1.0))


def _norm_cap(weights, gram, max_norm):
  """``min(1, max_norm / ||u||)`` for ``u = sum_t a_t g_t``; 1 if max_norm = 0.

  ``||u||^2 = a^T G a = (s m)^2 (a / m)^T Ghat (a / m)`` with ``m = max_t
  a_t``: ``s m`` is of order one whatever the gradients' scale (``a_t`` is
  about ``1 / ||g_t||``), so nothing overflows.
  """
  largest = jnp.max(jnp.abs(weights))
  safe = jnp.where(largest > 0, largest, 1.0)
  unit = weights / safe
  quad = jnp.dot(unit, gram.normalized @ unit)
  norm = gram.scale * safe * jnp.sqrt(jnp.maximum(quad, 0.0))
  max_norm = jnp.asarray(max_norm, jnp.float32)
  capped = (max_norm > 0) & (norm > max_norm) & jnp.isfinite(norm)
  return jnp.where(capped, max_norm / jnp.where(capped, norm, 1.0), 1.0)


# Compiled once per shape, so eager updates do not retrace the cond and the
# solver inside it.
@jax.jit
def _step(gram, state, max_norm, update_every, optim_iters):
  """One update's weights and new state (without ``task_weights``)."""
  dtype = gram.normalized.dtype

  def solve(_):
    solution = positive_system.solve(gram.normalized, gram.scale, 1.0,
                                     optim_iters, _TOL)
    # a_t s lies within [1e-15, 1e15] / sqrt(T) whatever s: float32 holds it.
    unit = (solution.weights * gram.scale).astype(jnp.float32)
    return (solution.weights, unit, _log(gram.scale).astype(jnp.float32),
            solution.residual, solution.converged)

  def reuse(_):
    weights = (state.weights.astype(dtype)
               * jnp.exp(-state.log_scale.astype(dtype)))
    return (weights, state.weights, state.log_scale, state.residual,
            state.converged)

  weights, unit, log_scale, residual, converged = lax.cond(
      state.count == 0, solve, reuse, None)
  applied = weights * _norm_cap(weights, gram, max_norm).astype(dtype)
  count = (state.count + 1) % jnp.asarray(update_every, jnp.int32)
  return applied, state._replace(weights=unit, log_scale=log_scale,
                                 count=count, residual=residual,
                                 converged=converged)


def nash_mtl(
    max_norm: float = 1.0,
    update_every: int = 1,
    optim_iters: int = 20,
    *,
    num_tasks: int,
    shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """Nash-MTL: the tasks bargain over the update; its Nash solution is taken.

  The update ``u`` maximises ``sum_t log <u, g_t>`` within a ball (the Nash
  bargaining solution, with no update as the disagreement point). Its
  optimality conditions give ``u = sum_t a_t g_t`` with

  .. math::
     a_t\\,(G a)_t = 1 \\quad (a > 0), \\qquad G_{ts} = \\langle g_t, g_s\\rangle,

  so every task improves, ``<u, g_t> = 1 / a_t > 0``, and ``||u||^2 = a^T G
  a = T``. Scaling ``g_t`` by ``c_t > 0`` scales ``a_t`` by ``1 / c_t``: the
  update does not depend on the tasks' gradient scales. The system is solved
  on the device by damped Newton on the convex potential ``a^T G a / 2 -
  sum_t log a_t`` (:mod:`optax_mtl._src.solvers.positive_system`), for at
  most ``optim_iters`` steps; tasks with a zero gradient get weight 0 and
  the others are solved for.

  The norm cap of the authors' code (``clip_grad_norm_`` on the combined
  shared gradient) is applied to the weights with ``||u||^2 = a^T G a`` from
  the current Gramian: the update is multiplied by ``min(1, max_norm /
  ||u||)``. For an exact solution ``||u|| = sqrt(T)``, so with the default
  ``max_norm = 1`` every update of two or more tasks has unit norm. (The
  authors' code solves on ``G / ||G||_F`` and applies those weights to the
  raw gradients, which multiplies the update by ``sqrt(||G||_F)`` before the
  cap; here the weights solve the system for ``G`` itself, as in the paper.)
  The weights are solved for every ``update_every`` updates and reused in
  between (with the cap recomputed on the current gradients).

  Where the authors' code falls back silently (its convex solver failing),
  the state says so: ``converged`` and ``residual`` of the last solve. No
  solution exists exactly when 0 is in the convex hull of the nonzero task
  gradients (e.g. two opposite gradients: no update improves both); the
  weights are then zero. Near such points the solution exists but is
  ill-conditioned and the update keeps its norm.

  Args:
    max_norm: cap on the update's norm (> 0), or 0 for none. May be traced.
    update_every: solve for the weights every this many updates (>= 1), as
      the authors' ``update_weights_every``; reuse them in between.
    optim_iters: largest number of Newton steps per solve (>= 1). Each
      converges quadratically; a well-conditioned solve takes 2 to 6.
    num_tasks: T (required: the state keeps the last weights).
    shared: optional mask of shared leaves (pytree of bools or callable on
      params); other leaves are task-specific heads, summed over tasks.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` aggregator whose state is a
    :class:`NashMTLState`.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.nash_mtl(max_norm=0.0, num_tasks=2)
    >>> task_grads = {"w": jnp.array([[2.0, 0.0], [0.0, 4.0]])}
    >>> update, state = tx.update(task_grads, tx.init(None))
    >>> jnp.round(update["w"], 4), jnp.round(state.task_weights, 4)
    (Array([1., 1.], dtype=float32), Array([0.5 , 0.25], dtype=float32))

  References:
    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya,
    "Multi-Task Learning as a Bargaining Game", ICML 2022.
  """
  hyperparams.nonnegative(max_norm, _METHOD, "max_norm")
  hyperparams.integer(update_every, _METHOD, "update_every")
  hyperparams.integer(optim_iters, _METHOD, "optim_iters")
  size = hyperparams.num_tasks(num_tasks, _METHOD)

  def init(num):
    return NashMTLState(
        task_weights=weighting.initial_weights(num),
        weights=jnp.zeros((num,), jnp.float32),
        log_scale=jnp.zeros((), jnp.float32),
        count=jnp.zeros((), jnp.int32),
        residual=jnp.zeros((), jnp.float32),
        converged=jnp.array(False))

  def rule(inputs, state):
    # Fixed dtypes: one compiled step per T, also for injected hyperparameters.
    return _step(inputs.gramian, state, jnp.asarray(max_norm, jnp.float32),
                 jnp.asarray(update_every, jnp.int32),
                 jnp.asarray(optim_iters, jnp.int32))

  claims = {"permutation_equivariant", "task_scale_invariant"}
  every = hyperparams.concrete(update_every)
  # Weights reused on later gradients may conflict with them.
  if every is not None and every == 1:
    claims.add("non_conflicting")
  return transform.aggregator(weighting.Weighting(
      name=_METHOD, rule=rule, init=init, reads={"gramian"}, num_tasks=size,
      claims=claims), shared=shared)
