"""Resolution of the ``shared=`` mask that separates shared leaves from heads.

Shared leaves receive gradients from several tasks and are combined by the
method; the other leaves are task-specific (heads) and are summed over the
task axis, which gives each head its own task's gradient.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import jax
import numpy as np

SharedMask = Union[None, Any, Callable[[Any], Any]]


def _as_static_bool(value, method: str) -> bool:
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
        f"{method}: the shared= mask holds a traced value. The mask must be "
        f"static Python booleans (True for shared leaves); build it outside "
        f"jax.jit or from parameter paths, not from array values.")
  if isinstance(value, (np.ndarray, jax.Array)) and np.shape(value) == ():
    return bool(value)
  raise ValueError(
      f"{method}: the shared= mask has a leaf of type {type(value).__name__}; "
      f"each leaf must be a Python bool (True = shared, combined by the "
      f"method; False = task-specific head, summed over tasks).")


def resolve_shared(shared: SharedMask, task_grads: Any, params: Any,
                   method: str):
  """Returns a pytree of Python bools with the structure of ``task_grads``.

  Args:
    shared: None (every leaf shared), a pytree of bools that is a prefix of
      the gradients' structure, or a callable mapping ``params`` to one.
    task_grads: the per-task gradients.
    params: the parameters passed to ``update`` (needed by a callable mask).
    method: name of the calling transformation, for messages.
  """
  if shared is None:
    return jax.tree.map(lambda _: True, task_grads)
  if callable(shared):
    if params is None:
      raise ValueError(
          f"{method}: shared= is a callable on the parameters, but update() "
          f"was called without params. Call tx.update(task_grads, state, "
          f"params, ...) or pass a pytree of bools as shared=.")
    shared = shared(params)
  try:
    return jax.tree.map(
        lambda flag, subtree: jax.tree.map(
            lambda _: _as_static_bool(flag, method), subtree),
        shared, task_grads)
  except ValueError as error:
    if str(error).startswith(method):
      raise
    raise ValueError(
        f"{method}: the shared= mask does not match the structure of the "
        f"gradients. It must be a pytree of bools with the parameters' "
        f"structure (or a prefix of it). Mask structure: "
        f"{jax.tree.structure(shared)}; gradient structure: "
        f"{jax.tree.structure(task_grads)}.") from error
