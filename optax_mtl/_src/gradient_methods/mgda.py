"""MGDA: the min-norm point of the convex hull of the task gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src import masking
from optax_mtl._src import transform
from optax_mtl._src.gradient_methods import _simplex

_METHOD = "mtl.mgda"
NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def _check(normalization, max_iters, tol):
  if normalization not in NORMALIZATIONS:
    raise ValueError(
        f"{_METHOD}: normalization must be one of {NORMALIZATIONS}, got "
        f"{normalization!r}.")
  iters = _simplex.concrete_value(max_iters)
  if iters is not None and (int(iters) != iters or iters < 1):
    raise ValueError(
        f"{_METHOD}: max_iters must be a positive integer, got {max_iters!r}.")
  tolerance = _simplex.concrete_value(tol)
  if tolerance is not None and not tolerance >= 0:
    raise ValueError(f"{_METHOD}: tol must be >= 0, got {tol!r}.")


def _positive_or_one(x):
  return jnp.where((x > 0) & jnp.isfinite(x), x, 1.0)


def _normalizers(normalization, gram, losses):
  """Per-task divisors as ``(relative, absolute)``.

  ``relative`` is in the units of ``gram.normalized`` and only enters the
  small matrix (so its global scale does not matter); ``absolute`` maps the
  weights back onto the raw gradients. Zero or non-finite divisors become 1
  (a zero gradient stays zero, so the min-norm point is then 0 anyway).
  """
  num = gram.normalized.shape[0]
  unit = jnp.sqrt(jnp.maximum(jnp.diagonal(gram.normalized), 0.0))
  if normalization == "none":
    ones = jnp.ones(num, jnp.float32)
    return ones, ones
  if normalization == "l2":
    return _positive_or_one(unit), _positive_or_one(gram.norms())
  loss = _positive_or_one(losses)
  # Losses divided by their largest entry keep the small matrix in range.
  rel_loss = loss / jnp.max(loss)
  if normalization == "loss":
    return rel_loss, loss
  return rel_loss * _positive_or_one(unit), loss * _positive_or_one(gram.norms())


# Compiled once per shape, so eager updates do not retrace the solver loop.
@jax.jit
def min_norm_weights(gram_matrix: jax.Array, max_iters=250, tol=1e-6):
  """Weights of the min-norm point of the convex hull of the gradients.

  Solves ``min_{a in simplex} a^T G a`` from the Gramian alone. One task gives
  ``[1]``, two tasks the closed form; more tasks start from the best pair and
  run pairwise Frank-Wolfe with exact line search until the duality gap
  ``a^T G a - min_t (G a)_t`` is at most ``tol``, then one Newton step on the
  support found (exact for a quadratic, kept only if feasible and no worse)
  makes the result accurate well below ``tol``.

  Args:
    gram_matrix: [T, T] positive semi-definite matrix (any global scale; the
      tolerance is in its units).
    max_iters: largest number of Frank-Wolfe steps.
    tol: duality gap at which to stop.

  Returns:
    [T] float32 weights on the simplex.
  """
  gram_matrix = jnp.asarray(gram_matrix, jnp.float32)
  num = gram_matrix.shape[0]
  if num == 1:
    return jnp.ones((1,), jnp.float32)
  if num == 2:
    gamma, _ = _simplex.min_norm_pair(gram_matrix, 0, 1)
    return jnp.stack([gamma, 1.0 - gamma])

  # Warm start: the best of the T (T - 1) / 2 exact two-task solutions.
  rows, cols = jnp.triu_indices(num, k=1)
  gammas, values = jax.vmap(
      lambda i, j: _simplex.min_norm_pair(gram_matrix, i, j))(rows, cols)
  best = jnp.argmin(values)
  eye = jnp.eye(num, dtype=jnp.float32)
  init = gammas[best] * eye[rows[best]] + (1.0 - gammas[best]) * eye[cols[best]]

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

  weights, _, _ = _simplex.pairwise_frank_wolfe(gradient, line_search, init,
                                                max_iters, tol)
  # One Newton step solves the quadratic exactly on the support found.
  return _simplex.newton_polish(
      lambda w: 0.5 * jnp.dot(w, gram_matrix @ w), gradient,
      lambda w: gram_matrix, weights, steps=1)


def mgda(
    normalization: str = "none",
    max_iters: int = 250,
    tol: float = 1e-6,
    *,
    shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """MGDA-UB: steps along the min-norm element of the gradients' convex hull.

  With ``d_t`` the normalisers and ``u_t = g_t / d_t``, the update is the
  point of minimum norm of the convex hull of the ``u_t``:

  .. math::
     \\alpha^* = \\arg\\min_{\\alpha \\in \\Delta^T}
       \\Big\\|\\sum_t \\alpha_t u_t\\Big\\|^2, \\qquad
     \\text{update} = \\sum_t \\alpha_t^* u_t
       = \\sum_t \\frac{\\alpha^*_t}{d_t} g_t .

  Its optimality conditions give ``<u_t, update> >= ||update||^2`` for every
  task, so the update conflicts with no task; it is zero exactly when the
  parameters are Pareto-stationary (0 is in the hull). The problem is solved
  on the T x T Gramian: two tasks by the closed form, more by pairwise
  Frank-Wolfe started from the best pair, several steps per loop trip, until
  the duality gap (in units of the largest squared gradient norm) is at most
  ``tol``.

  Normalisations (Sener & Koltun 2018, Section 3.2 and their code):
  ``"none"`` ``d_t = 1``; ``"l2"`` ``d_t = ||g_t||``; ``"loss"`` ``d_t =
  L_t``; ``"loss+"`` ``d_t = L_t ||g_t||``. Zero (or non-positive) normalisers
  leave that task's gradient unscaled. The returned weights include the
  ``1 / d_t``, so the update is the normalised min-norm point applied to the
  raw gradients.

  Args:
    normalization: one of ``"none"``, ``"l2"``, ``"loss"``, ``"loss+"``. The
      last two need ``losses=`` at update.
    max_iters: largest number of Frank-Wolfe steps (T >= 3).
    tol: duality gap at which the solve stops, relative to the largest
      squared norm of the (normalised) task gradients.
    shared: optional mask of shared leaves (pytree of bools or callable on
      params); other leaves are task-specific heads, summed over tasks.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` aggregator.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.mgda()
    >>> task_grads = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
    >>> tx.update(task_grads, tx.init(None))[0]["w"]
    Array([0.5, 0.5], dtype=float32)

  References:
    Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
    NeurIPS 2018. Desideri, "Multiple-gradient descent algorithm (MGDA) for
    multiobjective optimization", 2012.
  """
  _check(normalization, max_iters, tol)

  def weights_fn(inputs, state):
    gram = inputs.gramian
    relative, absolute = _normalizers(normalization, gram, inputs.losses)
    inv = 1.0 / relative
    matrix = gram.normalized * inv[:, None] * inv[None, :]
    # Min-norm weights are invariant to a global rescaling; keep max diag 1.
    top = jnp.max(jnp.diagonal(matrix))
    matrix = matrix / jnp.where(top > 0, top, 1.0)
    alpha = min_norm_weights(matrix, max_iters, tol)
    weights = alpha / absolute
    return jnp.where(jnp.isfinite(weights), weights, 0.0), state

  return transform.aggregator(
      _METHOD, weights_fn, shared=shared, uses_gramian=True,
      needs_losses=normalization in ("loss", "loss+"))
