"""Resolution of the ``shared=`` mask that separates shared leaves from heads.

Shared leaves receive gradients from several tasks and are combined by the
method; the other leaves are task-specific (heads) and are summed over the
task axis, which gives each head its own task's gradient.
"""

from __future__ import annotations

import collections.abc
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


def _key_of(entry):
  for attribute in ("key", "name", "idx"):
    if hasattr(entry, attribute):
      return getattr(entry, attribute)
  raise TypeError(f"unsupported pytree key {entry!r}")


def _lookup(mask, path, method: str):
  """Walks ``mask`` along a gradient leaf's key path until a bool is found.

  Walking keys rather than matching tree structures lets a plain dict mask
  (``{"trunk": True, "heads": False}``) select leaves of an ``nnx.State`` or
  any other container with the same keys.
  """
  node = mask
  for depth, entry in enumerate(path):
    if isinstance(node, (bool, np.bool_, np.ndarray, jax.Array)):
      break
    key = _key_of(entry)
    try:
      if isinstance(node, collections.abc.Mapping):
        node = node[key]
      elif isinstance(node, (list, tuple)) and isinstance(key, int):
        node = node[key]
      else:
        node = getattr(node, key)
    except (KeyError, IndexError, AttributeError, TypeError):
      raise ValueError(
          f"{method}: the shared= mask has no entry for gradient leaf "
          f"{jax.tree_util.keystr(path)} (missing at "
          f"{jax.tree_util.keystr(path[:depth + 1])}). The mask must be a "
          f"pytree of bools with the parameters' structure, or a prefix of "
          f"it such as {{'trunk': True, 'heads': False}}.") from None
  return _as_static_bool(node, method)


def resolve_shared(shared: SharedMask, task_grads: Any, params: Any,
                   method: str):
  """Returns a pytree of Python bools with the structure of ``task_grads``.

  Args:
    shared: None (every leaf shared), a pytree of bools that is a prefix of
      the gradients' structure (matched by keys, so a dict works for an
      ``nnx.State``), or a callable mapping ``params`` to one.
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
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _lookup(shared, path, method), task_grads)
