"""Dynamic task prioritisation (DTP): weights from key performance indicators."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_mtl._src.core import aliases
from optax_mtl._src.core import loss_inputs
from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams


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
  size = hyperparams.num_tasks(num_tasks, method)
  hyperparams.nonnegative(gamma, method, "gamma")
  symmetric = np.ndim(gamma) == 0
  gamma = jnp.maximum(hyperparams.vector_or_scalar(gamma, size, method, "gamma"), 0.0)
  hyperparams.in_range(smoothing, method, "smoothing", 0.0, 1.0, high_open=True)
  beta = jnp.clip(jnp.asarray(smoothing, jnp.float32), 0.0, 1.0)

  def init(size):
    return DTPState(jnp.ones(size, jnp.float32), jnp.ones(size, jnp.float32),
                    jnp.zeros((), jnp.int32))

  def rule(inputs, state):
    kpis = loss_inputs.kpis_in_unit_interval(inputs.kpis, method)
    smoothed = jnp.where(state.count == 0, kpis,
                         beta * state.kpis + (1.0 - beta) * kpis)
    smoothed = jnp.clip(smoothed, loss_inputs.KPI_FLOOR, 1.0)
    weights = -jnp.power(1.0 - smoothed, gamma) * jnp.log(smoothed)
    return weights, state._replace(kpis=smoothed,
                                   count=optax.safe_increment(state.count))

  return transform.task_scaling(weighting.Weighting(
      name=method, rule=rule, init=init, reads={"kpis"}, num_tasks=size,
      claims={"homogeneous"} | ({"permutation_equivariant"} if symmetric else set())))


dtp = aliases.alias(scale_by_dtp, "dtp", "2.0, num_tasks=2")
