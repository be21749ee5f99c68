"""MoDo: multi-objective gradient with double sampling."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams
from optax_mtl._src.engine import masking
from optax_mtl._src.paths import two_batch
from optax_mtl._src.solvers import simplex

_METHOD = "mtl.modo"


class MoDoState(NamedTuple):
  """State of :func:`modo`.

  Attributes:
    task_weights: [T] weights of the last update, ``lambda_{t+1}``, applied to
      the raw gradients of the update's batch.
    simplex_weights: [T] float32 ``lambda`` on the simplex, the point the
      next update steps from (kept apart from ``task_weights``, which a
      skipped non-finite step zeroes). It starts uniform.
  """
  task_weights: jax.Array
  simplex_weights: jax.Array


# Compiled once per shape, so eager updates do not retrace.
@jax.jit
def weight_step(cross_matrix: jax.Array, weights: jax.Array, gamma, rho) -> jax.Array:
  """MoDo's step ``lambda <- Proj_simplex(lambda - gamma (C + rho I) lambda)``.

  Args:
    cross_matrix: [T, T] ``C`` (any scale; ``gamma`` and ``rho`` are in its
      units).
    weights: [T] ``lambda`` on the simplex.
    gamma: the step size ``>= 0``.
    rho: the regularisation ``>= 0``.

  Returns:
    [T] float32 weights on the simplex.
  """
  cross_matrix = jnp.asarray(cross_matrix, jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  # Elementwise, not a matmul: no reduced-precision (TF32) path on GPUs.
  grad = (jnp.sum(cross_matrix * weights[None, :], axis=1)
          + jnp.asarray(rho, jnp.float32) * weights)
  return simplex.project(weights - jnp.asarray(gamma, jnp.float32) * grad)


def modo(
    gamma: float = 0.1,
    rho: float = 0.1,
    *,
    num_tasks: int,
    shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """MoDo: MGDA's weights tracked by one unbiased stochastic step per update.

  MGDA weights the gradients by the minimiser of ``1/2 ||J^T lambda||^2`` on
  the simplex; with stochastic gradients, solving it on one mini-batch is
  biased. MoDo instead takes one projected gradient step per update on that
  problem (regularised by ``rho/2 ||lambda||^2``), its gradient estimated
  without bias by the cross matrix of two independent mini-batches, then
  steps the model along the new weights (Algorithm 1):

  .. math::
     \\lambda_{t+1} = \\Pi_{\\Delta}\\Big(\\lambda_t - \\gamma
       \\Big(\\frac{J_1 J_2^\\top}{s_1 s_2} + \\rho I\\Big)\\lambda_t\\Big),
     \\qquad \\text{update} = J_3^\\top \\lambda_{t+1} .

  ``J1`` are the per-task gradients passed as ``task_grads``, ``J2`` those
  passed as ``second_grads``, ``J3`` those passed as ``third_grads`` (a third
  independent batch, as in the paper's algorithm) or else ``task_grads``.
  ``s1``, ``s2`` are the largest task-gradient norms of the two batches:
  ``gamma`` and ``rho`` are relative to their product, so the weights do not
  depend on the losses' scale (the paper's raw step and regulariser are
  ``gamma / (s1 s2)`` and ``rho s1 s2``). ``gamma = 0`` keeps the uniform
  weights (static weighting); large ``gamma`` moves them toward MGDA's.
  With the same batch twice the step is projected gradient descent on ``1/2
  lambda^T (G / s^2 + rho I) lambda``. The authors' code (two batches)
  steps the model with the sum of the two batches' gradients; pass
  ``third_grads=`` their mean for that.

  Give the second batch as ``update(task_grads, state, params,
  second_grads=g2, third_grads=g3)``, e.g. from
  :func:`optax_mtl.value_and_jacobians`; without ``second_grads`` the update
  raises a ``ValueError`` (:func:`optax_mtl.same_batch` reads one batch
  twice). ``mtl.chain`` cannot fuse it (a task scaling would rescale one
  batch only); chain optimizers after it with ``optax.chain``.

  Args:
    gamma: step of the weights on the simplex (``>= 0``), relative to the
      batches' largest norms. May be traced (``optax.inject_hyperparams``,
      e.g. a decaying schedule as in the paper's analysis).
    rho: regularisation of the weights' problem (``>= 0``), in the same
      units. May be traced.
    num_tasks: T (the state holds ``lambda``).
    shared: optional mask of shared leaves (pytree of bools or callable on
      params); the cross matrix is read over them, other leaves are
      task-specific heads, summed over tasks.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` aggregator whose state is a
    :class:`MoDoState`.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.modo(gamma=0.5, rho=0.0, num_tasks=2)
    >>> g1 = {"w": jnp.array([[2.0, 0.0], [0.0, 1.0]])}
    >>> g2 = {"w": jnp.array([[2.0, 0.0], [0.0, -1.0]])}
    >>> update, state = tx.update(g1, tx.init(None), second_grads=g2)
    >>> state.task_weights
    Array([0.34375, 0.65625], dtype=float32)
    >>> update["w"]
    Array([0.6875 , 0.65625], dtype=float32)

  References:
    Chen, Fernando, Ying & Chen, "Three-Way Trade-Off in Multi-Objective
    Learning: Optimization, Generalization and Conflict-Avoidance", NeurIPS
    2023 (Algorithm 1, MoDo); extended in JMLR 2024.
  """
  hyperparams.nonnegative(gamma, _METHOD, "gamma")
  hyperparams.nonnegative(rho, _METHOD, "rho")
  size = hyperparams.num_tasks(num_tasks, _METHOD)

  def init(size):
    return MoDoState(weighting.initial_weights(size),
                     # float32 also under x64: the solver's output, so the
                     # state keeps its types across updates.
                     jnp.full((size,), 1.0 / size, jnp.float32))

  def rule(inputs, state):
    cross = two_batch.cross_matrix(inputs, _METHOD)
    lam = weight_step(cross.normalized, state.simplex_weights, gamma, rho)
    return lam, state._replace(simplex_weights=lam)

  return two_batch.aggregator(weighting.Weighting(
      name=_METHOD, rule=rule, init=init, num_tasks=size,
      claims={"permutation_equivariant", "homogeneous"}), shared=shared)
