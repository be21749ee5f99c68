"""Construction-time checks of hyperparameters, with one exception policy.

* ``TypeError``: the argument has the wrong kind (``num_tasks`` not a Python
  int, a flag not a bool, a seed not an integer, an optimizer that is not an
  optax transformation).
* ``ValueError``: the kind is right and the value is out of range; the message
  names the parameter and the valid range.

A hyperparameter that is traced (``optax.inject_hyperparams`` rebuilds the
transformation inside ``init`` / ``update`` with traced values) cannot be
checked and passes through unchanged, so every check here is trace-safe.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def concrete(value: Any) -> np.ndarray | None:
  """``value`` as a float64 array when it is concrete, else None (traced)."""
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return np.asarray(value, np.float64)
  except (TypeError, ValueError):
    return None


def num_tasks(value: Any, method: str, *, required: bool = True) -> int | None:
  """Validates ``num_tasks``, the T a method's state is shaped by.

  Returns None when it is omitted and not required.
  """
  if value is None and not required:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(
        f"{method}: num_tasks must be a positive Python int (the number of "
        f"tasks T; the state holds one entry per task and init only sees the "
        f"parameters; with optax.inject_hyperparams list it in static_args), "
        f"got {value!r}.")
  if value < 1:
    raise ValueError(f"{method}: num_tasks must be a positive int >= 1, got "
                     f"{value}.")
  return int(value)


def _describe(low, high, low_open, high_open) -> str:
  if high is None or high == math.inf:
    return f"finite and {'>' if low_open else '>='} {low:g}"
  left = "(" if low_open else "["
  right = ")" if high_open else "]"
  return f"in {left}{low:g}, {high:g}{right}"


def in_range(value: Any, method: str, argument: str, low: float,
             high: float | None = None, *, low_open: bool = False,
             high_open: bool = False) -> Any:
  """Checks every entry of a concrete ``value`` is finite and in the range.

  Args:
    value: scalar or array hyperparameter (traced values pass).
    method: public name, for the message.
    argument: the parameter's name.
    low: lower bound.
    high: upper bound (None: unbounded above, values must be finite).
    low_open: whether ``low`` itself is excluded.
    high_open: whether ``high`` itself is excluded.

  Returns:
    ``value`` unchanged.

  Raises:
    ValueError: a concrete entry is outside the range or not finite.
  """
  values = concrete(value)
  if values is None:
    return value
  ok = np.isfinite(values) & ((values > low) if low_open else (values >= low))
  if high is not None:
    ok &= (values < high) if high_open else (values <= high)
  if not np.all(ok):
    raise ValueError(
        f"{method}: {argument} must be "
        f"{_describe(low, high, low_open, high_open)}, got "
        f"{values.tolist()}.")
  return value


def positive(value: Any, method: str, argument: str) -> Any:
  """``value`` finite and > 0 (e.g. a learning rate or a temperature)."""
  return in_range(value, method, argument, 0.0, low_open=True)


def nonnegative(value: Any, method: str, argument: str) -> Any:
  """``value`` finite and >= 0."""
  return in_range(value, method, argument, 0.0)


def integer(value: Any, method: str, argument: str, low: int = 1) -> Any:
  """A concrete ``value`` is an integer >= ``low`` (e.g. ``max_iters``)."""
  values = concrete(value)
  if values is None:
    return value
  if isinstance(value, bool) or values.shape != () or not (
      np.isfinite(values) and values == np.round(values) and values >= low):
    raise ValueError(f"{method}: {argument} must be an integer >= {low}, got "
                     f"{value!r}.")
  return value


def static_integer(value: Any, method: str, argument: str, low: int = 1) -> int:
  """A Python int >= ``low`` that shapes the program (a count, an index)."""
  if isinstance(value, jax.core.Tracer) or isinstance(value, bool) or not (
      isinstance(value, (int, np.integer))):
    raise TypeError(
        f"{method}: {argument} must be a Python int (it fixes the shapes of "
        f"the computation; with optax.inject_hyperparams list it in "
        f"static_args), got {value!r}.")
  integer(value, method, argument, low)
  return int(value)


def choice(value: Any, options: Sequence[Any], method: str, argument: str) -> Any:
  """``value`` is one of ``options`` (a static choice such as a mode name)."""
  if isinstance(value, jax.core.Tracer):
    return value
  if value not in tuple(options):
    raise ValueError(f"{method}: {argument} must be one of {tuple(options)}, "
                     f"got {value!r}.")
  return value


def flag(value: Any, method: str, argument: str) -> bool:
  """A static Python bool (it changes the traced program)."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{method}: {argument} must be True or False, got "
                    f"{value!r}.")
  return bool(value)


def seed(value: Any, method: str) -> Any:
  """An integer seed (a Python or NumPy int, or an integer array)."""
  if isinstance(value, bool) or not (
      isinstance(value, numbers.Integral)
      or (isinstance(value, (jax.Array, np.ndarray))
          and np.issubdtype(value.dtype, np.integer))):
    raise TypeError(f"{method}: seed must be an integer, got {value!r}.")
  return value


def optimizer(value: Any, learning_rate: Any, default, method: str
              ) -> optax.GradientTransformation:
  """``value`` or ``default(learning_rate)``: the optimizer of learned weights."""
  if value is None:
    return default(positive(learning_rate, method, "learning_rate"))
  if not isinstance(value, optax.GradientTransformation):
    raise TypeError(
        f"{method}: optimizer must be an optax.GradientTransformation (e.g. "
        f"optax.sgd(0.01)) for the method's own parameters, got "
        f"{type(value).__name__}.")
  return value


def vector_or_scalar(value: Any, size: int, method: str, argument: str):
  """A scalar or a [T] vector hyperparameter, as a float32 [T] vector."""
  array = jnp.asarray(value, jnp.float32)
  if array.ndim > 1 or (array.ndim == 1 and array.shape[0] != size):
    raise ValueError(f"{method}: {argument} must be a scalar or a vector of "
                     f"length num_tasks={size}, got shape {array.shape}.")
  values = concrete(value)
  if values is not None and not np.all(np.isfinite(values)):
    raise ValueError(f"{method}: {argument} must be finite, got "
                     f"{values.tolist()}.")
  return jnp.broadcast_to(array, (size,))


def weight_vector(values: Any, method: str, argument: str) -> jax.Array:
  """A non-empty [T] vector of finite weights (traced values pass), float32."""
  shape = np.shape(values)
  if len(shape) != 1 or shape[0] == 0:
    raise ValueError(
        f"{method}: {argument} must be a non-empty vector with one entry per "
        f"task, got shape {tuple(shape)}.")
  checked = concrete(values)
  if checked is not None and not np.all(np.isfinite(checked)):
    raise ValueError(f"{method}: {argument} must be finite, got "
                     f"{checked.tolist()}.")
  return jnp.asarray(values, jnp.float32)
