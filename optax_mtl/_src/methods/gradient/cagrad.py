"""CAGrad: the update that best helps the worst task near the mean gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams
from optax_mtl._src.engine import masking
from optax_mtl._src.solvers import simplex

_METHOD = "mtl.cagrad"
# Duality gap of the dual solve (units: largest squared task-gradient norm).
_TOL = 1e-6
_MAX_ITERS = 200
# Below this squared norm of g_w the step along g_w is taken as zero.
_TINY = 1e-30


# Compiled once per shape, so eager updates do not retrace the solver loop.
@jax.jit
def dual_weights(gram_matrix: jax.Array, c, max_iters=_MAX_ITERS, tol=_TOL):
  """Solves CAGrad's dual on the simplex from the Gramian.

  .. math::
     \\min_{w \\in \\Delta^T} F(w) = g_w^\\top g_0 + \\sqrt{\\phi}\\,\\|g_w\\|,
     \\quad g_w = \\sum_t w_t g_t, \\ g_0 = \\tfrac1T \\sum_t g_t,
     \\ \\sqrt{\\phi} = c \\|g_0\\|

  by pairwise Frank-Wolfe from the uniform weights. Along ``e_s - e_a`` the
  objective is ``a0 + a1 x + k sqrt(q2 (x + q1/q2)^2 + m)``, whose minimiser
  has a closed form, so every step uses an exact line search. Two Newton
  steps on the support found then refine the weights well below ``tol``.

  Args:
    gram_matrix: [T, T] Gramian (any global scale).
    c: CAGrad's constant (>= 0).
    max_iters: largest number of Frank-Wolfe steps.
    tol: duality gap at which to stop (units of ``gram_matrix``).

  Returns:
    ``(w, lam)``: [T] dual weights and ``lam = sqrt(phi) / ||g_w||`` (0 when
    ``g_w = 0``), so the CAGrad direction is ``g_0 + lam g_w``.
  """
  gram_matrix = jnp.asarray(gram_matrix, jnp.float32)
  num = gram_matrix.shape[0]
  uniform = jnp.full((num,), 1.0 / num, jnp.float32)
  mean_grad = gram_matrix @ uniform                   # G b = [<g_t, g_0>]
  g0_norm = jnp.sqrt(jnp.maximum(jnp.dot(uniform, mean_grad), 0.0))
  k = jnp.asarray(c, jnp.float32) * g0_norm           # sqrt(phi)

  def gradient(w):
    gw = gram_matrix @ w
    q = jnp.dot(w, gw)
    inv = jnp.where(q > _TINY, jax.lax.rsqrt(jnp.maximum(q, _TINY)), 0.0)
    return mean_grad + k * gw * inv

  def line_search(w, grad, toward, away):
    del grad
    gw = gram_matrix @ w
    a1 = mean_grad[toward] - mean_grad[away]
    q0 = jnp.dot(w, gw)
    q1 = gw[toward] - gw[away]
    q2 = (gram_matrix[toward, toward] - 2.0 * gram_matrix[toward, away]
          + gram_matrix[away, away])
    # Linear along the segment (g_s == g_a or k == 0): go to the lower end.
    linear = jnp.where(a1 < 0, jnp.inf, -jnp.inf)
    safe_q2 = jnp.where(q2 > 0, q2, 1.0)
    safe_k = jnp.where(k > 0, k, 1.0)
    shift = q1 / safe_q2
    m = jnp.maximum(q0 - q1 * shift, 0.0)
    r = -a1 / safe_k
    # Stationary point of a1 + k (q1 + q2 x) / sqrt(q(x)): it exists when
    # r^2 < q2; otherwise the slope keeps the sign of -r.
    inside = r * r < q2
    denom = jnp.where(inside, safe_q2 * (q2 - r * r), 1.0)
    u = jnp.sign(r) * jnp.sqrt(jnp.maximum(r * r * m / denom, 0.0))
    curved = jnp.where(inside, u - shift, jnp.where(r > 0, jnp.inf, -jnp.inf))
    return jnp.where((q2 > 0) & (k > 0), curved, linear)

  def objective(w):
    q = jnp.dot(w, gram_matrix @ w)
    return jnp.dot(w, mean_grad) + k * jnp.sqrt(jnp.maximum(q, 0.0))

  def hessian(w):
    gw = gram_matrix @ w
    q = jnp.maximum(jnp.dot(w, gw), _TINY)
    inv = jax.lax.rsqrt(q)
    return k * (gram_matrix * inv - jnp.outer(gw, gw) * inv ** 3)

  w, _, _ = simplex.pairwise_frank_wolfe(gradient, line_search, uniform,
                                          max_iters, tol)
  w = simplex.newton_polish(objective, gradient, hessian, w, steps=2)
  q = jnp.dot(w, gram_matrix @ w)
  lam = jnp.where(q > _TINY, k * jax.lax.rsqrt(jnp.maximum(q, _TINY)), 0.0)
  return w, lam


def cagrad(
    c: float = 0.4,
    rescale: int = 1,
    *,
    num_tasks: int | None = None,
    shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """CAGrad: conflict-averse gradient descent.

  The update maximises the worst task's first-order improvement within a
  ball around the mean gradient ``g_0``:

  .. math::
     \\max_d \\min_t \\langle g_t, d\\rangle \\ \\text{s.t.}\\
       \\|d - g_0\\| \\le c\\,\\|g_0\\| .

  Its dual is ``min_{w in simplex} <g_w, g_0> + sqrt(phi) ||g_w||`` with
  ``sqrt(phi) = c ||g_0||``; from the optimal ``w`` the direction is

  .. math::
     d = g_0 + \\frac{\\sqrt{\\phi}}{\\|g_w\\|} g_w ,

  divided by 1 (``rescale=0``), ``1 + c^2`` (``rescale=1``) or ``1 + c``
  (``rescale=2``), the three modes of the authors' code. ``c = 0`` gives the
  mean gradient. The dual is solved on the Gramian by pairwise Frank-Wolfe
  with exact line searches; ``d`` is returned as per-task weights ``(1/T +
  lam w_t) / divisor``.

  Args:
    c: radius of the ball relative to ``||g_0||`` (>= 0). May be traced
      (``optax.inject_hyperparams``).
    rescale: 0, 1 or 2 as above. May be traced.
    num_tasks: optional T; when given, the state keeps the weights of the
      last update in ``task_weights``.
    shared: optional mask of shared leaves (pytree of bools or callable on
      params); other leaves are task-specific heads, summed over tasks.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` aggregator.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.cagrad(c=0.0)
    >>> task_grads = {"w": jnp.array([[2.0, 0.0], [0.0, 4.0]])}
    >>> tx.update(task_grads, tx.init(None))[0]["w"]
    Array([1., 2.], dtype=float32)

  References:
    Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for
    Multi-task Learning", NeurIPS 2021.
  """
  hyperparams.nonnegative(c, _METHOD, "c")
  hyperparams.choice(rescale, (0, 1, 2), _METHOD, "rescale")

  def rule(inputs, state):
    num = inputs.num_tasks
    w, lam = dual_weights(inputs.gramian.normalized, c)
    c32 = jnp.asarray(c, jnp.float32)
    divisor = jnp.where(rescale == 0, 1.0,
                        jnp.where(rescale == 1, 1.0 + c32 * c32, 1.0 + c32))
    return (1.0 / num + lam * w) / divisor, state

  return transform.aggregator(weighting.Weighting(
      name=_METHOD, rule=rule, reads={"gramian"},
      num_tasks=hyperparams.num_tasks(num_tasks, _METHOD, required=False),
      claims={"permutation_equivariant", "homogeneous"}), shared=shared)
