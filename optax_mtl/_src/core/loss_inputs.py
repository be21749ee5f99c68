"""Guards on the losses and KPIs that methods divide by or take logarithms of.

Losses enter logarithms and divisions, so every method here reads them through
:func:`positive_losses`: concrete values (outside ``jit``) that are zero or
negative raise a ValueError naming the task; traced values are clamped to
``[LOSS_FLOOR, LOSS_CEILING]``. A NaN or inf loss makes the core skip the step
(:mod:`optax_mtl._src.core.finite`); it is only clamped here, so that the
arithmetic of the skipped step stays finite. Scalarisations, which take the
losses as they are, read them through :func:`finite_losses`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_mtl._src.engine import hyperparams

LOSS_FLOOR = 1e-12
LOSS_CEILING = 1e30
KPI_FLOOR = 1e-6


def is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def positive_losses(losses: jax.Array, method: str, name: str = "losses"):
  """Returns ``losses`` checked (concrete) or clamped (traced) to be > 0.

  Args:
    losses: [T] float32 vector (already validated for shape).
    method: public name, for messages.
    name: keyword name, for messages.

  Returns:
    The losses clamped to ``[LOSS_FLOOR, LOSS_CEILING]``. A NaN or inf loss
    is not an error: the core skips such a step (zero update, state
    unchanged, see :mod:`optax_mtl._src.core.finite`), so it is only clamped
    here to keep the rule's arithmetic finite.

  Raises:
    ValueError: a concrete entry is zero or negative.
  """
  if is_concrete(losses):
    values = np.asarray(losses, np.float64)
    bad = np.flatnonzero(np.isfinite(values) & (values <= 0))
    if bad.size:
      raise ValueError(
          f"{method} divides by or takes the logarithm of the {name}, so they "
          f"must be > 0; task(s) {bad.tolist()} have {values[bad].tolist()}. "
          f"Check the loss function for a negative term, or add a small "
          f"epsilon to losses that can reach 0. (Under jax.jit such values "
          f"are clamped to [{LOSS_FLOOR:g}, {LOSS_CEILING:g}] instead.)")
  clean = jnp.where(jnp.isnan(losses), LOSS_CEILING, losses)
  return jnp.clip(clean, LOSS_FLOOR, LOSS_CEILING)


def kpis_in_unit_interval(kpis: jax.Array, method: str) -> jax.Array:
  """Returns ``kpis`` checked (concrete) or clamped (traced) to (0, 1].

  Traced values are clamped to ``[KPI_FLOOR, 1]``. A NaN or inf KPI makes
  the core skip the step (as a non-finite loss does), so it is only clamped
  here.

  Raises:
    ValueError: a concrete finite entry lies outside (0, 1].
  """
  if is_concrete(kpis):
    values = np.asarray(kpis, np.float64)
    bad = np.flatnonzero(np.isfinite(values) & ~((values > 0) & (values <= 1)))
    if bad.size:
      raise ValueError(
          f"{method}: kpis must lie in (0, 1] (e.g. an accuracy or IoU, "
          f"higher is better); task(s) {bad.tolist()} have "
          f"{values[bad].tolist()}. Rescale each KPI to (0, 1] and clip an "
          f"exact 0 to a small positive value. (Under jax.jit they are "
          f"clamped to [{KPI_FLOOR:g}, 1] instead.)")
  clean = jnp.where(jnp.isnan(kpis), KPI_FLOOR, kpis)
  return jnp.clip(clean, KPI_FLOOR, 1.0)


def finite_losses(losses: jax.Array) -> jax.Array:
  """The losses with NaN and inf clamped to +-LOSS_CEILING.

  A step with a non-finite loss is skipped by the core (zero update, state
  kept; see :mod:`optax_mtl._src.core.finite`); the clamp only keeps the
  arithmetic of that step free of NaN.
  """
  clean = jnp.where(jnp.isnan(losses), LOSS_CEILING, losses)
  return jnp.clip(clean, -LOSS_CEILING, LOSS_CEILING)


def preference(value: Any, method: str, num_tasks: int | None = None) -> jax.Array:
  """A [T] preference over the tasks, validated: nonnegative, one entry > 0.

  Raises:
    ValueError: a negative entry, none positive (when concrete), or a length
      other than ``num_tasks`` when it is given.
  """
  vector = hyperparams.weight_vector(value, method, "preference")
  hyperparams.nonnegative(value, method, "preference")
  values = hyperparams.concrete(value)
  if values is not None and not np.any(values > 0):
    raise ValueError(f"{method}: preference must have a positive entry (it "
                     f"weights the tasks), got {values.tolist()}.")
  if num_tasks is not None and vector.shape[0] != num_tasks:
    raise ValueError(f"{method}: num_tasks={num_tasks} but preference has "
                     f"{vector.shape[0]} entries; pass one preference per "
                     f"task.")
  return vector


def unit_and_norm(v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(v / ||v||, ||v||)`` without squaring v (no overflow at 1e30); 0 for v = 0."""
  largest = jnp.max(jnp.abs(v))
  safe = jnp.where(largest > 0, largest, 1.0)
  scaled = v / safe
  norm = jnp.sqrt(jnp.sum(scaled * scaled))
  unit = jnp.where(norm > 0, scaled / jnp.where(norm > 0, norm, 1.0), 0.0)
  return unit, largest * norm
