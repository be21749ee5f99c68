"""Nonnegative quadratic programs on a small PSD matrix: dual-cone projections.

UPGrad, DualProj and priority-constrained descent project a combination of
the task gradients onto a polyhedron cut out by the gradients themselves,
``{y : <g_j, y> >= b_j}``. Written as ``y = sum_t v_t g_t`` with ``v = u +
x``, ``x >= 0`` the multipliers of the constraints, the projection of ``sum_t
u_t g_t`` is the solution of a box-constrained QP on the Gramian ``G``

.. math::
   \\min_{x \\ge 0} \\tfrac12 x^\\top A x - c^\\top x, \\qquad
   A = G, \\ c = b - G u,

whose KKT conditions are the linear complementarity problem ``y = A x - c
>= 0`` (the constraints hold), ``x >= 0``, ``x_t y_t = 0``. Coordinates may
be fixed at 0 (``free``): their row is then no constraint.

The solver is Lawson & Hanson's active-set method for nonnegative least
squares, written on the Gramian: keep a set ``P`` of positive multipliers,
solve ``A_PP x_P = c_P`` exactly, step back to the last feasible point and
drop a multiplier when the solution has a negative entry, else add the most
violated constraint. Every step is one factorisation of a T x T matrix, in a
bounded ``lax.while_loop``. It starts from the constraints violated at
``x = 0`` (``c > 0``), so a typical solve ends in two or three steps; a
constraint enters only when it is violated at the current least-squares
point, so dependent gradients (identical, colinear, T > rank) do not pile
up in ``P`` as a full-exchange (block pivoting) method's guesses do.

Where ``A_PP`` is still singular or nearly so, the solves use ``A_PP + mu I``
with a ridge ``mu`` of a few ulps (after a Jacobi scaling to unit diagonal)
and iterative refinement ``x <- (A_PP + mu I)^-1 (c_P + mu x)``, the
proximal-point iteration: on a consistent system it converges to an exact
solution, so no ridge is left in the result; on an inconsistent one (PCD's
constraints may contradict each other) the equations stay violated, and the
returned residual shows it.

Rounding. A constraint met with equality, ``<g_t, update> = 0``, comes out
of float32 arithmetic as +-eps times the terms it sums, which nearly
opposite gradients make large relative to the update. So the solution is
polished in the same loop (usually one more step): the problem is solved
again from it with every constraint tightened by a few ulps of those terms,
``y_t >= 4 eps (l + sum_s x_s)`` (scaled units; ``l`` the size of the point
projected), and that solution is kept when it conflicts less. When the
constraints' cone has no interior (opposite gradients) the tightened
problem is infeasible and the plain solution is kept.

References:
  Lawson & Hanson, "Solving Least Squares Problems", Prentice-Hall 1974
  (Chapter 23, algorithm NNLS). Rockafellar, "Monotone operators and the
  proximal point algorithm", SIAM J. Control Optim. 1976.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy import linalg as jsp_linalg

from optax_mtl._src.engine import platform

# Active-set steps per loop trip on accelerators, where a trip costs tens of
# microseconds; on CPUs one (an unrolled block only adds compile time).
_BLOCK = 2
# Refinement solves per step, all on one factorisation.
_REFINE = 3
# Rounding margin of the tightened constraints, in ulps of the terms summed.
_MARGIN = 4.0
# Refinement that reduces the residual by less than this per step has stalled.
_STALL = 0.9


def padded_size(num: int) -> int:
  """The size T is padded to: 4, then the multiples of 8 (at least T).

  Padding with zero gradients changes no solution (their rows are fixed and
  no constraint) and lets eager updates with T = 1..4, 5..8, 9..16, ...
  share one compiled solver. Multiples of 8 rather than powers of two: the
  padded rows are solved too, and each active-set step factorises every
  row's matrix (measured on a 2-core CPU, UPGrad's 40 projections on a
  40-task Gramian with conflicts: 11 ms at size 40, 28 ms at 64).
  """
  return 4 if num <= 4 else 8 * -(-num // 8)


def pad(array: jax.Array, size: int) -> jax.Array:
  """Zero-pads every axis of a [T] or [T, T] array to ``size``."""
  return jnp.pad(array, [(0, size - n) for n in array.shape])


class Solution(NamedTuple):
  """What :func:`nonnegative_qp` returns.

  Attributes:
    x: [T] multipliers, ``>= 0``, zero where fixed.
    residual: scalar relative KKT residual ``max_t |min(x_t, y_t)| / rho`` of
      the Jacobi-scaled problem (``y = A x - c``, ``rho = max(|c|, |A x|)``):
      about 1e-7 when solved in float32, of order 1 when the constraints are
      infeasible together.
    iterations: int32 number of active-set steps taken.
  """
  x: jax.Array
  residual: jax.Array
  iterations: jax.Array


def _dtype(matrix):
  return jnp.float64 if jnp.asarray(matrix).dtype == jnp.float64 else jnp.float32


class _Run(NamedTuple):
  """The active-set loop's carry."""
  passive: jax.Array   # [T] bool, the active constraints P
  x: jax.Array         # [T] multipliers
  steps: jax.Array     # int32, in the current phase
  total: jax.Array     # int32, in both phases
  last_res: jax.Array  # residual on P before the last refinement
  ridge: jax.Array
  done: jax.Array      # bool, the current phase has finished
  tight: jax.Array     # bool, the phase with tightened constraints
  shift: jax.Array     # their tightening (0 before)
  plain_x: jax.Array   # [T] the solution of the plain problem


