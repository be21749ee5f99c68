"""Dynamic weight average (DWA): weights from the pace of each loss."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src.core import aliases
from optax_mtl._src.core import loss_inputs
from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams

# Bound on |log r|: keeps r = exp(log r) and r / temperature finite in float32.
_MAX_LOG_RATIO = 30.0
_MAX_LOGIT = 1e30


class DWAState(NamedTuple):
  """State of :func:`scale_by_dwa`.

  Attributes:
    task_weights: [T] weights of the current period.
    running_sum: [T] sum of the losses seen in the current period.
    step_in_period: int32 number of updates in the current period.
    last_mean: [T] mean loss of the last complete period, Lbar(k-1).
    previous_mean: [T] mean loss of the period before, Lbar(k-2).
    periods: int32 number of complete periods.
  """
  task_weights: jax.Array
  running_sum: jax.Array
  step_in_period: jax.Array
  last_mean: jax.Array
  previous_mean: jax.Array
  periods: jax.Array


def scale_by_dwa(
    temperature: Any = 2.0, *, num_tasks: int, period: Any = 1,
) -> optax.GradientTransformationExtraArgs:
  """Scales the tasks by a softmax of the rates at which their losses fall.

  .. math::
     r_t = \\frac{\\bar L_t(k-1)}{\\bar L_t(k-2)}, \\qquad
     w_t = T\\, \\frac{\\exp(r_t / \\tau)}{\\sum_s \\exp(r_s / \\tau)}

  where ``Lbar_t(k)`` is the mean of task t's losses over period k (a period
  is ``period`` consecutive updates: 1 for per-step DWA, the number of steps
  of an epoch for the original per-epoch rule). A task whose loss falls slowly
  (r close to 1 or above) gets more weight. The weights sum to T and stay
  fixed within a period; they are all 1 until two periods are complete.

  Args:
    temperature: tau > 0; large values make the weights uniform.
    num_tasks: T (the state holds per-task averages).
    period: number of updates per period (an int >= 1, e.g. steps per
      epoch). May be traced.

  Returns:
    A task scaling whose state is a :class:`DWAState`; ``update`` requires
    ``losses=``.

  Raises:
    ValueError: non-positive ``temperature`` or ``period`` < 1 (when
      concrete); bad losses (outside ``jit``; under ``jit`` they are clamped
      to ``[1e-12, 1e30]``).

  Example:
    >>> import jax.numpy as jnp, optax, optax_mtl as mtl
    >>> tx = optax.chain(mtl.dwa(num_tasks=2, period=100), optax.adam(1e-3))

  References:
    Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention",
    CVPR 2019.
  """
  method = "mtl.scale_by_dwa"
  size = hyperparams.num_tasks(num_tasks, method)
  temperature = jnp.asarray(hyperparams.positive(temperature, method, "temperature"),
                            jnp.float32)
  hyperparams.integer(period, method, "period")
  period_steps = jnp.maximum(jnp.asarray(period, jnp.int32), 1)

  def init(size):
    zeros = jnp.zeros(size, jnp.float32)
    zero = jnp.zeros((), jnp.int32)
    return DWAState(jnp.ones(size, jnp.float32), zeros, zero, zeros, zeros, zero)

  def rule(inputs, state):
    losses = loss_inputs.positive_losses(inputs.losses, method)
    log_ratio = (jnp.log(jnp.maximum(state.last_mean, loss_inputs.LOSS_FLOOR))
                 - jnp.log(jnp.maximum(state.previous_mean, loss_inputs.LOSS_FLOOR)))
    ratio = jnp.exp(jnp.clip(log_ratio, -_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    logits = jnp.clip(ratio / jnp.maximum(temperature, 1e-30), -_MAX_LOGIT, _MAX_LOGIT)
    dynamic = size * jax.nn.softmax(logits)
    weights = jnp.where(state.periods >= 2, dynamic, jnp.ones_like(dynamic))

    running_sum = state.running_sum + losses
    step = state.step_in_period + 1
    closes = step >= period_steps
    mean = running_sum / step.astype(jnp.float32)
    return weights, state._replace(
        running_sum=jnp.where(closes, jnp.zeros_like(running_sum), running_sum),
        step_in_period=jnp.where(closes, jnp.zeros_like(step), step),
        last_mean=jnp.where(closes, mean, state.last_mean),
        previous_mean=jnp.where(closes, state.last_mean, state.previous_mean),
        periods=state.periods + closes.astype(jnp.int32))

  return transform.task_scaling(weighting.Weighting(
      name=method, rule=rule, init=init, reads={"losses"}, num_tasks=size,
      claims={"permutation_equivariant", "homogeneous"}))


dwa = aliases.alias(scale_by_dwa, "dwa", "num_tasks=2, period=100")
