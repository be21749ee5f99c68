"""DB-MTL: log-loss gradients, averaged, rescaled to the largest task's norm."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src.core import loss_inputs
from optax_mtl._src.core import memory as memory_lib
from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams
from optax_mtl._src.engine import masking

_METHOD = "mtl.db_mtl"
# Gradient norms more than 30 orders of magnitude apart would need weights
# beyond float32's range; they are capped here (the task is then rescaled
# to less than the largest norm, but the update stays finite).
_MAX_WEIGHT = 1e30


class DBMTLState(NamedTuple):
  """State of :func:`db_mtl` with ``beta > 0``.

  Attributes:
    task_weights: [T] float32 weights ``alpha`` applied to the averaged
      gradients at the last update (``update = sum_t alpha_t ghat_t``).
    memory: the averaged log-loss gradients ``ghat``: for every shared leaf a
      ``[T, *param.shape]`` buffer in the parameters' dtype (None for heads);
      they start at zero.
    count: int32 number of updates so far (the k of ``beta_k``).
  """
  task_weights: jax.Array
  memory: Any
  count: jax.Array


def balance(norms: jax.Array, numerators: jax.Array | None = None) -> jax.Array:
  """``max_s numerators_s / norms_t`` per task, 0 for a zero norm, capped.

  With ``numerators = norms`` (the default) these are DB-MTL's factors
  ``alpha_t = max_s ||ghat_s|| / ||ghat_t||``, which rescale every task's
  averaged gradient to the largest norm. A task with a zero gradient gets 0
  (it has no direction to rescale).
  """
  norms = jnp.asarray(norms)
  numerators = norms if numerators is None else numerators
  top = jnp.max(numerators)
  alive = norms > 0
  ratio = top / jnp.where(alive, norms, 1.0)
  return jnp.where(alive, jnp.minimum(ratio, _MAX_WEIGHT), 0.0).astype(jnp.float32)


def _without_memory(num_tasks, shared):
  def rule(inputs, state):
    losses = loss_inputs.positive_losses(inputs.losses, _METHOD)
    norms = inputs.norms
    # ||g_t / L_t|| = ||g_t|| / L_t; the weight of the raw gradient g_t is
    # alpha_t / L_t = max_s (||g_s|| / L_s) / ||g_t||.
    return balance(norms, norms / losses.astype(norms.dtype)), state

  return transform.aggregator(weighting.Weighting(
      name=_METHOD, rule=rule, reads={"norms", "losses"}, num_tasks=num_tasks,
      claims={"permutation_equivariant", "homogeneous"}), shared=shared)


def db_mtl(
    beta: float = 0.9,
    beta_sigma: float = 0.5,
    *,
    num_tasks: int,
    shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """DB-MTL: dual balancing of the loss scales and the gradient magnitudes.

  Loss-scale balancing takes the gradient of ``log L_t`` instead of ``L_t``
  (``g_t / L_t``, so a task's units do not matter); gradient-magnitude
  balancing rescales every task's (averaged) gradient to the largest norm:

  .. math::
     \\hat g_t &\\leftarrow \\beta_k\\, \\hat g_t + (1 - \\beta_k)\\,
       \\frac{g_t}{L_t}, \\qquad \\beta_k = \\frac{\\beta}{k^{\\sigma}}, \\\\
     \\alpha_t &= \\frac{\\max_s \\|\\hat g_s\\|}{\\|\\hat g_t\\|}, \\qquad
     \\text{update} = \\sum_t \\alpha_t\\, \\hat g_t ,

  at the k-th update (k = 1, 2, ...), with ``ghat`` starting at zero (no bias
  correction: every task's average carries the same factor, which the
  largest norm absorbs) and ``sigma = beta_sigma``. Every term of the update
  has the norm of the largest averaged gradient. A task whose averaged
  gradient is zero gets ``alpha_t = 0``; weights are capped at 1e30 (norms
  more than 30 orders of magnitude apart).

  With ``beta = 0`` (a Python number) the average is the current gradient,
  no memory is kept, and the method is an ordinary aggregator on the norms
  and losses (:func:`optax_mtl.chain` can fuse it), with weights on the
  gradients received ``w_t = max_s (||g_s|| / L_s) / ||g_t||``. Otherwise
  the update combines the averaged gradients, the state's ``task_weights``
  are the ``alpha`` applied to them, and the memory costs T x (number of
  shared parameters) values in the parameters' dtype (updated in float32).
  Heads (``shared=``) keep no memory and receive their own task's gradient.

  Args:
    beta: averaging rate in [0, 1). May be traced (``optax.inject_hyperparams``),
      which always keeps the memory.
    beta_sigma: decay exponent ``sigma`` of ``beta_k``, >= 0 (0 gives a
      constant rate, as in the paper's equation; the authors' code decays it).
    num_tasks: T (required: the memory holds one gradient per task).
    shared: optional mask of shared leaves (pytree of bools or callable on
      params); only they keep a memory; other leaves are task-specific
      heads, summed over tasks.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` aggregator whose state is a
    :class:`DBMTLState` (``beta > 0``; ``init`` needs the parameters) or
    holds the weights only (``beta = 0``); ``update`` requires ``losses=``
    (positive).

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> task_grads = {"w": jnp.array([[3.0, 4.0], [0.0, 1.0]])}
    >>> losses = jnp.array([5.0, 0.5])
    >>> tx = mtl.db_mtl(beta=0.0, num_tasks=2)
    >>> tx.update(task_grads, tx.init(None), losses=losses)[0]["w"]
    Array([1.2, 3.6], dtype=float32)
    >>> tx = mtl.db_mtl(beta=0.5, beta_sigma=0.0, num_tasks=2)
    >>> params = {"w": jnp.zeros(2)}
    >>> update, state = tx.update(task_grads, tx.init(params), params, losses=losses)
    >>> state.task_weights, update["w"]
    (Array([2., 1.], dtype=float32), Array([0.6, 1.8], dtype=float32))

  References:
    Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Tsang & Kwok, "Dual-Balancing
    for Multi-Task Learning", arXiv:2308.12029, 2023.
  """
  hyperparams.in_range(beta, _METHOD, "beta", 0.0, 1.0, high_open=True)
  hyperparams.nonnegative(beta_sigma, _METHOD, "beta_sigma")
  size = hyperparams.num_tasks(num_tasks, _METHOD)
  if isinstance(beta, (int, float)) and not isinstance(beta, bool) and beta == 0:
    return _without_memory(size, shared)

  def init(num, memory):
    return DBMTLState(weighting.initial_weights(num), memory,
                      jnp.zeros((), jnp.int32))

  def update(state, inputs):
    step = (state.count + 1).astype(jnp.float32)
    rate = jnp.asarray(beta, jnp.float32) / step ** jnp.asarray(beta_sigma,
                                                                jnp.float32)
    inverse = 1.0 / loss_inputs.positive_losses(inputs.losses, _METHOD)

    def average(ghat, g):
      log_grad = g * memory_lib.per_task(inverse, g)
      return rate.astype(g.dtype) * ghat + (1 - rate.astype(g.dtype)) * log_grad, None
    return average

  def rule(inputs, state):
    return balance(inputs.norms), state._replace(count=state.count + 1)

  return memory_lib.memory_aggregator(
      weighting.Weighting(
          name=_METHOD, rule=rule, reads={"norms", "losses"}, num_tasks=size,
          claims={"permutation_equivariant", "homogeneous"}),
      init=init, update=update, combine=memory_lib.COMBINE_MEMORY,
      shared=shared)