def _solve(a, c, usable, margin, max_iters, margin_steps) -> _Run:
  """Lawson-Hanson steps on ``min_{x >= 0} 1/2 x'Ax - c'x`` (unit diagonal).

  Two phases in one loop: the plain problem, then (when ``margin`` is not
  None) the problem with every constraint tightened by ``shift = margin +
  4 eps sum(x)``, from the plain solution.
  """
  num = a.shape[0]
  dtype = a.dtype
  eps = jnp.finfo(dtype).eps
  tol = 8.0 * jnp.sqrt(jnp.asarray(num, dtype)) * eps
  index = jnp.arange(num)
  with_margin = margin is not None

  def solve_on(passive, center, ridge, target):
    both = passive[:, None] & passive[None, :]
    system = jnp.where(both, a, 0.0) + jnp.diag(jnp.where(passive, ridge, 1.0))
    factor = jsp_linalg.cho_factor(system, lower=True)
    x = center
    for _ in range(_REFINE):
      x = jsp_linalg.cho_solve(factor, jnp.where(passive, target + ridge * x, 0.0))
    return jnp.where(passive, x, 0.0)

  def begin_tight(run: _Run) -> _Run:
    shift = _MARGIN * eps * jnp.sum(run.x) + margin
    return run._replace(steps=jnp.zeros((), jnp.int32),
                        last_res=jnp.asarray(jnp.inf, dtype),
                        done=jnp.array(False), tight=jnp.array(True),
                        shift=shift, plain_x=run.x)

  def step(run: _Run) -> _Run:
    if with_margin:
      switch = ~run.tight & (run.done | (run.steps >= max_iters))
      run = jax.tree.map(lambda n, o: jnp.where(switch, n, o), begin_tight(run), run)
    passive, x = run.passive, run.x
    target = jnp.where(usable, c + run.shift, 0.0)
    z = solve_on(passive, x, run.ridge, target)
    failed = ~jnp.all(jnp.isfinite(z))
    z = jnp.where(failed, x, z)
    az = a @ z
    y = az - target
    # Rounding of y = A x - c is about eps (|c| + sum |x|) (unit diagonal,
    # |A_ts| <= 1); signs within it are not told apart.
    magnitude = jnp.max(jnp.abs(target)) + jnp.sum(jnp.abs(z))
    negative = passive & (z < -tol * magnitude)
    ok = ~jnp.any(negative) & ~failed
    rho = jnp.maximum(jnp.max(jnp.abs(target)), jnp.max(jnp.abs(az)))
    res = jnp.max(jnp.where(passive, jnp.abs(y), 0.0)) / jnp.where(rho > 0, rho, 1.0)
    # The equations on P hold to rounding, or refinement no longer improves
    # them (an inconsistent system: constraints infeasible together).
    refine = ok & (res > tol) & (res < _STALL * run.last_res)
    accept = ok & ~refine
    # Accepted: the least-squares point of P. Add the most violated
    # constraint, or stop when none is.
    kept = passive & (z > 0)
    xa = jnp.where(kept, z, 0.0)
    ya = a @ xa - target
    entering = usable & ~kept & (ya < -2.0 * eps * magnitude)
    worst = jnp.argmin(jnp.where(entering, ya, jnp.inf))
    pa = kept | (entering & (index == worst))
    # A negative entry: move from x toward z until a multiplier reaches 0,
    # and drop it (x = 0 on a new member of P drops it at once).
    ratio = jnp.where(negative, x / jnp.where(negative, x - z, 1.0), jnp.inf)
    alpha = jnp.clip(jnp.min(ratio), 0.0, 1.0)
    xs = jnp.where(passive, x + alpha * (z - x), 0.0)
    ps = passive & ~(negative & (xs <= tol * magnitude))
    xs = jnp.where(ps, jnp.maximum(xs, 0.0), 0.0)
    new_passive = jnp.where(accept, pa, jnp.where(refine, passive, ps))
    new_x = jnp.where(accept, xa, jnp.where(refine, jnp.maximum(z, 0.0), xs))
    new = run._replace(passive=jnp.where(failed, passive, new_passive),
                       x=jnp.where(failed, x, new_x),
                       steps=run.steps + 1, total=run.total + 1,
                       last_res=jnp.where(refine, res, jnp.inf),
                       ridge=jnp.where(failed, run.ridge * 100.0, run.ridge),
                       done=accept & ~jnp.any(entering))
    return jax.tree.map(lambda n, o: jnp.where(run.done, o, n), new, run)

  def active(run):
    if not with_margin:
      return ~run.done & (run.steps < max_iters)
    plain = ~run.tight
    return plain | (~run.done & (run.steps < margin_steps))

  def body(run, block):
    for _ in range(block):
      run = step(run)
    return run

  def loop(run, block):
    return lax.while_loop(active, lambda r: body(r, block), run)

  start = _Run(usable & (c > 0), jnp.zeros(num, dtype), jnp.zeros((), jnp.int32),
               jnp.zeros((), jnp.int32), jnp.asarray(jnp.inf, dtype),
               # Rounding makes a float32 Gramian indefinite by up to about
               # T eps; the ridge stays above that so the factor exists, and
               # refinement removes it.
               jnp.asarray(8.0 * num * eps, dtype), jnp.array(False),
               jnp.array(False), jnp.zeros((), dtype), jnp.zeros(num, dtype))
  return platform.dependent(start, cpu=lambda r: loop(r, 1),
                            default=lambda r: loop(r, _BLOCK))


