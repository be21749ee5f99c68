"""IMTL-L: learned loss scales that make every scaled loss constant."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src.core import aliases
from optax_mtl._src.core import learned
from optax_mtl._src.core import loss_inputs
from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams

_LOG_BOUND = 40.0


class IMTLLState(NamedTuple):
  """State of :func:`scale_by_imtl_l`.

  Attributes:
    task_weights: [T] weights of the last update.
    log_scale: [T] learnable ``s_t``; task t's weight is ``e^{s_t}``.
    optimizer_state: state of the optimizer of ``log_scale``.
    count: int32, number of updates so far.
  """
  task_weights: jax.Array
  log_scale: jax.Array
  optimizer_state: Any
  count: jax.Array


def scale_by_imtl_l(
    *, num_tasks: int, learning_rate: Any = 1e-2, warm_start: bool = False,
    optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Scales the tasks by learned scales ``e^{s_t}`` (impartial loss scaling).

  The joint objective over the network and ``s`` is

  .. math::
     \\mathcal{L} = \\sum_t e^{s_t} L_t - s_t, \\qquad
     w_t = e^{s_t}, \\qquad \\partial_{s_t}\\mathcal{L} = e^{s_t} L_t - 1

  so the scales move toward ``e^{s_t} = 1 / L_t``, where every scaled loss
  equals 1. The gradient of ``s`` is computed in closed form from the losses
  (no second backward pass); the weights of an update use ``s`` before its
  step. ``s`` stays in ``[-40, 40]``. ``warm_start=True`` sets ``s`` to that
  fixed point, ``-log L_t``, at the first update, so losses on very
  different scales are balanced from the first step instead of after about
  ``log(L_big / L_small) / learning_rate`` steps.

  Args:
    num_tasks: T (the state holds one scale per task).
    learning_rate: step size of the default optimizer (Adam) of ``s``.
    warm_start: if True, the first update starts ``s`` at ``-log L_t``.
    optimizer: optional optax optimizer for ``s``.

  Returns:
    A task scaling whose state is an :class:`IMTLLState`; ``update`` requires
    ``losses=``.

  Raises:
    ValueError: bad losses (outside ``jit``; under ``jit`` they are clamped
      to ``[1e-12, 1e30]``).

  Example:
    >>> import jax.numpy as jnp, optax, optax_mtl as mtl
    >>> tx = optax.chain(mtl.imtl_l(num_tasks=3), optax.adam(1e-3))

  References:
    Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial
    Multi-task Learning", ICLR 2021.
  """
  method = "mtl.scale_by_imtl_l"
  size = hyperparams.num_tasks(num_tasks, method)
  warm = hyperparams.flag(warm_start, method, "warm_start")
  opt = hyperparams.optimizer(optimizer, learning_rate, optax.adam, method)

  def init(size):
    s = jnp.zeros(size, jnp.float32)
    return IMTLLState(jnp.ones(size, jnp.float32), s, opt.init(s),
                      jnp.zeros((), jnp.int32))

  def rule(inputs, state):
    losses = loss_inputs.positive_losses(inputs.losses, method)
    s = state.log_scale
    if warm:
      start = jnp.clip(-jnp.log(losses), -_LOG_BOUND, _LOG_BOUND)
      s = jnp.where(state.count == 0, start, s)
    weights = jnp.exp(s)
    scaled = weights * losses
    grads = learned.without_rounding_noise(scaled - 1.0, scaled + 1.0)
    new_s, opt_state = learned.step(opt, s, grads, state.optimizer_state,
                                    _LOG_BOUND)
    return weights, state._replace(log_scale=new_s, optimizer_state=opt_state,
                                   count=optax.safe_increment(state.count))

  return transform.task_scaling(weighting.Weighting(
      name=method, rule=rule, init=init, reads={"losses"}, num_tasks=size,
      claims={"permutation_equivariant", "homogeneous"}))


imtl_l = aliases.alias(scale_by_imtl_l, "imtl_l", "num_tasks=3")
