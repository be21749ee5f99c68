"""Gradient normalisation: every task gradient rescaled to unit norm."""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src import masking
from optax_mtl._src import transform
from optax_mtl._src import validation
from optax_mtl._src.gradient_methods import _simplex
from optax_mtl._src.gradient_methods import gradnorm as gradnorm_lib

_METHOD = "mtl.normalize_gradients"


class NormalizeGradientsState(NamedTuple):
  """State of :func:`normalize_gradients` when it uses loss ratios.

  Attributes:
    initial_losses: [T] float32, ``L_t(0)``, recorded at the first update.
    count: int32, number of updates so far.
  """
  initial_losses: jax.Array
  count: jax.Array


def inverse_norms(gram) -> jax.Array:
  """``1 / ||g_t||`` per task, 0 for a zero (or unrepresentable) norm."""
  unit = jnp.sqrt(jnp.maximum(jnp.diagonal(gram.normalized), 0.0))
  # 1 / (scale * unit) as two factors, so neither product over- or underflows
  # before the division.
  inv_scale = 1.0 / gram.scale
  inv = jnp.where(unit > 0, inv_scale / jnp.where(unit > 0, unit, 1.0), 0.0)
  return jnp.where(jnp.isfinite(inv), inv, 0.0)


def normalize_gradients(
    alpha: float = 0.0,
    num_tasks: int | None = None,
    *,
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

  Without ``num_tasks`` the method is stateless and ``alpha`` must be 0.
  With ``num_tasks`` it records ``L_t(0)`` at the first update, needs
  ``losses=`` at every update, and ``alpha`` may be traced (e.g.
  ``optax.inject_hyperparams``).

  Args:
    alpha: exponent of the inverse training rates (>= 0); needs
      ``num_tasks`` when it is not the literal 0.
    num_tasks: T, required for the loss ratios (``alpha != 0``).
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
  value = _simplex.concrete_value(alpha)
  if value is not None and not (value >= 0 and value < float("inf")):
    raise ValueError(f"{_METHOD}: alpha must be a finite number >= 0, got {alpha!r}.")

  if num_tasks is None:
    def stateless(inputs, state):
      return inverse_norms(inputs.gramian), state
    return transform.task_scaling(_METHOD, stateless, shared=shared,
                                  uses_gramian=True)

  gradnorm_lib.check_num_tasks(num_tasks, _METHOD)

  def init_fn(params):
    del params
    return NormalizeGradientsState(
        initial_losses=jnp.zeros((num_tasks,), jnp.float32),
        count=jnp.zeros((), jnp.int32))

  def weights_fn(inputs, state):
    validation.check_configured_tasks(inputs.num_tasks, num_tasks, _METHOD)
    losses = inputs.losses
    initial = jnp.where(state.count == 0, losses, state.initial_losses)
    rates = gradnorm_lib.inverse_training_rates(losses, initial)
    scales = inverse_norms(inputs.gramian) * rates ** jnp.asarray(alpha, jnp.float32)
    count = optax.safe_increment(state.count)
    return scales, NormalizeGradientsState(initial, count)

  return transform.task_scaling(_METHOD, weights_fn, init_fn, shared=shared,
                                uses_gramian=True, needs_losses=True)