@functools.partial(jax.jit, static_argnames=("max_iters",))
def nonnegative_qp(matrix: jax.Array, linear: jax.Array,
                   free: jax.Array | None = None,
                   margin_norm: jax.Array | None = None,
                   max_iters: int | None = None) -> Solution:
  """Solves ``min_{x >= 0} 1/2 x^T A x - c^T x`` with some ``x_t`` fixed at 0.

  Args:
    matrix: [T, T] symmetric positive semi-definite ``A`` (a Gramian, any
      global scale; it may be singular).
    linear: [T] ``c``, in the units of ``matrix``.
    free: optional [T] bool; ``x_t`` is fixed at 0 where False (and row t is
      then no constraint). Rows of ``A`` whose diagonal is zero or below
      float32's resolution of the largest one are fixed too: they are zero
      gradients, any multiplier serves.
    margin_norm: optional scalar ``l >= 0`` in the units of ``sqrt(matrix)``
      (``sum_t ||g_t|| |u_t|`` for the projection of ``sum_t u_t g_t``).
      The problem is then solved again from its solution with every
      constraint tightened to ``y_t >= 4 eps sqrt(A_tt) (l + sum_s
      sqrt(A_ss) x_s)``, a few ulps of the terms ``y_t`` sums, and that
      solution is kept when it conflicts less (it exists when the
      constraints' cone has an interior). None: no margin.
    max_iters: largest number of active-set steps (static); default 3 T + 8,
      and T + 4 more for the tightened problem.

  Returns:
    A :class:`Solution`; its residual is that of the problem whose solution
    is returned (tightened or not).
  """
  dtype = _dtype(matrix)
  eps = jnp.finfo(dtype).eps
  matrix = jnp.asarray(matrix, dtype)
  linear = jnp.asarray(linear, dtype)
  num = matrix.shape[0]
  if max_iters is None:
    max_iters = 3 * num + 8
  diag = jnp.diagonal(matrix)
  top = jnp.max(diag)
  top = jnp.where(top > 0, top, 1.0)
  # Diagonals this far below the largest belong to gradients whose Gramian
  # entries have lost their relative precision: they count as zero.
  usable = diag > 1e4 * jnp.finfo(dtype).tiny * top
  if free is not None:
    usable = usable & jnp.asarray(free, bool)
  # Jacobi scaling x = D x', D = diag(A)^(-1/2): unit diagonal, so tasks whose
  # gradients differ by orders of magnitude are resolved alike; the signs and
  # the complementarity are unchanged by a positive diagonal scaling.
  inv_sqrt = jnp.where(usable, lax.rsqrt(jnp.where(usable, diag, 1.0)), 0.0)
  a = matrix * inv_sqrt[:, None] * inv_sqrt[None, :]
  a = jnp.where(usable[:, None] & usable[None, :], a, 0.0)
  c = jnp.where(usable, linear * inv_sqrt, 0.0)
  margin = (None if margin_norm is None
            else _MARGIN * eps * jnp.asarray(margin_norm, dtype))
  run = _solve(a, c, usable, margin, max_iters, num + 4)
  x, shift = run.x, run.shift
  if margin is not None:
    # Kept when it conflicts less. Without an interior the tightened
    # constraints contradict each other; the multipliers then grow along the
    # contradiction (a null direction of A) and are discarded.
    def worst(x):
      return jnp.min(jnp.where(usable, a @ x - c, jnp.inf))
    plain = run.plain_x
    kept = (run.tight & run.done & (worst(x) >= jnp.minimum(worst(plain), 0.0))
            & (jnp.sum(x) <= 2.0 * jnp.sum(plain) + jnp.asarray(margin_norm, dtype)))
    x = jnp.where(kept, x, jnp.where(run.tight, plain, x))
    shift = jnp.where(kept, shift, 0.0)
  x = jnp.where(usable, jnp.maximum(x, 0.0), 0.0)
  target = jnp.where(usable, c + shift, 0.0)
  ax = a @ x
  natural = jnp.where(usable, jnp.abs(jnp.minimum(x, ax - target)), 0.0)
  rho = jnp.maximum(jnp.max(jnp.abs(target)), jnp.max(jnp.abs(ax)))
  residual = jnp.where(rho > 0, jnp.max(natural) / jnp.where(rho > 0, rho, 1.0), 0.0)
  return Solution(x * inv_sqrt, residual, run.total)


