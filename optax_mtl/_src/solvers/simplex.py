"""Small convex problems on the probability simplex, solved on the device.

MGDA's min-norm point and CAGrad's dual are convex programs over T weights.
Both are solved here by pairwise Frank-Wolfe: each step moves weight from the
active vertex with the largest partial derivative to the vertex with the
smallest one, with an exact line search. On a polytope this converges
linearly, and its steps never leave the simplex.

On an accelerator a ``lax.while_loop`` trip costs tens of microseconds whatever
the T x T body does, so each trip runs a block of ``_BLOCK`` unrolled steps and
the stopping test (the Frank-Wolfe duality gap) is read once per trip. On a
CPU a trip costs nearly nothing while the unrolled block multiplies the XLA
compile time, so there each trip runs one step (``lax.platform_dependent``
picks the variant when the program is lowered).

References:
  Lacoste-Julien & Jaggi, "On the Global Linear Convergence of Frank-Wolfe
  Optimization Variants", NeurIPS 2015.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.scipy import linalg as jsp_linalg
from jax import lax

from optax_mtl._src.engine import platform

# Steps per loop trip on accelerators: enough that a typical solve ends in a
# few trips, few enough that the unrolled body compiles quickly.
_BLOCK = 8

# (weights, gradient there, vertex s, vertex a) -> unclipped step.
LineSearch = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
Gradient = Callable[[jax.Array], jax.Array]


def _gap_and_vertices(weights, grad):
  toward = jnp.argmin(grad)
  # The away vertex is taken among the weights still in use.
  masked = jnp.where(weights > 0, grad, -jnp.inf)
  away = jnp.argmax(masked)
  gap = jnp.dot(weights, grad) - grad[toward]
  return gap, toward, away


def pairwise_frank_wolfe(
    gradient: Gradient,
    line_search: LineSearch,
    init: jax.Array,
    max_iters,
    tol: Any,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Minimises a convex function of weights on the simplex.

  Each step, with ``g`` the gradient at ``w``, ``s = argmin g`` and ``a`` the
  active vertex with the largest ``g``, moves ``w <- w + gamma (e_s - e_a)``
  with ``gamma`` in ``[0, w_a]`` from ``line_search``. The loop stops when
  the duality gap ``<w, g> - min g`` (an upper bound on the suboptimality)
  is at most ``tol`` or after ``max_iters`` steps. ``tol`` may depend on the
  iterate (a gap relative to the objective's value).

  Args:
    gradient: ``w -> grad f(w)``, [T] -> [T].
    line_search: ``(w, grad f(w), s, a) -> gamma``, the minimiser of ``f(w + gamma (e_s -
      e_a))`` over the real line (it is clipped to ``[0, w_a]`` here).
    init: [T] starting weights on the simplex.
    max_iters: largest number of steps (may be traced).
    tol: duality gap at which to stop (may be traced), or a function
      ``(w, grad f(w)) -> gap`` of the iterate.

  Returns:
    ``(weights, gap, steps)``: the weights, the duality gap at those weights,
    and the number of steps taken.
  """
  num = init.shape[0]
  eye = jnp.eye(num, dtype=init.dtype)
  max_iters = jnp.asarray(max_iters, jnp.int32)
  if callable(tol):
    threshold = tol
  else:
    fixed = jnp.asarray(tol, init.dtype)
    threshold = lambda weights, grad: fixed

  def excess(weights, grad):
    gap, toward, away = _gap_and_vertices(weights, grad)
    return gap - threshold(weights, grad), toward, away

  def step(carry, _):
    weights, steps = carry
    grad = gradient(weights)
    over, toward, away = excess(weights, grad)
    active = (steps < max_iters) & (over > 0) & (toward != away)
    gamma = jnp.clip(line_search(weights, grad, toward, away), 0.0, weights[away])
    gamma = jnp.where(active & jnp.isfinite(gamma), gamma, 0.0)
    weights = weights + gamma * (eye[toward] - eye[away])
    # Rounding can leave -1e-9 where a weight was emptied; the simplex is the
    # feasible set, so snap back onto it.
    weights = jnp.maximum(weights, 0.0)
    return (weights, steps + active.astype(jnp.int32)), None

  def body(carry, block):
    weights, steps, _, _ = carry
    (weights, new_steps), _ = lax.scan(step, (weights, steps), None,
                                       length=block, unroll=True)
    over, _, _ = excess(weights, gradient(weights))
    # A block that took no step has converged (gap <= tol or a single active
    # vertex); stop even if rounding keeps the gap just above tol.
    return weights, new_steps, over, new_steps > steps

  def cond(carry):
    _, steps, over, moved = carry
    return (steps < max_iters) & (over > 0) & moved

  def solve(start, block):
    return lax.while_loop(cond, lambda carry: body(carry, block), start)

  over0, _, _ = excess(init, gradient(init))
  start = (init, jnp.zeros((), jnp.int32), over0, jnp.array(True))
  weights, steps, _, _ = platform.dependent(
      start, cpu=lambda s: solve(s, 1), default=lambda s: solve(s, _BLOCK))
  weights = weights / jnp.sum(weights)
  gap, _, _ = _gap_and_vertices(weights, gradient(weights))
  return weights, gap, steps


