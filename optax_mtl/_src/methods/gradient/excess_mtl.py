"""Excess-MTL: exponentiated-gradient task weights driven by estimated excess risks."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src.core import memory as memory_lib
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams
from optax_mtl._src.engine import masking
from optax_mtl._src.engine import statistics

_METHOD = "mtl.excess_mtl"
_MAX_INCREMENT = 1e30


class ExcessMTLState(NamedTuple):
  """State of :func:`excess_mtl`.

  Attributes:
    task_weights: [T] float32 weights on the simplex applied at the last
      update (``update = sum_t w_t g_t``); they start uniform.
    memory: the root accumulator ``S = sqrt(H)`` of every task's squared
      gradients, ``H_t = sum_k g_{t,k}^2`` per coordinate: for every shared
      leaf a ``[T, *param.shape]`` buffer in the parameters' dtype (None for
      heads); it starts at zero.
    baseline: [T] mean excess-risk estimate of the warm-up steps (float32,
      float64 for float64 parameters), the scale each task's estimate is
      divided by.
    count: int32 number of updates so far.
  """
  task_weights: jax.Array
  memory: Any
  baseline: jax.Array
  count: jax.Array


def _accumulate(root, grad):
  """Updates the root accumulator and returns the excess-risk terms' sums.

  ``sqrt(S^2 + g^2)`` is computed as a hypotenuse, so neither square leaves
  the float range (gradients of 1e20 or 1e-20 in float32); with ``S' >=
  |g|``, each term ``g^2 / S' = g (g / S')`` is at most ``|g|``.
  """
  new_root = jnp.hypot(root, grad)
  safe = jnp.where(new_root > 0, new_root, 1.0)
  terms = jnp.where(new_root > 0, grad * (grad / safe), 0.0)
  return new_root, memory_lib.task_sums(terms)


def excess_mtl(
    robust_step_size: float = 1e-2,
    warmup_steps: int = 1,
    *,
    num_tasks: int,
    shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """Excess-MTL: weighs the tasks by how far each is from its optimum.

  A task's excess risk ``L_t(theta) - L_t(theta_t^*)`` is estimated by a
  second-order Taylor expansion around the optimum with a diagonal,
  AdaGrad-style curvature built from the task's own squared gradients:

  .. math::
     H_t &\\leftarrow H_t + g_t \\odot g_t, \\qquad
     r_t = \\sum_i \\frac{g_{t,i}^2}{\\sqrt{H_{t,i}}}, \\\\
     w &\\leftarrow \\frac{w \\odot \\exp(\\eta\\, r / r^0)}
                        {\\sum_t w_t \\exp(\\eta\\, r_t / r^0_t)}, \\qquad
     \\text{update} = \\sum_t w_t\\, g_t ,

  an exponentiated-gradient (multiplicative weights) step of the min-max
  problem ``min_theta max_{w in simplex} sum_t w_t r_t``, with ``eta =
  robust_step_size``. ``r^0_t``, the mean estimate of the first
  ``warmup_steps`` updates (during which the weights stay uniform), puts the
  tasks' estimates on one scale (the paper's scale normalisation). A task
  whose baseline is zero (a zero gradient throughout the warm-up) gets ratio
  0. The weights start uniform and stay on the simplex (the authors' code
  normalises them to sum T instead: multiply the learning rate by T to
  compare). The step is taken in log space, so large ratios give a weight
  of 0 rather than an overflow.

  The accumulator is kept as its square root ``S = sqrt(H)``, updated as a
  hypotenuse in the pass that also sums each task's ``r_t``, so nothing
  overflows for gradients of 1e20 and nothing underflows for 1e-20; the
  official code's ``+1e-7`` under the square root (which only guards a
  division by zero, here taken as a zero term) is left out, so the weights
  do not depend on the gradients' global scale. Heads (``shared=``) keep no
  accumulator, do not enter ``r`` and receive their own task's gradient.
  Memory: T x (number of shared parameters) values in the parameters' dtype.

  Args:
    robust_step_size: step ``eta`` of the weights, > 0 (the official code's
      default is 1e-2).
    warmup_steps: number of first updates (>= 1) whose estimates are
      averaged into the baseline ``r^0``; 1 (the official code) uses the
      first update's; the paper's appendix averages over 3 epochs.
    num_tasks: T (required: the accumulator holds one entry per task).
    shared: optional mask of shared leaves (pytree of bools or callable on
      params); only they keep an accumulator; other leaves are
      task-specific heads, summed over tasks.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` aggregator whose state is an
    :class:`ExcessMTLState`; ``init`` needs the parameters.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.excess_mtl(robust_step_size=1.0, num_tasks=2)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> g1 = {"w": jnp.array([[3.0, 0.0], [0.0, 1.0]])}
    >>> g2 = {"w": jnp.array([[4.0, 0.0], [0.0, 0.0]])}
    >>> _, state = tx.update(g1, state, params)   # warm-up: baseline r = [3, 1]
    >>> update, state = tx.update(g2, state, params)   # r = [16 / 5, 0]
    >>> state.task_weights, update["w"]
    (Array([0.7439625, 0.2560375], dtype=float32), Array([2.97585, 0.     ], dtype=float32))

  References:
    He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, "Robust Multi-Task
    Learning with Excess Risks", ICML 2024 (Equations 6, 7 and 9; scale
    normalisation in Appendix C.1).
  """
  hyperparams.positive(robust_step_size, _METHOD, "robust_step_size")
  hyperparams.integer(warmup_steps, _METHOD, "warmup_steps")
  size = hyperparams.num_tasks(num_tasks, _METHOD)

  def init(num, memory):
    dtype = statistics.accumulation_dtype(
        [m for m in jax.tree.leaves(memory)] or [jnp.zeros((), jnp.float32)])
    return ExcessMTLState(weighting.initial_weights(num, 1.0 / num), memory,
                          jnp.zeros((num,), dtype), jnp.zeros((), jnp.int32))

  def update(state, inputs):
    del state, inputs
    return _accumulate

  def rule(inputs, state):
    num = inputs.num_tasks
    step = state.count + 1
    estimates = (inputs.sums if inputs.sums is not None
                 else jnp.zeros((num,), state.baseline.dtype))
    estimates = estimates.astype(state.baseline.dtype)
    warming = step <= warmup_steps
    running = state.baseline + (estimates - state.baseline) / step.astype(
        state.baseline.dtype)
    baseline = jnp.where(warming, running, state.baseline)
    known = baseline > 0
    ratio = jnp.where(known, estimates / jnp.where(known, baseline, 1.0), 0.0)
    # A ratio beyond float32's range (baselines 1e40 times smaller than the
    # estimate) would make the logit inf; the cap changes no weight (any
    # difference above ~100 already gives a weight of 0).
    increment = jnp.minimum(
        jnp.asarray(robust_step_size, jnp.float32) * ratio.astype(jnp.float32),
        _MAX_INCREMENT)
    logits = jnp.log(state.task_weights) + increment
    weights = jnp.where(warming, state.task_weights, jax.nn.softmax(logits))
    return weights, state._replace(baseline=baseline, count=step)

  return memory_lib.memory_aggregator(
      weighting.Weighting(
          name=_METHOD, rule=rule, num_tasks=size,
          claims={"permutation_equivariant", "homogeneous"}),
      init=init, update=update, combine=memory_lib.COMBINE_GRADIENTS,
      shared=shared)
