"""SDMGrad: stochastic direction-oriented multi-objective gradient descent."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams
from optax_mtl._src.engine import masking
from optax_mtl._src.engine import platform
from optax_mtl._src.paths import two_batch
from optax_mtl._src.solvers import simplex

_METHOD = "mtl.sdmgrad"
# Projected steps per loop trip on accelerators, where a trip costs ~20 us
# whatever its T x T body; on a CPU a trip costs nearly nothing while
# unrolling multiplies the compile time, so there each trip runs one step.
_BLOCK = 10


class SDMGradState(NamedTuple):
  """State of :func:`sdmgrad`.

  Attributes:
    task_weights: [T] weights of the last update, ``(w + lam / T) / (1 +
      lam)``, applied to the raw gradients of the update's batch.
    simplex_weights: [T] float32 iterate ``w`` on the simplex, the warm start
      of the next update's projected steps. It starts uniform.
  """
  task_weights: jax.Array
  simplex_weights: jax.Array


# Compiled once per shape and step count, so eager updates do not retrace.
@functools.partial(jax.jit, static_argnames=("iters",))
def simplex_steps(cross_matrix: jax.Array, weights: jax.Array, lam, gamma,
                  iters: int) -> jax.Array:
  """SDMGrad's projected stochastic gradient steps on the simplex.

  ``iters`` times ``w <- Proj_simplex(w - gamma C (w + lam / T))``: steps on
  ``1/2 ||J^T (w + lam w0)||^2`` (``w0`` uniform) whose gradient ``J J^T (w
  + lam w0)`` is estimated by the cross matrix ``C`` of two batches.

  Args:
    cross_matrix: [T, T] ``C`` (any scale; ``gamma`` is in its units).
    weights: [T] starting point on the simplex.
    lam: the regularisation ``lam >= 0``.
    gamma: the step size ``>= 0``.
    iters: number of steps (static).

  Returns:
    [T] float32 weights on the simplex.
  """
  cross_matrix = jnp.asarray(cross_matrix, jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  lam = jnp.asarray(lam, jnp.float32)
  gamma = jnp.asarray(gamma, jnp.float32)
  target = lam / cross_matrix.shape[0]

  def step(w, _):
    # Elementwise, not a matmul: no reduced-precision (TF32) path on GPUs.
    grad = jnp.sum(cross_matrix * (w + target)[None, :], axis=1)
    return simplex.project(w - gamma * grad), None

  def run(w, unroll):
    return lax.scan(step, w, None, length=iters, unroll=unroll)[0]

  return platform.dependent(weights, cpu=lambda w: run(w, 1),
                            default=lambda w: run(w, min(iters, _BLOCK)))


def sdmgrad(
    lam: float = 0.3,
    gamma: float = 0.5,
    iters: int = 20,
    *,
    num_tasks: int,
    shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """SDMGrad: a direction near the mean gradient, from two mini-batches.

  The direction-oriented problem regularises the common descent direction
  toward the mean gradient ``g_0 = (1/T) sum_t g_t``:

  .. math::
     d^* = \\arg\\max_d \\min_{w \\in \\Delta^T} \\langle g_w, d\\rangle
       - \\tfrac12\\|d\\|^2 - \\tfrac{\\lambda}{2}\\|d - g_0\\|^2,
     \\qquad g_w = \\sum_t w_t g_t ,

  whose solution is ``d* = (g_w* + lam g_0) / (1 + lam)`` with ``w*``
  minimising ``1/2 ||g_w + lam g_0||^2`` on the simplex. ``lam = 0`` gives
  MGDA's min-norm direction, ``lam -> inf`` the mean gradient. The weights
  are found by projected stochastic gradient steps whose gradient ``J J^T (w
  + lam w_0)`` (``w_0`` uniform) is estimated without bias by the cross
  matrix of two independent mini-batches (Algorithm 1):

  .. math::
     w \\leftarrow \\Pi_{\\Delta}\\Big(w - \\gamma\\,
       \\frac{J_1 J_2^\\top}{s_1 s_2}\\,(w + \\lambda w_0)\\Big)
       \\ \\ (\\text{iters times}), \\qquad
     \\text{update} = J_3^\\top \\frac{w + \\lambda w_0}{1 + \\lambda} .

  ``J1`` are the per-task gradients passed as ``task_grads``, ``J2`` those
  passed as ``second_grads``, ``J3`` those passed as ``third_grads`` (an
  independent third batch, as in the paper's analysis) or else ``task_grads``.
  ``w`` is kept in the state and warm-starts the next update, as in the
  authors' code; the ``iters`` steps of one update reuse its pair of batches
  (the paper samples a new pair per step). ``s1``, ``s2`` are the largest
  task-gradient norms of the two batches, so ``gamma`` is a step in units of
  that product: the weights do not depend on the losses' scale (the paper's
  step ``beta`` is ``gamma / (s1 s2)``; the authors' code divides by the
  squared mean norm instead and adds momentum 0.5). With one batch the
  steps are projected gradient descent on a convex quadratic, stable for
  ``gamma < 2 / ||G / s^2||_2``; that norm is at most T and about 1 for tasks
  of similar norms that do not align, which the default suits.

  Give the second batch as ``update(task_grads, state, params,
  second_grads=g2, third_grads=g3)``, e.g. from
  :func:`optax_mtl.value_and_jacobians`; without ``second_grads`` the update
  raises a ``ValueError`` (:func:`optax_mtl.same_batch` reads one batch
  twice). ``mtl.chain`` cannot fuse it (a task scaling would rescale one
  batch only); chain optimizers after it with ``optax.chain``.

  Args:
    lam: the regularisation ``lambda >= 0`` toward the mean gradient. May be
      traced (``optax.inject_hyperparams``).
    gamma: step of the weights on the simplex (``>= 0``; 0 keeps them
      uniform: the mean gradient), relative to the batches' largest norms.
      May be traced.
    iters: projected steps per update (a Python int >= 1).
    num_tasks: T (the state holds the simplex iterate).
    shared: optional mask of shared leaves (pytree of bools or callable on
      params); the cross matrix is read over them, other leaves are
      task-specific heads, summed over tasks.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` aggregator whose state is an
    :class:`SDMGradState`.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.sdmgrad(lam=1.0, gamma=0.5, iters=1, num_tasks=2)
    >>> g1 = {"w": jnp.array([[2.0, 0.0], [0.0, 1.0]])}
    >>> g2 = {"w": jnp.array([[2.0, 0.0], [0.0, 1.0]])}
    >>> update, state = tx.update(g1, tx.init(None), second_grads=g2)
    >>> state.simplex_weights, state.task_weights
    (Array([0.3125, 0.6875], dtype=float32), Array([0.40625, 0.59375], dtype=float32))
    >>> update["w"]
    Array([0.8125 , 0.59375], dtype=float32)

  References:
    Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning: Simple and
    Provable Stochastic Algorithms", NeurIPS 2023 (Algorithm 1).
  """
  hyperparams.nonnegative(lam, _METHOD, "lam")
  hyperparams.nonnegative(gamma, _METHOD, "gamma")
  steps = hyperparams.static_integer(iters, _METHOD, "iters")
  size = hyperparams.num_tasks(num_tasks, _METHOD)

  def init(size):
    return SDMGradState(weighting.initial_weights(size),
                        # float32 also under x64: the solver's output, so the
                        # state keeps its types across updates.
                        jnp.full((size,), 1.0 / size, jnp.float32))

  def rule(inputs, state):
    cross = two_batch.cross_matrix(inputs, _METHOD)
    w = simplex_steps(cross.normalized, state.simplex_weights, lam, gamma, steps)
    lam32 = jnp.asarray(lam, jnp.float32)
    applied = (w + lam32 / inputs.num_tasks) / (1.0 + lam32)
    return applied, state._replace(simplex_weights=w)

  return two_batch.aggregator(weighting.Weighting(
      name=_METHOD, rule=rule, init=init, num_tasks=size,
      claims={"permutation_equivariant", "homogeneous"}), shared=shared)
