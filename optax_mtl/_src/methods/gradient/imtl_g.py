"""IMTL-G: the combination of the gradients that projects equally onto each task."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams
from optax_mtl._src.engine import masking
from optax_mtl._src.solvers import spectral

_METHOD = "mtl.imtl_g"
# The equal projections <u_t, d> are 1 when the system is solved; a direction
# that moves some task by less than this is taken as not helping it.
_POSITIVE = 1e-3
# The common projection is 1 / sum_t (c_t / ||g_t||): it grows without bound
# as the sum goes to 0 and turns against every task past it. A sum below
# this fraction of sum_t |c_t| / ||g_t|| gives a zero update instead, which
# caps the projection at 1e3 times the largest gradient norm.
_RESOLVED_SUM = 1e-3


# Compiled once per shape, so eager updates do not re-trace the eigensolve.
@jax.jit
def impartial_weights(gram_matrix: jax.Array) -> jax.Array:
  """IMTL-G's weights from the Gramian.

  With ``n_t = ||g_t||``, ``C`` the cosine matrix and ``c = C^+ 1``
  (:func:`~optax_mtl._src.solvers.spectral.equal_cosine`), the weights are
  ``w_t = (c_t / n_t) / sum_s (c_s / n_s)``. For linearly independent
  gradients this is ``w = G^{-1} n / 1^T G^{-1} n``; for dependent ones the
  pseudo-inverse is taken of ``C`` rather than of ``G``, which keeps colinear
  tasks at the limit of nearby independent ones (``G^+`` would not). Zero
  weights (a zero update) when the projections would not all be positive:
  see :func:`imtl_g`.

  Args:
    gram_matrix: [T, T] Gramian divided by any positive constant.

  Returns:
    [T] float32 weights summing to 1, or zeros.
  """
  solution = spectral.equal_cosine(gram_matrix)
  inv_norms = jnp.where(solution.alive,
                        1.0 / jnp.where(solution.alive, solution.unit_norms, 1.0),
                        0.0)
  raw = solution.coeffs * inv_norms
  total = jnp.sum(raw)
  resolved = total > _RESOLVED_SUM * jnp.sum(jnp.abs(raw))
  ok = solution.helps_every_task(_POSITIVE) & resolved
  weights = jnp.where(ok, raw / jnp.where(ok, total, 1.0), 0.0)
  return jnp.where(jnp.isfinite(weights), weights, 0.0)


def imtl_g(
    *,
    num_tasks: int | None = None,
    shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """IMTL-G: impartial multi-task learning, the gradient part.

  The update is the affine combination of the task gradients whose
  projections onto every unit task gradient ``u_t = g_t / ||g_t||`` are
  equal:

  .. math::
     u = \\sum_t w_t g_t, \\quad \\sum_t w_t = 1, \\quad
     \\langle u, u_1\\rangle = \\dots = \\langle u, u_T\\rangle .

  In terms of the Gramian ``G`` and the norms ``n``, ``G w = k n`` for a
  scalar ``k``, so ``w = G^{-1} n / 1^T G^{-1} n``. It is computed from the
  cosine matrix ``C = D^{-1} G D^{-1}`` (``D = diag(n)``): with ``c = C^+ 1``,

  .. math::
     w_t = \\frac{c_t / n_t}{\\sum_s c_s / n_s}, \\qquad
     \\langle u, u_t\\rangle = \\frac{1}{\\sum_s c_s / n_s} .

  Two tasks give ``u = (u_1 + u_2) / (1/n_1 + 1/n_2)``. Degenerate cases:

  * zero gradients (norm below ``1e-15`` of the largest, where the float32
    Gramian no longer resolves their direction) get weight 0; the other
    tasks keep the property;
  * linearly dependent gradients (identical, colinear, more tasks than the
    rank): ``C^+`` keeps the eigenvalues above ``16 T eps lam_max``. Colinear
    gradients ``g`` and ``a g`` give the limit of nearby independent pairs,
    ``w = (a, 1) / (1 + a)``, and identical ones the mean. When no
    combination has equal projections the least-squares ``c`` makes them as
    equal as the span allows;
  * when some projection would be 0 or negative (opposite gradients, a
    Pareto-stationary point, or ``sum_s c_s / n_s <= 0``, where the
    equal-projection update with weights summing to 1 increases every loss),
    or ``sum_s c_s / n_s`` is below ``1e-3 sum_s |c_s| / n_s`` (near 0 the
    update grows without bound), the update is zero. The update therefore conflicts with no task (other
    than one counted as a zero gradient).

  Args:
    num_tasks: optional T; when given, the state keeps the weights of the
      last update in ``task_weights``.
    shared: optional mask of shared leaves (pytree of bools or callable on
      params); other leaves are task-specific heads, summed over tasks.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` aggregator.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.imtl_g()
    >>> task_grads = {"w": jnp.array([[1.0, 0.0], [0.0, 3.0]])}
    >>> tx.update(task_grads, tx.init(None))[0]["w"]
    Array([0.75, 0.75], dtype=float32)

  References:
    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial
    Multi-task Learning", ICLR 2021 (Section 3.2, IMTL-G).
  """

  def rule(inputs, state):
    return impartial_weights(inputs.gramian.normalized), state

  return transform.aggregator(weighting.Weighting(
      name=_METHOD, rule=rule, reads={"gramian"},
      num_tasks=hyperparams.num_tasks(num_tasks, _METHOD, required=False),
      claims={"permutation_equivariant", "homogeneous", "non_conflicting"}),
      shared=shared)
