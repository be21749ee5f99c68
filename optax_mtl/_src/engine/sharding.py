"""Output shardings for contractions under JAX's explicit sharding mode.

In explicit mode a contraction over a sharded axis is ambiguous and JAX asks
for an ``out_sharding``; in auto mode (and without a mesh) the compiler decides
and no argument may be given. These helpers return the keyword to pass.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec


def _explicit_sharding(leaf):
  sharding = getattr(jax.typeof(leaf), "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return None
  if not any(t == AxisType.Explicit for t in sharding.mesh.axis_types):
    return None
  return sharding


def replicated_out(leaf) -> dict:
  """``out_sharding`` keyword for a small replicated result (the Gramian)."""
  sharding = _explicit_sharding(leaf)
  if sharding is None:
    return {}
  return {"out_sharding": NamedSharding(sharding.mesh, PartitionSpec())}


def drop_task_axis_out(leaf) -> dict:
  """``out_sharding`` keyword for a contraction over the leading task axis.

  The result keeps the sharding of the parameter axes, so the update is laid
  out exactly like the parameter it applies to.
  """
  sharding = _explicit_sharding(leaf)
  if sharding is None:
    return {}
  spec = tuple(sharding.spec) + (None,) * (leaf.ndim - len(sharding.spec))
  return {"out_sharding": NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))}
