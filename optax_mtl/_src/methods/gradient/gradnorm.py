"""GradNorm: task weights learned so that weighted gradient norms match targets."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src.core import aliases
from optax_mtl._src.core import learned
from optax_mtl._src.core import training_rates
from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams
from optax_mtl._src.engine import masking

_METHOD = "mtl.scale_by_gradnorm"
# Weights after a step are kept in [_MIN_WEIGHT, _MAX_WEIGHT] before the
# renormalisation to sum T: positive (a weight of 0 would stay 0 under the
# multiplicative renormalisation) and finite even for huge gradient norms.
_MIN_WEIGHT = 1e-6
_MAX_WEIGHT = 1e6


class GradNormState(NamedTuple):
  """State of :func:`scale_by_gradnorm`.

  Attributes:
    task_weights: [T] float32, the weights the last update applied.
    learned_weights: [T] float32, the weights the next update applies (they
      sum to T).
    initial_losses: [T] float32, ``L_t(0)``, recorded at the first update.
    count: int32, number of updates so far.
    optimizer_state: state of the optimizer of the weights.
  """
  task_weights: jax.Array
  learned_weights: jax.Array
  initial_losses: jax.Array
  count: jax.Array
  optimizer_state: Any


def weight_gradient(task_weights, norms, rates, alpha):
  """Gradient of GradNorm's loss in the weights, targets held constant.

  With ``G_t = w_t n_t`` (``n_t = ||grad_W L_t||``) and the targets
  ``mean(G) r_t^alpha``, ``L_grad = sum_t |G_t - target_t|`` has gradient
  ``sign(G_t - target_t) n_t`` in ``w_t``.

  Args:
    task_weights: [T] current weights ``w(t)``.
    norms: [T] gradient norms ``n_t`` on the layer W.
    rates: [T] inverse training rates ``r_t``.
    alpha: restoring-force strength.

  Returns:
    [T] gradient.
  """
  weighted = task_weights * norms
  target = jnp.mean(weighted) * rates ** jnp.asarray(alpha, jnp.float32)
  return jnp.sign(weighted - target) * norms


def renormalize(stepped):
  """Clamps stepped weights positive and rescales them to sum to T."""
  stepped = jnp.clip(stepped, _MIN_WEIGHT, _MAX_WEIGHT)
  return stepped.shape[0] * stepped / jnp.sum(stepped)


def scale_by_gradnorm(
    *,
    num_tasks: int,
    alpha: float = 1.5,
    learning_rate: float = 0.025,
    layer: masking.SharedMask = None,
    optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
  """GradNorm: multiplies each task gradient by a learned weight.

  The weights ``w_t`` (summing to T) are applied to the task gradients, then
  updated by one gradient step on

  .. math::
     L_{grad} = \\sum_t \\big| G_t - \\bar G\\, r_t^{\\alpha} \\big|, \\quad
     G_t = w_t \\|\\nabla_W L_t\\|, \\quad
     r_t = \\frac{L_t / L_t(0)}{\\operatorname{mean}_s L_s / L_s(0)},

  with ``bar G = mean_t G_t`` and the targets ``bar G r_t^alpha`` held
  constant, so ``dL_grad / dw_t = sign(G_t - target_t) ||grad_W L_t||``.
  The step is taken by Adam, as when the weights are parameters trained by
  the network's Adam: its step size does not depend on the gradient norms,
  which may differ between tasks by orders of magnitude (a plain gradient
  step of ``learning_rate * ||grad_W L_t||`` then throws the weights from
  one extreme to the other). ``optimizer=optax.sgd(learning_rate)`` gives
  the plain step. After the step the weights are clamped positive and
  renormalised to sum T. As in the paper, the update at step t applies ``w(t)`` and stores
  ``w(t + 1)``; ``L_t(0)`` is taken from the first update's ``losses``.

  ``W`` is every leaf by default; ``layer`` picks a subset, e.g. the last
  shared layer as in the paper (cheaper and the authors' choice). Only the
  norms over those leaves are read: one pass, shared with the aggregator's
  statistics in an ``mtl.chain``.
  Every leaf (heads included) is scaled by its task's weight: this is the
  gradient of ``sum_t w_t L_t``.

  Args:
    num_tasks: T, the number of tasks (the state holds one weight per task).
    alpha: strength of the pull toward equal training rates (>= 0). May be
      traced.
    learning_rate: step size of the weight update (Adam's). May be traced.
    layer: optional mask (pytree of bools or callable on params, like
      ``shared=``) of the leaves W whose gradient norms are balanced.
    optimizer: optional optax optimizer of the weights, replacing
      ``optax.adam(learning_rate)``; its state lives in this state.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` task scaling with a
    :class:`GradNormState`; ``update`` needs ``losses=``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_mtl as mtl
    >>> tx = optax.chain(mtl.scale_by_gradnorm(num_tasks=2), mtl.sum(), optax.sgd(0.1))
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> task_grads = {"w": jnp.array([[1.0, 0.0], [0.0, 3.0]])}
    >>> updates, state = tx.update(task_grads, state, params,
    ...                            losses=jnp.array([1.0, 2.0]))

  References:
    Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization
    for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018.
  """
  size = hyperparams.num_tasks(num_tasks, _METHOD)
  hyperparams.nonnegative(alpha, _METHOD, "alpha")
  opt = hyperparams.optimizer(optimizer, learning_rate, optax.adam, _METHOD)

  def init(size):
    weights = jnp.ones((size,), jnp.float32)
    return GradNormState(
        task_weights=weights, learned_weights=weights,
        initial_losses=jnp.zeros((size,), jnp.float32),
        count=jnp.zeros((), jnp.int32),
        optimizer_state=opt.init(weights))

  def rule(inputs, state):
    initial = training_rates.record_initial(inputs.losses, state.initial_losses,
                                            state.count)
    rates = training_rates.inverse_training_rates(inputs.losses, initial)
    applied = state.learned_weights
    grad = weight_gradient(applied, inputs.norms, rates, alpha)
    stepped, opt_state = learned.step(opt, applied, grad, state.optimizer_state,
                                      _MAX_WEIGHT)
    return applied, state._replace(
        learned_weights=renormalize(stepped), initial_losses=initial,
        count=optax.safe_increment(state.count), optimizer_state=opt_state)

  return transform.task_scaling(weighting.Weighting(
      name=_METHOD, rule=rule, init=init, reads={"norms", "losses"},
      num_tasks=size, claims={"permutation_equivariant"}), shared=layer)


gradnorm = aliases.alias(scale_by_gradnorm, "gradnorm", "num_tasks=2, alpha=1.5")
