"""The min-norm point of the convex hull of the task gradients, from the Gramian.

MGDA's subproblem, also the inner step of other multiple-gradient methods:
``min_{a in simplex} a^T G a``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optax_mtl._src.solvers import simplex


# Compiled once per shape, so eager updates do not retrace the solver loop.
@jax.jit
def min_norm_weights(gram_matrix: jax.Array, max_iters=250, tol=1e-6):
  """Weights of the min-norm point of the convex hull of the gradients.

  Solves ``min_{a in simplex} a^T G a`` from the Gramian alone. One task gives
  ``[1]``, two tasks the closed form; more tasks start from the best pair and
  run pairwise Frank-Wolfe with exact line search until the duality gap
  ``a^T G a - min_t (G a)_t`` is at most ``tol * a^T G a`` (plus the float32
  resolution of ``a^T G a``), then one Newton step on the support found
  (exact for a quadratic, kept only if feasible and no worse) makes the
  result accurate well below ``tol``. The gap is relative because it is
  what guarantees non-conflict: ``(G a)_t >= (1 - tol) a^T G a > 0`` for
  every task, also when some gradients are orders of magnitude smaller than
  others. A min-norm value below the float32 resolution gives zero weights
  (Pareto-stationary within precision).

  Args:
    gram_matrix: [T, T] positive semi-definite matrix (any global scale; the
      tolerance is in its units).
    max_iters: largest number of Frank-Wolfe steps.
    tol: duality gap at which to stop, relative to ``a^T G a``.

  Returns:
    [T] float32 weights on the simplex, or zeros at a Pareto-stationary
    point.
  """
  gram_matrix = jnp.asarray(gram_matrix, jnp.float32)
  num = gram_matrix.shape[0]
  if num == 1:
    return jnp.ones((1,), jnp.float32)
  if num == 2:
    gamma, rest, _ = simplex.min_norm_pair(gram_matrix, 0, 1)
    return jnp.stack([gamma, rest])

  # Warm start: the best of the T (T - 1) / 2 exact two-task solutions.
  rows, cols = jnp.triu_indices(num, k=1)
  gammas, rests, values = jax.vmap(
      lambda i, j: simplex.min_norm_pair(gram_matrix, i, j))(rows, cols)
  best = jnp.argmin(values)
  eye = jnp.eye(num, dtype=jnp.float32)
  init = gammas[best] * eye[rows[best]] + rests[best] * eye[cols[best]]

  def gradient(weights):
    return gram_matrix @ weights

  def line_search(weights, grad, toward, away):
    del weights
    # f(w + g d) with d = e_s - e_a is a parabola in g with curvature d^T G d.
    curvature = (gram_matrix[toward, toward] - 2.0 * gram_matrix[toward, away]
                 + gram_matrix[away, away])
    slope = grad[toward] - grad[away]
    return jnp.where(curvature > 0, -slope / jnp.where(curvature > 0, curvature, 1.0),
                     jnp.inf)

  tol = jnp.asarray(tol, jnp.float32)
  weights, _, _ = simplex.pairwise_frank_wolfe(
      gradient, line_search, init, max_iters,
      lambda w, grad: tol * jnp.maximum(jnp.dot(w, grad), 0.0) + _resolution(gram_matrix, w))
  # One Newton step solves the quadratic exactly on the support found.
  weights = simplex.newton_polish(
      lambda w: 0.5 * jnp.dot(w, gram_matrix @ w), gradient,
      lambda w: gram_matrix, weights, steps=1)
  # Below the float32 resolution of a^T G a the hull's min-norm point cannot
  # be told from 0: the parameters are Pareto-stationary within precision.
  value = jnp.dot(weights, gram_matrix @ weights)
  return jnp.where(value > _resolution(gram_matrix, weights), weights, 0.0)


def _resolution(gram_matrix, weights):
  """Rounding error of ``a^T G a`` in float32: ``8 eps (sum_t a_t ||g_t||)^2``."""
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram_matrix), 0.0))
  return 8.0 * jnp.finfo(jnp.float32).eps * jnp.dot(weights, norms) ** 2
