"""Dynamic task prioritisation (DTP): weights from key performance indicators."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_mtl._src import masking
from optax_mtl._src import transform
from optax_mtl._src import validation
from optax_mtl._src.loss_weighting import _common


class DTPState(NamedTuple):
  """State of :func:`scale_by_dtp`.

  Attributes:
    task_weights: [T] weights of the last update.
    kpis: [T] smoothed KPIs (the raw KPIs when ``smoothing=0``).
    count: int32 number of updates so far.
  """
  task_weights: jax.Array
  kpis: jax.Array
  count: jax.Array


def scale_by_dtp(
    gamma: Any = 1.0, *, num_tasks: int, smoothing: Any = 0.0,
) -> optax.GradientTransformationExtraArgs:
  """Scales the tasks by a focal-loss-like function of their KPIs.

  .. math::
     \\bar\\kappa_t \\leftarrow \\beta\\, \\bar\\kappa_t + (1 - \\beta)\\, \\kappa_t,
     \\qquad w_t = -(1 - \\bar\\kappa_t)^{\\gamma_t} \\log \\bar\\kappa_t

  ``kappa_t`` in (0, 1] is a key performance indicator of task t (accuracy,
  IoU..., higher is better) passed as ``update(..., kpis=...)``. Hard tasks
  (small KPI) get large weights; a task with KPI 1 gets weight 0. The first
  update takes the KPIs as they are; ``smoothing`` (beta in [0, 1)) then keeps
  an exponential moving average in the state.

  Args:
    gamma: focusing parameter(s) >= 0, a scalar or a [T] vector (gamma_t);
      larger values down-weight easy tasks more.
    num_tasks: T (the state holds the smoothed KPIs).
    smoothing: beta in [0, 1), the weight of the past in the moving average
      of the KPIs; 0 uses the current KPIs only.

  Returns:
    A task scaling whose state is a :class:`DTPState`; ``update`` requires
    ``kpis=`` (``losses`` are not read).

  Raises:
    TypeError: ``kpis`` missing at update.
    ValueError: ``kpis`` of the wrong shape; a concrete KPI outside (0, 1]
      (under ``jit`` KPIs are clamped to ``[1e-6, 1]`` and NaN counts as
      ``1e-6``); negative ``gamma`` or ``smoothing`` outside [0, 1).

  Example:
    >>> import jax.numpy as jnp, optax, optax_mtl as mtl
    >>> tx = mtl.dtp(2.0, num_tasks=2)
    >>> g = {"w": jnp.ones((2, 1))}
    >>> u, _ = tx.update(g, tx.init(None), kpis=jnp.array([1.0, 0.5]))

  References:
    Guo, Haque, Huang, Yeung, Fei-Fei, "Dynamic Task Prioritization for
    Multitask Learning", ECCV 2018.
  """
  method = "mtl.scale_by_dtp"
  size = _common.check_num_tasks(num_tasks, method)
  gamma = _common.check_nonnegative(gamma, method, "gamma")
  if gamma.ndim > 1 or (gamma.ndim == 1 and gamma.shape[0] != size):
    raise ValueError(f"{method}: gamma must be a scalar or a vector of length "
                     f"num_tasks={size}, got shape {gamma.shape}.")
  smoothing = _common.check_nonnegative(smoothing, method, "smoothing")
  if _common.is_concrete(smoothing) and not float(np.asarray(smoothing)) < 1:
    raise ValueError(f"{method}: smoothing must lie in [0, 1), got "
                     f"{float(np.asarray(smoothing))}.")
  gamma = jnp.broadcast_to(jnp.maximum(gamma, 0.0), (size,))
  beta = jnp.clip(smoothing, 0.0, 1.0)

  def init_fn(params):
    del params
    return DTPState(jnp.ones(size, jnp.float32), jnp.ones(size, jnp.float32),
                    jnp.zeros((), jnp.int32))

  def weights_fn(inputs, state):
    validation.check_configured_tasks(inputs.num_tasks, size, method)
    kpis = validation.check_losses(inputs.extra.get("kpis"), inputs.num_tasks,
                                   method, required=True, name="kpis")
    kpis = _common.kpis_in_unit_interval(kpis, method)
    smoothed = jnp.where(state.count == 0, kpis,
                         beta * state.kpis + (1.0 - beta) * kpis)
    smoothed = jnp.clip(smoothed, _common.KPI_FLOOR, 1.0)
    weights = -jnp.power(1.0 - smoothed, gamma) * jnp.log(smoothed)
    return weights, DTPState(weights, smoothed, optax.safe_increment(state.count))

  return transform.task_scaling(method, weights_fn, init_fn, needs_losses=False)


def dtp(
    gamma: Any = 1.0, *, num_tasks: int, smoothing: Any = 0.0,
    priorities: Any = None, shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """``scale_by_dtp`` chained with ``sum()`` (or ``weighted``).

  Args:
    gamma: see :func:`scale_by_dtp`.
    num_tasks: see :func:`scale_by_dtp`.
    smoothing: see :func:`scale_by_dtp`.
    priorities: optional [T] task priorities multiplied on top.
    shared: ``shared=`` mask passed to the aggregator.

  Returns:
    An aggregator: ``sum_t p_t w_t g_t`` with the DTP weights.
  """
  return _common.alias(scale_by_dtp(gamma, num_tasks=num_tasks, smoothing=smoothing),
                       priorities, shared)
