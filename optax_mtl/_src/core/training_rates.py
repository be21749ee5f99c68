"""Inverse training rates, the loss ratios that GradNorm-style methods read."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Ratios are floored here so that r**alpha stays finite for alpha < 0.
_MIN_RATIO = 1e-12


def record_initial(losses: jax.Array, initial: jax.Array, count: jax.Array):
  """``L(0)``: the first update's losses, kept afterwards."""
  return jnp.where(count == 0, losses, initial)


def inverse_training_rates(losses: jax.Array, initial_losses: jax.Array) -> jax.Array:
  """``r_t = (L_t / L_t(0)) / mean_s(L_s / L_s(0))``, guarded.

  Non-positive initial losses give a ratio of 1 and ratios are floored at a
  tiny positive value, so ``r_t ** alpha`` is always finite.

  References:
    Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization
    for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018 (Eq. 4).
  """
  ratio = jnp.where(initial_losses > 0,
                    losses / jnp.where(initial_losses > 0, initial_losses, 1.0),
                    1.0)
  ratio = jnp.maximum(jnp.where(jnp.isfinite(ratio), ratio, 1.0), 0.0)
  mean = jnp.mean(ratio)
  rates = jnp.where(mean > 0, ratio / jnp.where(mean > 0, mean, 1.0), 1.0)
  return jnp.maximum(rates, _MIN_RATIO)
