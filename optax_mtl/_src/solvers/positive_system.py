"""The positive solution of ``G w = w^(-1/alpha)`` from the task Gramian.

Nash-MTL (``alpha = 1``: ``w_t (G w)_t = 1``) and FairGrad (any ``alpha >
0``) weight the task gradients by the positive solution of

.. math::
   G w = w^{-1/\\alpha} \\quad (\\text{elementwise power}),

the stationary point of the strictly convex potential

.. math::
   \\phi(w) = \\tfrac12 w^\\top G w - \\sum_t f_\\alpha(w_t), \\quad
   f_1 = \\log, \\quad
   f_\\alpha(w) = \\frac{w^{1 - 1/\\alpha}}{1 - 1/\\alpha} \\ (\\alpha \\ne 1)

on ``w > 0``: ``-f_alpha'' (w) = w^(-1/alpha - 1) / alpha > 0`` for every
``alpha > 0``, so its Hessian ``G + diag(w^(-1/alpha - 1) / alpha)`` is
positive definite even when ``G`` is singular (identical or colinear
gradients). The solution exists exactly when no nonzero ``v >= 0`` has ``G v
= 0``, i.e. when 0 is not in the convex hull of the task gradients: for such
a ``v``, ``v^T G w = 0`` while ``v^T w^(-1/alpha) > 0``. Tasks with a zero
gradient are therefore taken out (weight 0) and the system is solved on the
others; a Pareto-stationary point among those (e.g. two opposite gradients)
has no solution, which the solver reports instead of returning a made-up
answer.

Scale: with ``G = s^2 Ghat`` the solution is ``w = s^(-2 alpha / (1 +
alpha)) what``. The solve runs on the correlation matrix ``C = N^-1 Ghat
N^-1`` (``N`` the normalised gradient norms) in the variables ``y = N what``,
where the system reads ``C y = n^(1/alpha - 1) y^(-1/alpha)``; unit diagonal
makes it independent of how the tasks' scales differ (for ``alpha = 1`` it is
exactly scale-free), and the powers of ``n`` and ``s`` are applied at the end
in pieces that stay inside float32's range.

Damped Newton on the potential in relative coordinates: ``r`` solves the
Jacobi-scaled Newton system by Cholesky, and the step is the best of a few
candidates along ``y (1 + t r)`` and ``y exp(t r)`` (all evaluated at once,
no inner loop) that keep ``y`` positive and in range and decrease the
potential by Armijo's rule and by more than its rounding error. Started from
the exact solution for orthogonal gradients, rescaled along its ray to the
potential's minimum there (exact for identical gradients too), it converges
in a handful of steps (3 to 6 on average, at most 13, on random problems
with gradient norms a thousand times apart and alpha from 0.1 to 10). As in :mod:`.simplex`, a ``lax.while_loop``
trip runs a block of steps on accelerators (one on CPU) and reads the
stopping test once.

References:
  Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task
  Learning as a Bargaining Game", ICML 2022. Ban & Ji, "Fair Resource
  Allocation in Multi-Task Learning", ICML 2024. Boyd & Vandenberghe, "Convex
  Optimization", 2004, Section 9.5 (damped Newton, backtracking).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy import linalg as jsp_linalg

from optax_mtl._src.engine import platform

# Newton steps per loop trip on accelerators (one on CPU, where a trip is
# nearly free and unrolled Cholesky factorisations only add compile time).
_BLOCK = 4
# A task whose squared gradient norm is at most this fraction of the largest
# one has a zero gradient within float32's range (norm ratio 1e-15): its
# equation has no solution, so it is taken out.
_ZERO = 1e-30
# Candidate step lengths: t0 * _SHRINK^k, k < _CANDIDATES.
_CANDIDATES = 10
_SHRINK = 0.5
# No step may shrink a y_t by more than this fraction of its value.
_TO_BOUNDARY = 0.9
# The iterate stays in [_Y_MIN, _Y_MAX]. Above, it is diverging (no
# solution) and y^2 would overflow float32; a weak barrier (alpha >> 1)
# puts legitimate solutions far below 1, y_t ~ ((C y)_t / c_t)^(-alpha).
_Y_MIN = 1e-30
_Y_MAX = 1e17
# Newton decrement (relative to sum_t b_t) below which an iterate no step
# can improve counts as converged; without a solution it stays of order 1.
_STUCK_DECREMENT = 1e-3
# Armijo's sufficient-decrease constant.
_ARMIJO = 1e-4
# Ridge on the unit-diagonal Newton matrix: keeps float32 Cholesky
# well-defined when the problem is close to having no solution.
_RIDGE = 1e-6
_EPS = float(jnp.finfo(jnp.float32).eps)


class Solution(NamedTuple):
  """The solver's result.

  Attributes:
    weights: [T] weights ``w`` for the Gramian ``scale^2 * normalized``
      (float32; float64 for a float64 Gramian, whose scale may exceed
      float32's range): the solution when ``converged``; otherwise the last
      iterate if it conflicts with no task (``(G w)_t > 0``), else zeros.
      Zero for tasks with a zero gradient; always finite.
    residual: float32 scalar, ``max_t |(G w)_t w_t^(1/alpha) - 1|`` over the
      tasks with a nonzero gradient at the last iterate (scale-free; 0 when
      every gradient is zero). About 1 or more when no solution exists.
    converged: bool scalar, whether ``residual <= tol`` or the potential is
      minimised to float32's resolution (see :func:`solve`); False when no
      solution exists or the input is not finite.
    iterations: int32 scalar, Newton steps taken.
  """
  weights: jax.Array
  residual: jax.Array
  converged: jax.Array
  iterations: jax.Array


class _Problem(NamedTuple):
  """``C y = c y^(-1/alpha)`` on the correlation matrix (see the module)."""
  corr: jax.Array        # [T, T] unit diagonal; identity rows for inactive
  log_c: jax.Array       # [T] log c_t = (1/alpha - 1) log n_t; 0 if inactive
  power: jax.Array       # p = 1 - 1/alpha
  inv_alpha: jax.Array   # 1/alpha
  active: jax.Array      # [T] bool, tasks with a nonzero gradient

  def rhs_terms(self, y):
    """``b = c y^p``: y_t times the right-hand side of equation t."""
    return jnp.exp(self.log_c + self.power * jnp.log(y))

  def residual(self, y):
    """``max_t |y_t (C y)_t / b_t - 1|`` over active tasks, finite."""
    b = self.rhs_terms(y)
    ratio = jnp.abs((y * (self.corr @ y) - b) / b)
    ratio = jnp.where(jnp.isfinite(ratio), ratio, jnp.inf)
    ratio = jnp.where(self.active, ratio, 0.0)
    return jnp.minimum(jnp.max(ratio), jnp.finfo(jnp.float32).max)


def _phi_excess(x, p):
  """``((1 + x)^p - 1) / p - x`` (``log(1 + x) - x`` at ``p = 0``), accurately.

  ``f_alpha(y (1 + x)) - f_alpha(y) = y^p (x + this)``; the series near 0
  avoids the cancellation of the direct form, whose size is ``x^2``.
  """
  log1p = jnp.log1p(x)
  safe_p = jnp.where(p == 0, 1.0, p)
  direct = jnp.where(p == 0, log1p, jnp.expm1(p * log1p) / safe_p) - x
  q = p - 1.0
  series = x * x * (0.5 * q + x * (q * (p - 2.0) / 6.0
                                   + x * q * (p - 2.0) * (p - 3.0) / 24.0))
  return jnp.where(jnp.abs(x) < 1e-3, series, direct)


def _newton_step(problem: _Problem, y: jax.Array):
  """One damped Newton step on the potential, in relative coordinates.

  With ``y' = y (1 + r)`` the gradient is ``Y grad = y C y - b`` and the
  Hessian ``Y C Y + diag(b / alpha)``; ``r`` solves their Newton system
  (Jacobi-scaled to unit diagonal, so tasks of any relative scale factorise
  alike). The step is the candidate of least potential among ``y (1 + t r)``
  (``t = t0 2^-k``, ``t0`` the fraction to the boundary) and ``y exp(t r)``
  (``t = 2^-k``) that keep ``y`` in range and decrease the potential by
  Armijo's rule and by more than its rounding error.

  Returns:
    ``(new_y, moved, decrement)``: the new iterate (``y`` when no candidate
    is accepted), whether it moved, and the Newton decrement ``lambda^2 =
    -r . Y grad`` relative to ``sum_t b_t`` (twice the potential's excess
    over its minimum, near the solution, in the potential's own units).
  """
  num = y.shape[0]
  corr, inv_alpha = problem.corr, problem.inv_alpha
  ycy = y * (corr @ y)
  b = problem.rhs_terms(y)
  grad = ycy - b
  ycy_mat = y[:, None] * corr * y[None, :]
  diag_m = y * y + b * inv_alpha
  inv_sqrt = lax.rsqrt(diag_m)
  matrix = ((ycy_mat + jnp.diag(b * inv_alpha))
            * inv_sqrt[:, None] * inv_sqrt[None, :]
            + _RIDGE * jnp.eye(num, dtype=jnp.float32))
  factor = jsp_linalg.cho_factor(matrix)
  r = inv_sqrt * jsp_linalg.cho_solve(factor, -grad * inv_sqrt)
  r = jnp.where(jnp.all(jnp.isfinite(r)), r, -grad / diag_m)
  slope = jnp.dot(r, grad)                        # -lambda^2 < 0

  # Candidates along two paths with the same initial direction r: the
  # Newton line y (1 + t r), cut at the fraction to the boundary, and the
  # curve y exp(t r), which can shrink a y_t by many orders of magnitude in
  # one step (a weak barrier, alpha >> 1, puts some y_t near 0).
  most_negative = jnp.max(-r)
  t0 = jnp.where(most_negative > _TO_BOUNDARY,
                 _TO_BOUNDARY / jnp.maximum(most_negative, _TO_BOUNDARY), 1.0)
  halvings = _SHRINK ** jnp.arange(_CANDIDATES, dtype=jnp.float32)
  ts = jnp.concatenate([t0 * halvings, halvings])             # [2K]
  xs = jnp.concatenate([(t0 * halvings)[:, None] * r[None, :],
                        jnp.expm1(halvings[:, None] * r[None, :])])  # [2K, T]
  # phi(y (1 + x)) - phi(y) with the first-order part taken out of the
  # barrier, so that no two large terms cancel; and its rounding error.
  yx = y[None, :] * xs
  quad = jnp.sum(yx * (yx @ corr), axis=1)
  change = (xs @ grad + 0.5 * quad
            - jnp.sum(b[None, :] * _phi_excess(xs, problem.power), axis=1))
  # (grad carries the rounding of C y: y_t (|C| y)_t, not |y_t (C y)_t|.)
  noise = 8.0 * _EPS * (jnp.abs(xs) @ (y * (jnp.abs(corr) @ y) + b)
                        + jnp.sum(jnp.abs(yx) * (jnp.abs(yx) @ jnp.abs(corr)),
                                  axis=1))
  new_y = y[None, :] * (1.0 + xs)
  inside = jnp.all((new_y > _Y_MIN) & (new_y < _Y_MAX), axis=1)
  # Armijo's decrease, and one float32 can tell from rounding.
  ok = (inside & jnp.isfinite(change) & (change <= _ARMIJO * ts * slope)
        & (change < -noise))
  moved = jnp.any(ok) & (slope < 0)
  best = jnp.argmin(jnp.where(ok, change, jnp.inf))
  new_y = jnp.where(moved, new_y[best], y)
  decrement = jnp.where(jnp.isfinite(slope), -slope, jnp.inf) / jnp.sum(b)
  return new_y, moved, decrement


def _problem(gram, scale, alpha):
  """The float32 system on the correlation matrix, and what maps y back.

  Returns:
    ``(problem, norms, log_scale, finite, positive)``: ``norms`` the
    normalised gradient norms n_t (1 for inactive tasks) and ``log_scale``
    ``log s`` for the matrix rescaled to largest diagonal 1, both in the
    input's dtype (float64 inputs keep scales such as 1e150).
  """
  dtype = gram.dtype
  num = gram.shape[0]
  eye = jnp.eye(num, dtype=bool)
  finite = jnp.all(jnp.isfinite(gram)) & jnp.isfinite(scale)
  gram = jnp.where(finite, gram, 0.0)
  diag = jnp.diagonal(gram)
  top = jnp.max(diag)
  positive = finite & (top > 0) & (scale > 0)
  safe_top = jnp.where(top > 0, top, 1.0)
  active = positive & (diag > _ZERO * safe_top)
  unit = gram / safe_top
  norms = jnp.sqrt(jnp.where(active, jnp.diagonal(unit), 1.0))
  # normalized / top has largest diagonal 1 and scale s sqrt(top).
  log_scale = (jnp.log(jnp.where(positive, scale, 1.0).astype(dtype))
               + 0.5 * jnp.log(safe_top))
  corr = (unit / norms[:, None] / norms[None, :]).astype(jnp.float32)
  # Inactive tasks become decoupled copies of y_t = 1 (C_tt = 1, c_t = 1),
  # which solve their own equation at once and leave the others untouched.
  both = active[:, None] & active[None, :]
  corr = jnp.where(both & ~eye, corr, eye.astype(jnp.float32))
  inv_alpha = 1.0 / alpha
  log_c = jnp.where(active, (inv_alpha - 1.0)
                    * jnp.log(norms).astype(jnp.float32), 0.0)
  problem = _Problem(corr, log_c, 1.0 - inv_alpha, inv_alpha, active)
  return problem, norms, log_scale, finite, positive


def _initial(problem, alpha):
  """Orthogonal gradients' solution, moved to the potential's minimum on its ray.

  ``y_t = c_t^(alpha / (1 + alpha))`` solves the system when ``C = I``; along
  ``kappa y`` the potential is least at ``kappa^(1 + 1/alpha) = sum_t b_t /
  y^T C y`` (exact for identical gradients as well).
  """
  shrink = alpha / (1.0 + alpha)
  y = jnp.exp(shrink * problem.log_c)
  quad = jnp.dot(y, problem.corr @ y)
  log_kappa = shrink * (jnp.log(jnp.sum(problem.rhs_terms(y)))
                        - jnp.log(jnp.where(quad > 0, quad, 1.0)))
  scaled = jnp.clip(y * jnp.exp(log_kappa), _Y_MIN, _Y_MAX)
  return jnp.where(quad > _EPS * jnp.sum(y) ** 2, scaled, y)


def solve(normalized: jax.Array, scale: jax.Array, alpha=1.0, max_iters=20,
          tol=1e-5) -> Solution:
  """Solves ``G w = w^(-1/alpha)``, ``w > 0``, with ``G = scale^2 normalized``.

  Newton steps run until the relative residual ``max_t |(G w)_t
  w_t^(1/alpha) - 1|`` is at most ``tol``, or the Newton decrement (relative
  to ``sum_t w_t (G w)_t``) is at most ``tol^2``: the potential is then
  minimised to float32's resolution even where the residual cannot be
  resolved (a task's right-hand side far below the rounding error of ``(G
  w)_t``: nearly opposite gradients, or ``alpha`` far from 1 with gradient
  norms orders of magnitude apart). When no solution exists the decrement
  stays of order 1 while the iterate diverges, so neither test passes.

  Args:
    normalized: [T, T] positive semi-definite matrix (any global scale;
      :attr:`Gramian.normalized` has largest diagonal 1).
    scale: scalar ``s`` with ``G = s^2 normalized`` (:attr:`Gramian.scale`).
    alpha: ``alpha > 0`` (may be traced).
    max_iters: largest number of Newton steps (may be traced).
    tol: largest relative residual accepted as converged.

  Returns:
    A :class:`Solution`. A non-finite matrix or scale gives zero weights and
    ``converged = False``.
  """
  gram = jnp.asarray(normalized)
  if gram.dtype != jnp.float64:
    gram = gram.astype(jnp.float32)
  # Fixed dtypes (no weak types): one compiled solver per T and dtype,
  # whatever Python numbers or arrays the hyperparameters arrive as.
  return _solve(gram, jnp.asarray(scale, gram.dtype),
                jnp.asarray(alpha, jnp.float32),
                jnp.asarray(max_iters, jnp.int32), jnp.asarray(tol, jnp.float32))


# Compiled once per shape, so eager updates do not retrace the Newton loop.
@jax.jit
def _solve(gram, scale, alpha, max_iters, tol) -> Solution:
  """:func:`solve` on canonical arguments."""
  dtype = gram.dtype
  problem, norms, log_scale, finite, positive = _problem(gram, scale, alpha)

  inf = jnp.array(jnp.inf, jnp.float32)

  def step(carry, _):
    # decrement: the Newton decrement where the last step was computed;
    # stuck: whether no step was found there.
    y, iters, halt, decrement, stuck = carry
    stop = halt | (iters >= max_iters) | (problem.residual(y) <= tol)
    new_y, moved, new_decrement = _newton_step(problem, y)
    take = ~stop & moved
    y = jnp.where(take, new_y, y)
    decrement = jnp.where(stop, decrement, new_decrement)
    stuck = jnp.where(stop, stuck, ~moved)
    # Stop after a step from a decrement below tol^2 (the potential is then
    # minimised to ~tol^4), or when no step float32 can tell from rounding
    # is left.
    halt = halt | (~stop & (~moved | (new_decrement <= tol * tol)))
    return (y, iters + take.astype(jnp.int32), halt, decrement, stuck), None

  def body(carry, block):
    y, iters, halt, decrement, stuck, _ = carry
    (y, iters, halt, decrement, stuck), _ = lax.scan(
        step, (y, iters, halt, decrement, stuck), None, length=block,
        unroll=True)
    return y, iters, halt, decrement, stuck, problem.residual(y)

  def cond(carry):
    _, iters, halt, _, _, residual = carry
    return (iters < max_iters) & (residual > tol) & ~halt

  def run(start, block):
    return lax.while_loop(cond, lambda carry: body(carry, block), start)

  y0 = _initial(problem, alpha)
  start = (y0, jnp.zeros((), jnp.int32), jnp.array(False), inf,
           jnp.array(False), problem.residual(y0))
  y, iters, _, decrement, stuck, residual = platform.dependent(
      start, cpu=lambda s: run(s, 1), default=lambda s: run(s, _BLOCK))
  # A step from a decrement below tol^2 only improves on it. Stuck (no step
  # beats rounding) with a small decrement: the minimum within float32,
  # where the residual itself cannot be resolved. Without a solution the
  # decrement stays of order 1.
  converged = positive & ((residual <= tol) | (decrement <= tol * tol)
                          | (stuck & (decrement <= _STUCK_DECREMENT)))
  # Without convergence the iterate is kept only if it helps every task; no
  # solution at all always leaves some (C y)_t <= 0, so then it is zero (the
  # bargaining problem's disagreement point).
  helps = jnp.all(((problem.corr @ y) > 0) | ~problem.active)
  keep = problem.active & (converged | helps)
  # w = y / n * s^(-2 alpha / (1 + alpha)), the power split in two factors so
  # that no intermediate leaves float32's range when w itself does not.
  half = jnp.exp(-(alpha / (1.0 + alpha)).astype(dtype) * log_scale)
  weights = jnp.where(keep, (y.astype(dtype) / norms) * half * half, 0.0)
  weights = jnp.where(jnp.isfinite(weights), weights, 0.0)
  residual = jnp.where(positive, residual,
                       jnp.where(finite, 0.0, jnp.finfo(jnp.float32).max))
  converged = converged | (finite & ~jnp.any(problem.active))
  return Solution(weights, residual, converged, iters)