def min_norm_pair(gram: jax.Array, i, j):
  """Exact min-norm point of the segment between two gradients.

  ``argmin_{gamma in [0, 1]} ||gamma g_i + (1 - gamma) g_j||^2`` is
  ``gamma = clip((G_jj - G_ij) / (G_ii - 2 G_ij + G_jj), 0, 1)`` (Sener &
  Koltun 2018, Algorithm 1); identical gradients give ``gamma = 1/2``. The
  weight of ``g_j`` is computed as ``(G_ii - G_ij) / (G_ii - 2 G_ij + G_jj)``,
  not as ``1 - gamma``: when ``g_j`` is much longer than ``g_i`` it is tiny,
  and ``1 - gamma`` would keep only its float32 rounding (an error of ~6e-8
  in a weight of ``g_j``, enough to make the update conflict with ``g_j``).

  Returns:
    ``(gamma, rest, value)``: the weights of ``g_i`` and ``g_j`` (summing to
    one) and the squared norm there.
  """
  gii, gjj, gij = gram[i, i], gram[j, j], gram[i, j]
  denom = gii - 2.0 * gij + gjj
  safe = jnp.where(denom > 0, denom, 1.0)
  gamma = jnp.where(denom > 0, jnp.clip((gjj - gij) / safe, 0.0, 1.0), 0.5)
  rest = jnp.where(denom > 0, jnp.clip((gii - gij) / safe, 0.0, 1.0), 0.5)
  value = gamma * gamma * gii + 2.0 * gamma * rest * gij + rest * rest * gjj
  return gamma, rest, value


# Ridge added to the support's (unit-diagonal, Jacobi-scaled) Hessian in the
# Newton polish: keeps the KKT system solvable when gradients are linearly
# dependent (identical tasks, T > rank), at a cost below the solver's
# tolerance.
_RIDGE = 1e-6
# Slack on the objective when accepting a polished point (rounding only).
_ACCEPT_SLACK = 1e-6


