"""Trace-time checks of the per-task gradient contract.

Every leaf of ``task_grads`` carries a leading task axis of the same length T.
These checks run on shapes and dtypes only, so they cost nothing under ``jit``
and fire before any computation is staged.
"""

from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_HOW_TO_BUILD = (
    "Build per-task gradients with mtl.value_and_jacobian(loss_fn), or stack "
    "T gradient pytrees with jax.tree.map(lambda *g: jnp.stack(g), *grads)."
)


def _leaf_path(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def _check_against_params(leads, task_grads, params, method: str) -> None:
  """Every leaf of ``task_grads`` has shape ``(T,) + param.shape``.

  Checked when ``update`` receives the parameters and their structure
  matches the gradients'. This catches parameter-shaped gradients (no task
  axis, whose first parameter axis would otherwise be taken as T) and a
  second aggregator in one chain (it receives one update, not T gradients).
  """
  params_leaves, params_def = jax.tree.flatten(params)
  if jax.tree.structure(task_grads) != params_def:
    return
  for (where, shape), param in zip(leads, params_leaves):
    param_shape = tuple(np.shape(param))
    if shape[1:] != param_shape:
      raise ValueError(
          f"{method}: leaf {where} of task_grads has shape {shape} (leading "
          f"axis {shape[0]}), but per-task gradients need shape (T,) + "
          f"param.shape = (T, {', '.join(map(str, param_shape))}). Pass one "
          f"gradient per task stacked on a leading axis (not the gradient of "
          f"the summed loss), and put only one aggregator in a chain: after "
          f"it the updates have the parameters' shapes. " + _HOW_TO_BUILD)


def num_tasks(task_grads: Any, method: str, expected: int | None = None,
              params: Any = None) -> int:
  """Returns T, the common leading axis of every leaf of ``task_grads``.

  Args:
    task_grads: pytree whose leaves all have a leading task axis.
    method: name of the calling transformation, used in error messages.
    expected: T known from elsewhere (e.g. ``losses``); leaves are checked
      against it so that the error names the leaf that disagrees.
    params: the parameters given to ``update``, if any; when their structure
      is the gradients', every leaf must be ``(T,) + param.shape``.

  Raises:
    ValueError: a leaf is not a floating array, has no leading axis, or its
      leading axis differs from the other leaves (or from ``expected``).
  """
  leaves = jax.tree_util.tree_flatten_with_path(task_grads)[0]
  if not leaves:
    raise ValueError(
        f"{method}: task_grads has no array leaves. Pass the per-task "
        f"gradients as a pytree of arrays with a leading task axis. "
        + _HOW_TO_BUILD)
  leads = []
  for path, leaf in leaves:
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    where = _leaf_path(path)
    if shape is None or dtype is None:
      raise ValueError(
          f"{method}: leaf {where} of task_grads is a {type(leaf).__name__}, "
          f"not an array. Every leaf must be an array whose leading axis "
          f"indexes the tasks. " + _HOW_TO_BUILD)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise ValueError(
          f"{method}: leaf {where} of task_grads has dtype {dtype}; gradients "
          f"must be floating point. Integer or float0 leaves come from "
          f"differentiating non-float parameters: keep those out of the "
          f"differentiated pytree (e.g. nnx.Optimizer(..., wrt=nnx.Param)).")
    if len(shape) == 0:
      raise ValueError(
          f"{method}: leaf {where} of task_grads is a scalar, so it has no "
          f"leading task axis. Every leaf needs shape (T, *param_shape). "
          + _HOW_TO_BUILD)
    leads.append((where, tuple(shape)))
  if params is not None:
    _check_against_params(leads, task_grads, params, method)
  # Without losses, the most common leading axis is taken as T, so the error
  # names the leaf that is the odd one out.
  counts = collections.Counter(shape[0] for _, shape in leads)
  reference_t = expected if expected is not None else counts.most_common(1)[0][0]
  for where, shape in leads:
    if shape[0] != reference_t:
      if expected is not None:
        source = f"losses has {expected} entries"
      else:
        agreeing = next(w for w, s in leads if s[0] == reference_t)
        source = f"leaf {agreeing} (and most others) has {reference_t}"
      raise ValueError(
          f"{method}: leaf {where} of task_grads has leading axis "
          f"{shape[0]} (shape {shape}), but {source}. Every leaf must "
          f"have the same leading task axis T; a leaf whose shape is the "
          f"parameter shape itself lacks the task axis. " + _HOW_TO_BUILD)
  if reference_t == 0:
    raise ValueError(f"{method}: task_grads has a task axis of length 0; "
                     f"at least one task is needed.")
  return int(reference_t)


def losses_vector(losses: Any, method: str, *, name: str = "losses"):
  """Converts ``losses`` to a float32 vector of shape [T], checking its rank.

  Lists or tuples of scalars are stacked. Returns None for None.
  """
  if losses is None:
    return None
  if isinstance(losses, (list, tuple)):
    losses = jnp.stack([jnp.asarray(l) for l in losses])
  shape = np.shape(losses)
  if len(shape) != 1:
    raise ValueError(
        f"{method}: {name} must be a vector of shape (T,) with one entry per "
        f"task, got shape {tuple(shape)}. Return jnp.stack([loss_1, ..., "
        f"loss_T]) from your loss function.")
  dtype = jnp.result_type(losses)
  if not (jnp.issubdtype(dtype, jnp.inexact) or jnp.issubdtype(dtype, jnp.integer)):
    raise ValueError(f"{method}: {name} has dtype {dtype}; pass real numbers.")
  return jnp.asarray(losses, jnp.float32)


def check_losses(losses: Any, num_tasks_: int, method: str, *,
                 required: bool, name: str = "losses"):
  """Validates ``losses`` (or another per-task vector) against T.

  Args:
    losses: the keyword argument passed to ``update``, or None.
    num_tasks_: T, from the task gradients.
    method: name of the calling transformation, for messages.
    required: whether the method needs the vector.
    name: the keyword's name, for messages (``losses``, ``kpis``...).

  Returns:
    A float32 array of shape [T], or None when not given and not required.

  Raises:
    TypeError: the vector is required and missing.
    ValueError: it is not a vector of length T.
  """
  if losses is None:
    if required:
      raise TypeError(
          f"{method} needs the per-task {name}: call "
          f"tx.update(task_grads, state, params, {name}={name}) with a "
          f"vector of shape ({num_tasks_},). Through nnx.Optimizer: "
          f"optimizer.update(model, grads, {name}={name}).")
    return None
  vector = losses_vector(losses, method, name=name)
  if vector.shape[0] != num_tasks_:
    raise ValueError(
        f"{method}: {name} has {vector.shape[0]} entries but task_grads has "
        f"T={num_tasks_} tasks. Pass one {name[:-1] if name.endswith('s') else name}"
        f" per task, in the same order as the task axis of the gradients.")
  return vector


def expected_tasks(losses: Any, method: str) -> int | None:
  """T implied by ``losses`` when given, to name the leaf that disagrees."""
  if losses is None:
    return None
  return int(losses_vector(losses, method).shape[0])


def check_configured_tasks(num_tasks_: int, configured: int, method: str,
                           argument: str = "num_tasks") -> None:
  """Raises when T at update differs from the T a method was built for."""
  if num_tasks_ != configured:
    raise ValueError(
        f"{method} was built for {configured} tasks ({argument}) but "
        f"task_grads has T={num_tasks_}. Build it with {argument} matching "
        f"the number of tasks (the leading axis of every gradient leaf).")

