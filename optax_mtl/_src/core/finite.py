"""The non-finite policy: a step with a NaN or inf input is skipped.

A NaN or inf in one task's gradient, or in a loss or KPI a method reads,
would otherwise reach the update (every weighted sum propagates it, ``0 *
inf`` included) and the method's state (EMAs, learned weights, counters),
where it stays for the rest of the run. Every method of the library follows
one policy, in the spirit of ``optax.apply_if_finite``:

* the update is zero on every leaf;
* the state is left as it was, except ``task_weights``, which records the
  weights applied: zeros, so a logged skip is visible;
* the next finite step continues as if the skipped one had not happened.

The test is made on what the step produces (the update and the new state)
and on the losses and KPIs the method reads, so it costs one reduction and
one select over the parameter-sized update and no pass over the per-task
gradients: a weighted sum propagates any NaN or inf
of its inputs, and a coordinate-wise aggregator marks a non-finite input
coordinate as NaN in its output (:func:`poison_unless_finite`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def all_finite(*trees: Any) -> jax.Array:
  """Scalar bool: every inexact leaf of ``trees`` is finite (None leaves skipped)."""
  checks = [jnp.all(jnp.isfinite(x)) for tree in trees for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not checks:
    return jnp.asarray(True)
  return jnp.all(jnp.stack(checks))


def poison_unless_finite(stack: jax.Array, reduced: jax.Array) -> jax.Array:
  """``reduced`` where every task's entry of ``stack`` is finite, else NaN.

  A coordinate-wise aggregator (a trimmed mean, a sign vote) may drop a
  non-finite entry as an outlier; the policy skips the step instead, and
  this makes the skip visible to the test on the update (in the same fused
  pass over ``stack``, a [T, ...] leaf reduced to ``reduced``).
  """
  ok = jnp.all(jnp.isfinite(stack), axis=0)
  return jnp.where(ok, reduced, jnp.asarray(jnp.nan, reduced.dtype))


def keep_if(ok: jax.Array, new: Any, old: Any) -> Any:
  """``new`` where ``ok``, else ``old``, leaf by leaf (same structures)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def zero_unless(ok: jax.Array, tree: Any) -> Any:
  """``tree`` where ``ok``, else zeros of the same shapes and dtypes."""
  return jax.tree.map(lambda x: jnp.where(ok, x, jnp.zeros_like(x)), tree)


def _is_state(x) -> bool:
  return "task_weights" in getattr(x, "_fields", ())


def guard_state(ok: jax.Array, new: Any, old: Any) -> Any:
  """The state after a possibly skipped step.

  Args:
    ok: scalar bool, whether the step is kept.
    new, old: the state after and before the step (one method's state or a
      chain's tuple of states).

  Returns:
    ``new`` when ``ok``; else ``old`` with every ``task_weights`` zeroed.
  """
  kept = keep_if(ok, new, old)

  def zero_weights(n, k):
    if not _is_state(k) or k.task_weights is None:
      return k
    return k._replace(task_weights=zero_unless(ok, n.task_weights))
  return jax.tree.map(zero_weights, new, kept, is_leaf=_is_state)
