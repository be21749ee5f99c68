"""Homoscedastic uncertainty weighting, with learnable log-variances."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_mtl._src.core import aliases
from optax_mtl._src.core import learned
from optax_mtl._src.core import loss_inputs
from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams

# |log sigma^2| bound: e^{40} ~ 2e17 keeps weights and their products finite.
_LOG_BOUND = 40.0
_REGULARIZERS = ("log", "log1p")


class UncertaintyState(NamedTuple):
  """State of :func:`scale_by_uncertainty`.

  Attributes:
    task_weights: [T] weights of the last update, ``1 / (2 sigma_t^2)``.
    log_variance: [T] learnable ``s_t = log sigma_t^2``.
    optimizer_state: state of the optimizer of ``log_variance``.
    count: int32, number of updates so far.
  """
  task_weights: jax.Array
  log_variance: jax.Array
  optimizer_state: Any
  count: jax.Array


def fixed_point(losses: jax.Array, regularizer: str) -> jax.Array:
  """The log-variances at which the joint objective is stationary in ``s``.

  ``s = log L`` for "log"; for "log1p", ``sigma^2 = (L + sqrt(L^2 + 8 L)) / 4``
  written as ``L (1 + sqrt(1 + 8 / L)) / 4`` so that ``L^2`` never overflows.
  """
  log_losses = jnp.log(losses)
  if regularizer == "log":
    return log_losses
  return log_losses + jnp.log((1.0 + jnp.sqrt(1.0 + 8.0 / losses)) / 4.0)


def scale_by_uncertainty(
    *, num_tasks: int, learning_rate: Any = 1e-2,
    regularizer: str = "log", init_log_variance: Any = 0.0,
    warm_start: bool = False,
    optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Scales the tasks by learned homoscedastic uncertainties.

  The joint objective over the network and ``s_t = log sigma_t^2`` is

  .. math::
     \\mathcal{L} = \\sum_t \\frac{1}{2\\sigma_t^2} L_t + R(\\sigma_t), \\quad
     R = \\log \\sigma_t \\ (\\text{"log"}) \\ \\text{or} \\
     \\log(1 + \\sigma_t^2) \\ (\\text{"log1p"})

  so task t's gradient is scaled by ``w_t = 1 / (2 sigma_t^2) = e^{-s_t} / 2``
  and the log-variances follow their exact gradient, computed in closed form
  from the losses (no second backward pass):

  .. math::
     \\partial_{s_t} \\mathcal{L} = \\tfrac12 (1 - L_t e^{-s_t}) \\ (\\text{log}),
     \\qquad -\\tfrac12 L_t e^{-s_t} + \\operatorname{sigmoid}(s_t) \\
     (\\text{log1p})

  At the fixed point ``sigma_t^2 = L_t`` ("log"), or
  ``sigma_t^2 = (L_t + sqrt(L_t^2 + 8 L_t)) / 4`` ("log1p", whose penalty is
  never negative). The weights of an update use the log-variances before
  their step, as simultaneous gradient descent on the joint objective does.
  Log-variances stay in ``[-40, 40]``.

  From equal starting weights the log-variances need many steps to reach
  losses on very different scales (about ``log(L_big / L_small) /
  learning_rate`` with Adam), and meanwhile the largest loss trains the
  shared layers alone. ``warm_start=True`` sets ``s_t`` to its fixed point
  for the first update's losses, so the weights balance the tasks from the
  first step (``1 / (2 L_t(0))`` for "log").

  Args:
    num_tasks: T (the state holds one log-variance per task).
    learning_rate: step size of the default optimizer (Adam) of the
      log-variances; may be traced / injected.
    regularizer: ``"log"`` (Kendall et al.) or ``"log1p"`` (positive penalty).
    init_log_variance: initial ``s_t`` (scalar or [T]); 0 means sigma = 1.
    warm_start: if True, the first update replaces ``s_t`` by its fixed
      point for that update's losses (``init_log_variance`` is then unused).
    optimizer: optional optax optimizer for the log-variances, replacing
      ``optax.adam(learning_rate)``; its state lives in this state.

  Returns:
    A task scaling whose state is an :class:`UncertaintyState`; ``update``
    requires ``losses=``.

  Raises:
    ValueError: unknown ``regularizer``; bad losses (outside ``jit``; under
      ``jit`` they are clamped to ``[1e-12, 1e30]``).

  Example:
    >>> import jax.numpy as jnp, optax, optax_mtl as mtl
    >>> tx = optax.chain(mtl.uncertainty_weighting(num_tasks=2), optax.adam(1e-3))
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> g = {"w": jnp.ones((2, 3))}
    >>> u, state = tx.update(g, state, losses=jnp.array([1.0, 3.0]))
    >>> optax.tree.get(state, "task_weights")
    Array([0.5, 0.5], dtype=float32)

  References:
    Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty to Weigh
    Losses for Scene Geometry and Semantics", CVPR 2018. The log(1 + sigma^2)
    penalty: Liebel, Koerner, "Auxiliary Tasks in Multi-task Learning", 2018.
  """
  method = "mtl.scale_by_uncertainty"
  size = hyperparams.num_tasks(num_tasks, method)
  hyperparams.choice(regularizer, _REGULARIZERS, method, "regularizer")
  warm = hyperparams.flag(warm_start, method, "warm_start")
  opt = hyperparams.optimizer(optimizer, learning_rate, optax.adam, method)
  init_s = hyperparams.vector_or_scalar(init_log_variance, size, method,
                                        "init_log_variance")
  symmetric = np.ndim(init_log_variance) == 0

  def init(size):
    s = jnp.clip(init_s, -_LOG_BOUND, _LOG_BOUND)
    return UncertaintyState(0.5 * jnp.exp(-s), s, opt.init(s),
                            jnp.zeros((), jnp.int32))

  def rule(inputs, state):
    losses = loss_inputs.positive_losses(inputs.losses, method)
    s = state.log_variance
    if warm:
      start = jnp.clip(fixed_point(losses, regularizer), -_LOG_BOUND, _LOG_BOUND)
      s = jnp.where(state.count == 0, start, s)
    weights = 0.5 * jnp.exp(-s)
    data_term = -losses * weights  # d/ds of L e^{-s} / 2
    penalty_term = 0.5 if regularizer == "log" else jax.nn.sigmoid(s)
    grads = learned.without_rounding_noise(data_term + penalty_term,
                                           jnp.abs(data_term) + penalty_term)
    new_s, opt_state = learned.step(opt, s, grads, state.optimizer_state,
                                    _LOG_BOUND)
    return weights, state._replace(log_variance=new_s, optimizer_state=opt_state,
                                   count=optax.safe_increment(state.count))

  return transform.task_scaling(weighting.Weighting(
      name=method, rule=rule, init=init, reads={"losses"}, num_tasks=size,
      claims={"homogeneous"} | ({"permutation_equivariant"} if symmetric else set())))


uncertainty_weighting = aliases.alias(scale_by_uncertainty, "uncertainty_weighting",
                                      "num_tasks=2")
