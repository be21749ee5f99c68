"""ConFIG: the direction at equal positive cosine to every task gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams
from optax_mtl._src.engine import masking
from optax_mtl._src.solvers import spectral

_METHOD = "mtl.config"
# The projections <u_t, d> are 1 when the equal-cosine system is solved; a
# least-squares direction that moves some task by less than this is taken
# as not helping it.
_POSITIVE = 1e-3


# Compiled once per shape, so eager updates do not re-trace the eigensolve.
@jax.jit
def conflict_free_weights(gram_matrix: jax.Array) -> jax.Array:
  """ConFIG's weights on the raw gradients, from the Gramian.

  With ``c = C^+ 1`` on the cosine matrix, ``d = sum_t c_t u_t`` has
  ``||d||^2 = c^T C c`` and ``<u_t, d> = (C c)_t``; the update
  ``(sum_t <g_t, d_hat>) d_hat`` is ``sum_t w_t g_t`` with

  .. math::
     w_t = \\frac{\\sum_s \\|g_s\\| (C c)_s}{\\|g_t\\|\\, c^\\top C c}\\, c_t .

  The global scale cancels, so the normalised norms serve.

  Args:
    gram_matrix: [T, T] Gramian divided by any positive constant.

  Returns:
    [T] float32 weights, or zeros (see :func:`config`).
  """
  solution = spectral.equal_cosine(gram_matrix)
  norms = solution.unit_norms
  inv_norms = jnp.where(solution.alive,
                        1.0 / jnp.where(solution.alive, norms, 1.0), 0.0)
  direction_sq = jnp.dot(solution.coeffs, solution.projections)
  magnitude = jnp.dot(norms, solution.projections)
  ok = solution.helps_every_task(_POSITIVE) & (direction_sq > 0)
  factor = jnp.where(ok, magnitude / jnp.where(ok, direction_sq, 1.0), 0.0)
  weights = factor * solution.coeffs * inv_norms
  return jnp.where(jnp.isfinite(weights), weights, 0.0)


def config(
    *,
    num_tasks: int | None = None,
    shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """ConFIG: conflict-free inverse gradients.

  With the unit gradients ``u_t = g_t / ||g_t||`` as the rows of ``U``, the
  direction is the least-norm ``d`` at the same positive cosine to every
  task, rescaled by the sum of the gradients' projections onto it:

  .. math::
     d = U^{+} \\mathbf 1, \\quad \\hat d = d / \\|d\\|, \\quad
     \\text{update} = \\Big(\\sum_t \\langle g_t, \\hat d\\rangle\\Big)\\,\\hat d ,

  so ``<u_t, update>`` is the same positive number for every task. From the
  cosine matrix ``C = D^{-1} G D^{-1}`` (``D = diag ||g_t||``), ``U^+ 1 =
  sum_t c_t u_t`` with ``c = C^+ 1``, which gives the weights on the raw
  gradients without touching them. Two tasks give ``update = (||g_1|| +
  ||g_2||) (u_1 + u_2) / 2``.

  Degenerate cases: zero gradients (norm below ``1e-15`` of the largest,
  where the float32 Gramian no longer resolves their direction) are left out
  of ``U`` (weight 0);
  linearly dependent gradients use the pseudo-inverse on the eigenvalues of
  ``C`` above ``16 T eps lam_max``. When no direction has equal cosines,
  ``d`` is the least-squares one of the authors' code, kept if it still has
  a positive projection on every task; if it does not (opposite gradients,
  a Pareto-stationary point) the update is zero, so the update conflicts
  with no task (other than one counted as a zero gradient). The magnitude grows with the gradients' norms, so the method
  is homogeneous but not invariant to each task's scale.

  Args:
    num_tasks: optional T; when given, the state keeps the weights of the
      last update in ``task_weights``.
    shared: optional mask of shared leaves (pytree of bools or callable on
      params); other leaves are task-specific heads, summed over tasks.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` aggregator.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.config()
    >>> task_grads = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
    >>> tx.update(task_grads, tx.init(None))[0]["w"]
    Array([1.5, 1.5], dtype=float32)

  References:
    Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics
    Informed Neural Networks", ICLR 2025.
  """

  def rule(inputs, state):
    return conflict_free_weights(inputs.gramian.normalized), state

  return transform.aggregator(weighting.Weighting(
      name=_METHOD, rule=rule, reads={"gramian"},
      num_tasks=hyperparams.num_tasks(num_tasks, _METHOD, required=False),
      claims={"permutation_equivariant", "homogeneous", "non_conflicting"}),
      shared=shared)
