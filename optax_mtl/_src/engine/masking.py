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


_MASK_VALUES = (bool, np.bool_, np.ndarray, jax.Array)


def _walk(tree, path, method: str, argument: str, is_value, example: str):
  """Walks ``tree`` along a gradient leaf's key path until a value is found.

  Walking keys rather than matching tree structures lets a plain dict
  (``{"trunk": True, "heads": False}``) select leaves of an ``nnx.State`` or
  any other container with the same keys.
  """
  node = tree
  for depth, entry in enumerate(path):
    if is_value(node):
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
          f"{method}: {argument} has no entry for gradient leaf "
          f"{jax.tree_util.keystr(path)} (missing at "
          f"{jax.tree_util.keystr(path[:depth + 1])}). It must be a pytree "
          f"with the parameters' structure, or a prefix of it such as "
          f"{example}.") from None
  return node


def _lookup(mask, path, method: str):
  value = _walk(mask, path, method, "the shared= mask",
                lambda n: isinstance(n, _MASK_VALUES),
                "{'trunk': True, 'heads': False}")
  return _as_static_bool(value, method)


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


GroupSpec = Union[str, Any, Callable[[Any], Any]]
GROUPINGS = ("layer", "leaf")


def _is_label(node) -> bool:
  return isinstance(node, (str, int, np.integer)) and not isinstance(node, bool)


def _layer_of(path) -> tuple:
  """The key path of a leaf's layer: its parent, past any attribute keys.

  ``("Dense_0", "kernel")`` and ``("Dense_0", "bias")`` share the layer
  ``("Dense_0",)``; an ``nnx.State`` leaf ends in the variable's ``.value``
  attribute, which is skipped first.
  """
  path = list(path)
  while path and isinstance(path[-1], jax.tree_util.GetAttrKey):
    path.pop()
  return tuple(path[:-1])


def resolve_groups(groups: GroupSpec, shared: Any, tree: Any, params: Any,
                   method: str) -> tuple:
  """The group of every leaf: a tuple with one entry per leaf of ``tree``.

  Args:
    groups: ``"layer"`` (leaves with the same parent in the tree, such as a
      layer's kernel and bias, form one group), ``"leaf"`` (every leaf its
      own group), a pytree of labels (str or int) that is a prefix of the
      parameters' structure (leaves with equal labels form a group), or a
      callable mapping ``params`` to one.
    shared: the resolved ``shared=`` mask (Python bools, ``tree``'s
      structure); leaves marked False (heads) belong to no group.
    tree: the per-task gradients, or the parameters at ``init``.
    params: the parameters (needed by a callable).
    method: name of the calling transformation, for messages.

  Returns:
    Per leaf, in flattening order, the index of its group (groups numbered
    by their first leaf) or -1 for a head.

  Raises:
    ValueError: an unknown grouping, a label that is not a str or int, or no
      shared leaf at all.
  """
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  is_shared = jax.tree.leaves(shared)
  if isinstance(groups, str):
    if groups not in GROUPINGS:
      raise ValueError(f"{method}: groups={groups!r} is not a grouping; pass "
                       f"one of {GROUPINGS}, or a pytree of labels (str or "
                       f"int) with the parameters' structure.")
    labels = [_layer_of(p) if groups == "layer" else p for p in paths]
  else:
    if callable(groups):
      if params is None:
        raise ValueError(
            f"{method}: groups= is a callable on the parameters, but it was "
            f"called without params. Pass params to init and update, or "
            f"pass a pytree of labels as groups=.")
      groups = groups(params)
    labels = []
    for path in paths:
      label = _walk(groups, path, method, "groups=", _is_label,
                    "{'encoder': 'enc', 'decoder': 'dec'}")
      if not _is_label(label):
        raise ValueError(
            f"{method}: groups= gives gradient leaf "
            f"{jax.tree_util.keystr(path)} the label {label!r}; labels must "
            f"be str or int (leaves with equal labels form one group).")
      labels.append(("label", label))
  index = {}
  out = []
  for label, selected in zip(labels, is_shared):
    if not selected:
      out.append(-1)
      continue
    out.append(index.setdefault(label, len(index)))
  if not index:
    raise ValueError(f"{method}: no leaf is shared (shared= marks every leaf "
                     f"a head), so there is no group to weight.")
  return tuple(out)