@functools.partial(jax.jit, static_argnames=("max_iters",))
def project(gram_matrix: jax.Array, combination: jax.Array,
            offsets: jax.Array | None = None, free: jax.Array | None = None,
            max_iters: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Projects ``sum_t u_t g_t`` onto ``{y : <g_j, y> >= b_j, j free}``.

  .. math::
     v^* = u + x^*, \\quad x^* = \\arg\\min_{x \\ge 0}
       \\tfrac12 (u + x)^\\top G (u + x) - b^\\top x ,

  so the projection is ``sum_t v*_t g_t``, with ``(G v*)_j >= b_j`` on the
  free rows. With ``b = 0`` the polyhedron is the dual cone of the
  gradients, ``{y : <g_j, y> >= 0}``. Active constraints are met a few ulps
  inside (see :func:`nonnegative_qp`).

  Args:
    gram_matrix: [T, T] Gramian ``G`` (any global scale).
    combination: [T] coefficients ``u`` of the point to project.
    offsets: optional [T] ``b`` in the units of ``gram_matrix`` (default 0).
    free: optional [T] bool: the rows that are constraints (whose
      multipliers may be positive); default all.
    max_iters: see :func:`nonnegative_qp`.

  Returns:
    ``(v, residual)``: [T] coefficients of the projection and the solver's
    relative KKT residual.
  """
  dtype = _dtype(gram_matrix)
  gram_matrix = jnp.asarray(gram_matrix, dtype)
  combination = jnp.asarray(combination, dtype)
  linear = -(gram_matrix @ combination)
  if offsets is not None:
    linear = linear + jnp.asarray(offsets, dtype)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram_matrix), 0.0))
  solution = nonnegative_qp(gram_matrix, linear, free,
                            jnp.sum(norms * jnp.abs(combination)), max_iters)
  return combination + solution.x, solution.residual