def newton_polish(
    objective: Callable[[jax.Array], jax.Array],
    gradient: Gradient,
    hessian: Callable[[jax.Array], jax.Array],
    weights: jax.Array,
    steps: int = 2,
) -> jax.Array:
  """Refines Frank-Wolfe weights by Newton steps on their support.

  Frank-Wolfe stops anywhere within its tolerance, so two runs on matrices
  one rounding error apart can stop at points 1e-5 apart. A Newton step on
  the face of the simplex the iterate lies on (``sum w = 1``, off-support
  weights fixed at 0) lands on that face's optimum, a smooth function of the
  matrix; it is kept only if it stays feasible and does not increase the
  objective (up to rounding).

  Args:
    objective: ``w -> f(w)``.
    gradient: ``w -> grad f(w)``.
    hessian: ``w -> Hessian of f at w``, [T, T].
    weights: [T] point on the simplex.
    steps: number of Newton steps (static).

  Returns:
    [T] weights on the simplex.
  """
  num = weights.shape[0]
  eye = jnp.eye(num, dtype=weights.dtype)

  def one(weights):
    support = weights > 0
    both = support[:, None] & support[None, :]
    raw = hessian(weights)
    # Jacobi scaling d = S e, S = diag(H)^(-1/2) on the support: tasks whose
    # gradients differ by orders of magnitude give curvatures 1e8 apart, which
    # a float32 factorisation of H itself would not resolve.
    diag = jnp.where(support, jnp.diag(raw), 1.0)
    inv_sqrt = jnp.where(diag > 0, jax.lax.rsqrt(jnp.where(diag > 0, diag, 1.0)), 1.0)
    scaled = raw * inv_sqrt[:, None] * inv_sqrt[None, :]
    hess = jnp.where(both, scaled + _RIDGE * eye, eye)
    grad = jnp.where(support, gradient(weights) * inv_sqrt, 0.0)
    ones = jnp.where(support, inv_sqrt, 0.0)  # S 1: the constraint sum(d) = 0
    # The step on the face minimises grad.e + e.H.e / 2 subject to
    # ones.e = 0: e = -H^-1 (grad + mu ones) with mu making the sum vanish.
    # Adding ones ones^T / |ones|^2 changes nothing on that subspace and
    # makes H positive definite even where the objective is flat along w
    # (CAGrad's norm term), so a Cholesky factor serves both solves; it
    # compiles far faster than a general solve of the KKT system.
    hess = hess + jnp.outer(ones, ones) / jnp.dot(ones, ones)
    factor = jsp_linalg.cho_factor(hess)
    solved = jsp_linalg.cho_solve(factor, jnp.stack([grad, ones], axis=1))
    h_grad, h_ones = solved[:, 0], solved[:, 1]
    mu = -jnp.dot(ones, h_grad) / jnp.dot(ones, h_ones)
    delta = -(h_grad + mu * h_ones) * inv_sqrt
    candidate = weights + jnp.where(support, delta, 0.0)
    # Rounding may leave -1e-9 where the face's optimum has a zero weight.
    feasible = jnp.all(jnp.isfinite(candidate)) & jnp.all(candidate > -1e-6)
    candidate = jnp.maximum(candidate, 0.0)
    total = jnp.sum(candidate)
    candidate = candidate / jnp.where(total > 0, total, 1.0)
    old, new = objective(weights), objective(candidate)
    # The slack is relative: a min-norm value of 1e-12 must not accept a
    # polished point 1e-9 worse.
    better = new <= old + _ACCEPT_SLACK * jnp.abs(old)
    return jnp.where(feasible & (total > 0) & better, candidate, weights)

  for _ in range(steps):
    weights = one(weights)
  return weights


def project(values: jax.Array) -> jax.Array:
  """Euclidean projection onto the probability simplex, without sorting.

  ``argmin_{w in simplex} ||w - v||`` is ``max(v - theta, 0)`` with the
  threshold ``theta = max_k (sum_{i <= k} u_i - 1) / k`` over the prefixes
  of ``u``, ``v`` sorted in decreasing order (Held, Wolfe & Crowder 1974;
  Wang & Carreira-Perpinan 2013). The prefixes are the sets ``{i : v_i >=
  v_j}``, so ``theta`` is read from a [T, T] comparison: no sort, whose
  kernel would dominate a T x T loop body on an accelerator. The sums are
  elementwise (no matmul, so no reduced-precision TF32 path on GPUs).

  Args:
    values: [T] real vector.

  Returns:
    [T] weights, non-negative and summing to 1 (up to rounding).
  """
  above = values[None, :] >= values[:, None]  # row j: the i with v_i >= v_j
  sums = jnp.sum(jnp.where(above, values[None, :], 0.0), axis=1)
  counts = jnp.sum(above, axis=1).astype(values.dtype)
  theta = jnp.max((sums - 1.0) / counts)
  return jnp.maximum(values - theta, 0.0)
