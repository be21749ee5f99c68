"""Per-task parameters learned inside a transformation's state.

Uncertainty weighting, IMTL-L and FAMO each learn a small [T] vector jointly
with the network. Their objectives are simple functions of the losses, so the
exact gradient with respect to that vector is written in closed form by each
method; this module only applies an optax optimizer to it, keeping the
optimizer's state inside the method's state (no second backward pass).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

_MAX_GRAD = 1e6


def step(optimizer: optax.GradientTransformation, values: jax.Array,
         grads: jax.Array, opt_state: Any, bound: float, active=True):
  """One optimizer step on ``values`` (kept in ``[-bound, bound]``).

  Args:
    optimizer: the method's optimizer.
    values: current [T] parameters.
    grads: their exact gradient.
    opt_state: the optimizer's state.
    bound: the parameters are clipped to ``[-bound, bound]`` so that their
      exponentials stay finite in float32.
    active: boolean scalar; when False, parameters and optimizer state are
      returned unchanged (e.g. before a method has what it needs).

  Returns:
    ``(new_values, new_opt_state)``.
  """
  # Bounded so that optimizer statistics (Adam squares them) stay finite even
  # for losses at the clamp ceiling.
  grads = jnp.clip(jnp.where(jnp.isnan(grads), 0.0, grads), -_MAX_GRAD, _MAX_GRAD)
  updates, new_opt_state = optimizer.update(grads, opt_state, values)
  new_values = jnp.clip(optax.apply_updates(values, updates), -bound, bound)
  new_values = jnp.where(active, new_values, values)
  new_opt_state = jax.tree.map(lambda new, old: jnp.where(active, new, old),
                               new_opt_state, opt_state)
  return new_values.astype(jnp.float32), new_opt_state


def without_rounding_noise(gradient: jax.Array, magnitude: jax.Array) -> jax.Array:
  """Zeroes a gradient that is a difference of terms below their resolution.

  At a method's fixed point its closed-form gradient is a difference of
  nearly equal terms (``e^{s} L - 1``), so what is left is float32 rounding,
  which differs between eager and compiled code. Adam normalises by the
  gradient's size and would turn that noise into full-size steps; below
  ``8 eps * magnitude`` (``magnitude``: the sum of the terms' absolute
  values) the gradient is taken as zero.
  """
  resolution = 8.0 * jnp.finfo(jnp.float32).eps * magnitude
  return jnp.where(jnp.abs(gradient) <= resolution, 0.0, gradient)
