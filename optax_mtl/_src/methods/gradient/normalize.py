"""Gradient normalisation: every task gradient rescaled to unit norm."""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src.core import training_rates
from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams
from optax_mtl._src.engine import masking

_METHOD = "mtl.normalize_gradients"


class NormalizeGradientsState(NamedTuple):
  """State of :func:`normalize_gradients`.

  Attributes:
    task_weights: [T] float32, ``r_t^alpha / ||g_t||`` of the last update
      (None without ``num_tasks``).
    initial_losses: [T] float32, ``L_t(0)``, recorded at the first update
      (None without ``num_tasks``).
    count: int32, number of updates so far.
  """
  task_weights: jax.Array
  initial_losses: jax.Array
  count: jax.Array


def inverse_norms(norms: jax.Array) -> jax.Array:
  """``1 / ||g_t||`` per task, 0 for a zero (or unrepresentable) norm."""
  inv = 1.0 / jnp.where(norms > 0, norms, 1.0)
  return jnp.where((norms > 0) & jnp.isfinite(inv), inv, 0.0)


def normalize_gradients(
    alpha: float = 0.0,
    *,
    num_tasks: int | None = None,
    shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """Divides each task gradient by its norm, optionally times ``r_t^alpha``.

  .. math::
     \\tilde g_t = \\frac{r_t^{\\alpha}}{\\|g_t\\|} g_t, \\qquad
     r_t = \\frac{L_t / L_t(0)}{\\operatorname{mean}_s L_s / L_s(0)}

  the gradient of ``sum_t L_t r_t^alpha / ||grad L_t||`` with the factors
  held constant: every task moves the shared parameters with the same
  gradient norm, and with ``alpha > 0`` tasks that train slower than the
  others (larger ``r_t``) get proportionally more. A zero gradient stays
  zero. The norm is measured over the ``shared`` leaves (all by default) and
  every leaf is scaled.

  Only the norms are read (one pass over the shared leaves, or none in an
  ``mtl.chain`` whose aggregator computes the Gramian over the same leaves).
  Without ``num_tasks``, ``alpha`` must be 0 and ``losses`` are not read.
  With ``num_tasks`` it records ``L_t(0)`` at the first update, needs
  ``losses=`` at every update, keeps its weights in ``task_weights``, and
  ``alpha`` may be traced (e.g. ``optax.inject_hyperparams``).

  Args:
    alpha: exponent of the inverse training rates (>= 0); needs
      ``num_tasks`` when it is not the literal 0.
    num_tasks: T, required for the loss ratios (``alpha != 0``); with it the
      state keeps the weights.
    shared: optional mask (pytree of bools or callable on params) of the
      leaves over which the norms are measured.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` task scaling (stacked in,
    stacked out); chain it with an aggregator such as ``mtl.sum()``.

  Raises:
    ValueError: ``alpha`` is not 0 and ``num_tasks`` is missing, or a
      hyperparameter is out of range.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.normalize_gradients()
    >>> task_grads = {"w": jnp.array([[3.0, 4.0], [0.0, 0.5]])}
    >>> tx.update(task_grads, tx.init(None))[0]["w"]
    Array([[0.6, 0.8],
           [0. , 1. ]], dtype=float32)

  References:
    Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization
    for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018 (the
    inverse training rates and the equal-norm target this method enforces
    directly).
  """
  is_zero_literal = isinstance(alpha, numbers.Number) and alpha == 0
  if num_tasks is None and not is_zero_literal:
    raise ValueError(
        f"{_METHOD}: alpha={alpha!r} uses the loss ratios r_t, which need the "
        f"initial losses kept in the state. Pass num_tasks=T (and losses= at "
        f"every update), or leave alpha at 0.")
  hyperparams.nonnegative(alpha, _METHOD, "alpha")
  size = hyperparams.num_tasks(num_tasks, _METHOD, required=False)
  claims = {"permutation_equivariant", "task_scale_invariant"}

  def init(size):
    return NormalizeGradientsState(
        weighting.initial_weights(size),
        None if size is None else jnp.zeros((size,), jnp.float32),
        jnp.zeros((), jnp.int32))

  if size is None:
    def stateless(inputs, state):
      return inverse_norms(inputs.norms), state
    return transform.task_scaling(weighting.Weighting(
        name=_METHOD, rule=stateless, init=init, reads={"norms"},
        claims=claims), shared=shared)

  def rule(inputs, state):
    initial = training_rates.record_initial(inputs.losses, state.initial_losses,
                                            state.count)
    rates = training_rates.inverse_training_rates(inputs.losses, initial)
    scales = inverse_norms(inputs.norms) * rates ** jnp.asarray(alpha, jnp.float32)
    return scales, state._replace(initial_losses=initial,
                                  count=optax.safe_increment(state.count))

  return transform.task_scaling(weighting.Weighting(
      name=_METHOD, rule=rule, init=init, reads={"norms", "losses"},
      num_tasks=size, claims=claims), shared=shared)
