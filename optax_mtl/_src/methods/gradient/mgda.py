"""MGDA: the min-norm point of the convex hull of the task gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams
from optax_mtl._src.engine import masking
from optax_mtl._src.solvers import min_norm

_METHOD = "mtl.mgda"
NORMALIZATIONS = ("none", "l2", "loss", "loss+")


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


def mgda(
    normalization: str = "none",
    max_iters: int = 250,
    tol: float = 1e-6,
    *,
    num_tasks: int | None = None,
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
    num_tasks: optional T; when given, the state keeps the weights of the
      last update in ``task_weights``.
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
  hyperparams.choice(normalization, NORMALIZATIONS, _METHOD, "normalization")
  hyperparams.integer(max_iters, _METHOD, "max_iters")
  hyperparams.nonnegative(tol, _METHOD, "tol")

  def rule(inputs, state):
    gram = inputs.gramian
    relative, absolute = _normalizers(normalization, gram, inputs.losses)
    inv = 1.0 / relative
    matrix = gram.normalized * inv[:, None] * inv[None, :]
    # Min-norm weights are invariant to a global rescaling; keep max diag 1.
    top = jnp.max(jnp.diagonal(matrix))
    matrix = matrix / jnp.where(top > 0, top, 1.0)
    alpha = min_norm.min_norm_weights(matrix, max_iters, tol)
    weights = alpha / absolute
    return jnp.where(jnp.isfinite(weights), weights, 0.0), state

  uses_losses = normalization in ("loss", "loss+")
  claims = {"permutation_equivariant", "non_conflicting", "stationary_zero"}
  # Dividing by the losses keeps the weights' scale; dividing by the norms
  # absorbs it.
  claims.add("homogeneous" if normalization in ("none", "loss")
             else "task_scale_invariant")
  return transform.aggregator(weighting.Weighting(
      name=_METHOD, rule=rule,
      reads={"gramian"} | ({"losses"} if uses_losses else set()),
      num_tasks=hyperparams.num_tasks(num_tasks, _METHOD, required=False),
      claims=claims), shared=shared)
