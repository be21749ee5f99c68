"""FAMO: fast adaptive multitask optimisation from the losses' history."""

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
from optax_mtl._src.engine import validation

_LOGIT_BOUND = 40.0


class FAMOState(NamedTuple):
  """State of :func:`scale_by_famo`.

  Attributes:
    task_weights: [T] weights of the last update.
    logits: [T] task logits xi; ``z = softmax(xi)``.
    previous_losses: [T] shifted losses ``L_t - L_t^*`` of the last update.
    count: int32 number of updates so far.
    optimizer_state: state of the optimizer of the logits.
  """
  task_weights: jax.Array
  logits: jax.Array
  previous_losses: jax.Array
  count: jax.Array
  optimizer_state: Any


def scale_by_famo(
    *, num_tasks: int, learning_rate: Any = 0.025, weight_decay: Any = 1e-3,
    min_losses: Any = 0.0,
    optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Scales the tasks so that their log-losses fall at balanced rates.

  With task logits ``xi``, ``z = softmax(xi)`` and shifted losses
  ``D_t = L_t - L_t^*`` (``L^*`` = ``min_losses``), task t is scaled by

  .. math::
     w_t = \\frac{c\\, z_t}{D_t}, \\qquad c = \\Big(\\sum_s \\frac{z_s}{D_s}\\Big)^{-1}

  (the gradient of ``sum_t z_t log D_t``, normalised so that the weights sum
  to 1). After the parameter
  step, the logits follow the observed decrease of the log-losses
  ``delta_t = log D_t(before) - log D_t(after)``:

  .. math::
     \\xi \\leftarrow \\xi - \\beta \\big(J_z(\\xi)^\\top \\delta + \\gamma\\, \\xi\\big),
     \\qquad J_z = \\operatorname{diag}(z) - z z^\\top

  (with the default optimizer, Adam on that gradient). Tasks whose loss fell
  more than the others lose weight.

  **Passing the losses after the step.** ``delta`` needs the losses after the
  update, which exist only at the next step. The state keeps the shifted
  losses of the last update; at the next ``update`` the logits take their
  step first, then the new weights are formed:

  * ``update(..., losses=L_new)``: ``delta = log D(previous batch, previous
    params) - log D(new batch, new params)``, a one-forward approximation
    (different batches);
  * ``update(..., losses=L_new, previous_batch_losses=L_prev_now)``: pass the
    losses of the *previous* batch at the *current* parameters (one more
    forward pass) and ``delta`` is exactly the paper's same-batch decrease.

  The first update only records the losses (``z`` uniform, no logit step).

  Args:
    num_tasks: T (the state holds the logits).
    learning_rate: beta, step size of the default optimizer (Adam) of the
      logits.
    weight_decay: gamma >= 0, decay of the logits toward uniform weights.
    min_losses: lower bounds ``L^*`` of the losses (scalar or [T]); 0 for
      non-negative losses.
    optimizer: optional optax optimizer of the logits replacing
      ``optax.adam(learning_rate)`` (the decay is added to its gradient).

  Returns:
    A task scaling whose state is a :class:`FAMOState`; ``update`` requires
    ``losses=`` and accepts ``previous_batch_losses=``.

  Raises:
    ValueError: ``L - L^*`` is not positive and finite (outside ``jit``; under
      ``jit`` it is clamped to ``[1e-12, 1e30]``); bad hyperparameters.

  Example:
    >>> import jax.numpy as jnp, optax, optax_mtl as mtl
    >>> tx = optax.chain(mtl.famo(num_tasks=2), optax.adam(1e-3))
    >>> state = tx.init({"w": jnp.zeros(3)})

  References:
    Liu, Feng, Stone, Liu, "FAMO: Fast Adaptive Multitask Optimization",
    NeurIPS 2023.
  """
  method = "mtl.scale_by_famo"
  size = hyperparams.num_tasks(num_tasks, method)
  opt = hyperparams.optimizer(optimizer, learning_rate, optax.adam, method)
  decay = jnp.asarray(hyperparams.nonnegative(weight_decay, method, "weight_decay"),
                      jnp.float32)
  symmetric = np.ndim(min_losses) == 0
  floor = hyperparams.vector_or_scalar(min_losses, size, method, "min_losses")

  def init(size):
    logits = jnp.zeros(size, jnp.float32)
    return FAMOState(jnp.full(size, 1.0 / size, jnp.float32), logits,
                     jnp.ones(size, jnp.float32), jnp.zeros((), jnp.int32),
                     opt.init(logits))

  def rule(inputs, state):
    shifted = loss_inputs.positive_losses(inputs.losses - floor, method,
                                          name="losses - min_losses")
    after = validation.check_losses(inputs.extra.get("previous_batch_losses"),
                                    size, method, required=False,
                                    name="previous_batch_losses")
    after = shifted if after is None else loss_inputs.positive_losses(
        after - floor, method, name="previous_batch_losses - min_losses")

    z = jax.nn.softmax(state.logits)
    log_before, log_after = jnp.log(state.previous_losses), jnp.log(after)
    delta = log_before - log_after
    # J_z^T annihilates constant vectors, so delta is centred first; what is
    # left below the float32 resolution of the log-losses is rounding noise,
    # which Adam (it normalises by the gradient's size) would turn into
    # full-size logit steps. It is zeroed.
    delta = learned.without_rounding_noise(
        delta - jnp.mean(delta),
        1.0 + jnp.maximum(jnp.max(jnp.abs(log_before)), jnp.max(jnp.abs(log_after))))
    logit_grads = z * delta - z * jnp.dot(z, delta) + decay * state.logits
    logits, opt_state = learned.step(opt, state.logits, logit_grads,
                                     state.optimizer_state, _LOGIT_BOUND,
                                     active=state.count > 0)

    z = jax.nn.softmax(logits)
    # c z_t / D_t = softmax(log z - log D)_t: finite for losses of any scale.
    weights = jax.nn.softmax(jnp.log(z) - jnp.log(shifted))
    return weights, state._replace(logits=logits, previous_losses=shifted,
                                   count=optax.safe_increment(state.count),
                                   optimizer_state=opt_state)

  return transform.task_scaling(weighting.Weighting(
      name=method, rule=rule, init=init, reads={"losses"}, num_tasks=size,
      claims={"homogeneous"} | ({"permutation_equivariant"} if symmetric else set())))


famo = aliases.alias(scale_by_famo, "famo", "num_tasks=2")
