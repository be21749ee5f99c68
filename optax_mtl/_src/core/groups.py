"""Per-group (per-layer) application of a weighting's rule.

A grouped aggregator reads one T x T Gramian (or [T] norms) per group of
shared leaves, all from the same statistics pass, runs its rule on each
group with that group's own state (``vmap`` over the groups), and combines
each group's leaves with that group's weights in the one combination pass.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_mtl._src.core import weighting as weighting_lib


class LayerwiseState(NamedTuple):
  """State of a method built with :func:`optax_mtl.layerwise`.

  Attributes:
    task_weights: [T] the groups' weights averaged with each group counted
      by its number of parameters, ``sum_k n_k W_k / sum_k n_k``: the weight
      an average parameter received (None without ``num_tasks``).
    group_weights: [K, T], row k the weights applied to group k's leaves
      (None without ``num_tasks``).
    group_states: dict of the method's own state fields (all but
      ``task_weights``, which ``group_weights`` holds), each with a leading
      axis K: one state per group. ``optax.tree.get(state, "targets")``
      finds GradVac's [K, T, T] targets there.
  """
  task_weights: jax.Array | None
  group_weights: jax.Array | None
  group_states: dict


def num_groups(leaf_groups: tuple) -> int:
  return max(leaf_groups) + 1


def group_masks(leaf_groups: tuple) -> list[tuple]:
  """One tuple of Python bools per group, selecting its leaves."""
  return [tuple(g == k for g in leaf_groups) for k in range(num_groups(leaf_groups))]


def initial_state(weighting: weighting_lib.Weighting, leaf_groups: tuple) -> LayerwiseState:
  """The method's initial state repeated over the K groups."""
  count = num_groups(leaf_groups)
  inner = weighting.initial_state()
  stack = lambda x: jnp.broadcast_to(x, (count,) + jnp.shape(x))
  weights = inner.task_weights
  group_weights = None if weights is None else stack(weights)
  return LayerwiseState(weights, group_weights,
                        jax.tree.map(stack, _fields(inner)))


def _fields(state) -> dict:
  """The fields of a method's state but ``task_weights``.

  Kept as a dict, so the one ``task_weights`` of a LayerwiseState is the
  one ``optax.tree.get`` finds.
  """
  return {k: v for k, v in state._asdict().items() if k != "task_weights"}


def check_state(state: Any, leaf_groups: tuple, name: str) -> None:
  if not isinstance(state, LayerwiseState):
    raise TypeError(
        f"{name}: the state passed to update is a {type(state).__name__}, not "
        f"a LayerwiseState. Pass the state returned by tx.init(params) (or by "
        f"the previous update).")
  leaves = jax.tree.leaves((state.group_weights, state.group_states))
  count = num_groups(leaf_groups)
  if leaves and leaves[0].shape[0] != count:
    raise ValueError(
        f"{name}: the state holds {leaves[0].shape[0]} groups but the "
        f"gradients have {count}; build the state with tx.init(params) for "
        f"these parameters.")


def apply(weighting: weighting_lib.Weighting, inputs: weighting_lib.TaskInputs,
          state: LayerwiseState, leaf_groups: tuple, leaf_sizes: list[int],
          scales: jax.Array | None) -> tuple[jax.Array, jax.Array, LayerwiseState]:
  """Runs the rule on every group.

  ``inputs.gramian`` and ``inputs.norms`` hold one entry per group (a
  leading axis K); ``scales`` are the factors of the task scalings before
  the method (the Gramian of group k's scaled gradients is ``D G_k D``).

  Returns:
    ``([K, T] group weights, [T] parameter-weighted mean weights, new state)``.
  """
  template = weighting.initial_state()._replace(task_weights=None)

  def one(gram, norms, fields):
    if scales is not None:
      gram = gram.scaled(scales) if gram is not None else None
      norms = jnp.abs(scales).astype(norms.dtype) * norms
    weights, new = weighting.apply(inputs._replace(gramian=gram, norms=norms),
                                   template._replace(**fields))
    return weights, _fields(new)

  group_weights, inner = jax.vmap(one)(inputs.gramian, inputs.norms, state.group_states)
  sizes = np.zeros(num_groups(leaf_groups))
  for k, size in zip(leaf_groups, leaf_sizes):
    if k >= 0:
      sizes[k] += size
  fractions = jnp.asarray(sizes / max(sizes.sum(), 1.0), group_weights.dtype)
  # An elementwise sum, not a matmul: T x K numbers.
  mean = jnp.sum(fractions[:, None] * group_weights, axis=0)
  if state.task_weights is None:
    return group_weights, mean, state._replace(group_states=inner)
  return group_weights, mean, LayerwiseState(
      mean.astype(state.task_weights.dtype),
      group_weights.astype(state.group_weights.dtype), inner)
