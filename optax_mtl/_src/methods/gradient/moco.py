"""MoCo: MGDA on tracked gradients, with one projected step on the weights per update."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src.core import memory as memory_lib
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams
from optax_mtl._src.engine import masking
from optax_mtl._src.solvers import simplex

_METHOD = "mtl.moco"


class MoCoState(NamedTuple):
  """State of :func:`moco`.

  Attributes:
    task_weights: [T] float32 weights ``lambda`` on the simplex, applied to
      the tracked gradients at the last update (``update = sum_t lambda_t
      y_t``); they start uniform.
    memory: the tracked gradients ``y``: for every shared leaf a ``[T,
      *param.shape]`` buffer in the parameters' dtype (None for heads); they
      start at zero.
    count: int32 number of updates so far (the k of the step sizes).
  """
  task_weights: jax.Array
  memory: Any
  count: jax.Array


# Compiled once per shape, so eager updates do not rebuild the step op by op.
@jax.jit
def weight_step(normalized: jax.Array, weights: jax.Array, gamma, rho) -> jax.Array:
  """One projected gradient step of ``lambda -> ||Y^T lambda||^2 / 2 + rho ||lambda||^2 / 2``.

  .. math::
     \\lambda \\leftarrow \\Pi_\\Delta\\big(\\lambda - \\gamma\\,
       (\\bar G + \\rho I)\\,\\lambda\\big)

  Args:
    normalized: [T, T] Gramian of the tracked gradients divided by its
      largest diagonal entry (``Gramian.normalized``).
    weights: [T] current weights on the simplex.
    gamma: step size.
    rho: ridge on the weights.

  Returns:
    [T] float32 weights on the simplex.
  """
  matrix = jnp.asarray(normalized, jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  direction = matrix @ weights + jnp.asarray(rho, jnp.float32) * weights
  return simplex.project(weights - jnp.asarray(gamma, jnp.float32) * direction)


def _decayed(rate, count, decay):
  step = (count + 1).astype(jnp.float32)
  return jnp.asarray(rate, jnp.float32) / step ** jnp.asarray(decay, jnp.float32)


def moco(
    beta: float = 0.5,
    gamma: float = 0.1,
    rho: float = 0.0,
    beta_sigma: float = 0.5,
    gamma_sigma: float = 0.5,
    *,
    num_tasks: int,
    shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """MoCo: stochastic multi-objective gradient correction.

  MGDA's min-norm weights, computed on mini-batch gradients, give a biased
  direction. MoCo tracks each task's gradient ``y_t`` (an average over steps
  whose error vanishes) and moves the weights by one projected gradient step
  of the min-norm problem per update, on the tracked gradients:

  .. math::
     y_t &\\leftarrow y_t - \\beta_k\\,(y_t - g_t), \\\\
     \\lambda &\\leftarrow \\Pi_\\Delta\\big(\\lambda - \\gamma_k\\,
       (\\bar G + \\rho I)\\,\\lambda\\big), \\qquad
       \\bar G = \\frac{Y Y^\\top}{\\max_t \\|y_t\\|^2}, \\\\
     \\text{update} &= \\sum_t \\lambda_t\\, y_t ,

  with ``beta_k = beta / k^beta_sigma`` and ``gamma_k = gamma /
  k^gamma_sigma`` at the k-th update (k = 1, 2, ...), ``Pi`` the Euclidean
  projection onto the simplex, ``y`` starting at zero and ``lambda`` uniform.
  The paper's step uses ``Y Y^T`` itself, whose units are those of the
  squared gradients (its authors' code rescales each gradient to the size of
  its loss first); here it is divided by the largest squared tracked norm,
  so ``gamma`` is a step free of the gradients' units and the weights stay
  finite for gradients of size 1e-20 or 1e20; ``rho`` is in the same units.
  The weights then depend on the gradients' directions and relative sizes
  only, so the update is homogeneous in the gradients. ``beta_sigma =
  gamma_sigma = 0.5`` are the authors' code's decays; 0 gives constant steps.

  The update combines the tracked gradients ``y``, not the gradients
  received: the state's ``task_weights`` are the ``lambda`` applied to
  ``y``. Heads (``shared=``) keep no memory and receive their own task's
  gradient. Memory: T x (number of shared parameters) values in the
  parameters' dtype, updated in float32.

  Args:
    beta: tracking rate in (0, 1] (1 tracks the last gradient only).
    gamma: step size of the weights, >= 0 (0 keeps them uniform).
    rho: ridge of the weights' problem, >= 0.
    beta_sigma: decay exponent of ``beta_k``, >= 0.
    gamma_sigma: decay exponent of ``gamma_k``, >= 0.
    num_tasks: T (required: the memory holds one gradient per task).
    shared: optional mask of shared leaves (pytree of bools or callable on
      params); only they keep a memory; other leaves are task-specific
      heads, summed over tasks.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` aggregator whose state is a
    :class:`MoCoState`; ``init`` needs the parameters.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.moco(beta=1.0, gamma=0.5, num_tasks=2)
    >>> params = {"w": jnp.zeros(2)}
    >>> task_grads = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
    >>> update, state = tx.update(task_grads, tx.init(params), params)
    >>> state.task_weights, update["w"]
    (Array([0.59375, 0.40625], dtype=float32), Array([0.59375, 0.8125 ], dtype=float32))

  References:
    Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient
    Bias in Multi-objective Learning: A Provably Convergent Approach", ICLR
    2023 (Algorithm 1).
  """
  hyperparams.in_range(beta, _METHOD, "beta", 0.0, 1.0, low_open=True)
  hyperparams.nonnegative(gamma, _METHOD, "gamma")
  hyperparams.nonnegative(rho, _METHOD, "rho")
  hyperparams.nonnegative(beta_sigma, _METHOD, "beta_sigma")
  hyperparams.nonnegative(gamma_sigma, _METHOD, "gamma_sigma")
  size = hyperparams.num_tasks(num_tasks, _METHOD)

  def init(num, memory):
    return MoCoState(weighting.initial_weights(num, 1.0 / num), memory,
                     jnp.zeros((), jnp.int32))

  def update(state, inputs):
    del inputs
    rate = _decayed(beta, state.count, beta_sigma)

    def track(y, g):
      return y - rate.astype(y.dtype) * (y - g), None
    return track

  def rule(inputs, state):
    step = _decayed(gamma, state.count, gamma_sigma)
    weights = weight_step(inputs.gramian.normalized, state.task_weights, step, rho)
    return weights, state._replace(count=state.count + 1)

  return memory_lib.memory_aggregator(
      weighting.Weighting(
          name=_METHOD, rule=rule, reads={"gramian"}, num_tasks=size,
          claims={"permutation_equivariant", "homogeneous"}),
      init=init, update=update, combine=memory_lib.COMBINE_MEMORY,
      shared=shared)
