"""GradDrop: keep one sign per coordinate, chosen by the gradients' sign purity."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams
from optax_mtl._src.engine import masking

_METHOD = "mtl.graddrop"


class GradDropState(NamedTuple):
  """State of :func:`graddrop`.

  Attributes:
    task_weights: [T] factors applied to each task before the sign dropping
      (ones; a task scaling chained before contributes its own), None
      without ``num_tasks``.
    key: uint32 raw PRNG key data (``jax.random.key_data``), advanced at
      every update; the masks of an update are drawn from the key it leaves
      in the state.
  """
  task_weights: jax.Array
  key: jax.Array


def _mask_key(key_data: jax.Array, index) -> jax.Array:
  """The key of one leaf's uniforms, from the key an update left in the state.

  The next update advances the state with ``split(key)[0]``; the masks use
  the other half, so no key is consumed twice (``fold_in(k, i)`` would equal
  ``split(k)[i]`` with partitionable threefry).
  """
  root = jax.random.split(jax.random.wrap_key_data(key_data))[1]
  return jax.random.fold_in(root, index)


# Compiled once per leaf shape, so eager updates run one fused program per leaf.
@jax.jit
def drop_signs(stack: jax.Array, key_data: jax.Array, index, leak) -> jax.Array:
  """GradDrop's combination of one leaf.

  Args:
    stack: [T, ...] task gradients of the leaf (float32 or float64).
    key_data: raw key data of the update (the state's ``key``).
    index: the leaf's position in the tree (an int).
    leak: [T] leak factors in [0, 1].

  Returns:
    The leaf's update, ``sum_t leak_t g_t + (1 - leak_t) M_t g_t``.
  """
  slices = list(stack)
  positive = sum(jnp.maximum(s, 0) for s in slices)
  negative = sum(jnp.maximum(-s, 0) for s in slices)
  uniform = jax.random.uniform(_mask_key(key_data, index), stack.shape[1:],
                               jnp.float32).astype(stack.dtype)
  # U < P with P = pos / (pos + neg), written without the division: no NaN
  # when both sums vanish (every M_t g_t is then 0, whatever side is kept)
  # or overflow.
  keep_positive = uniform * negative < (1 - uniform) * positive
  leak = leak.astype(stack.dtype)
  update = jnp.zeros(stack.shape[1:], stack.dtype)
  for t, s in enumerate(slices):
    kept = jnp.where(keep_positive, jnp.maximum(s, 0), jnp.minimum(s, 0))
    update = update + leak[t] * s + (1 - leak[t]) * kept
  return update


def _leak(leak: Any, num_tasks: int | None):
  """``(leak array, T or None, tasks_argument)`` after validation."""
  if isinstance(leak, bool) or np.ndim(leak) > 1:
    raise ValueError(f"{_METHOD}: leak must be a number in [0, 1] or a vector "
                     f"with one value in [0, 1] per task, got {leak!r}.")
  hyperparams.in_range(leak, _METHOD, "leak", 0.0, 1.0)
  size = hyperparams.num_tasks(num_tasks, _METHOD, required=False)
  if np.ndim(leak) == 0:
    return jnp.asarray(leak, jnp.float32), size, "num_tasks"
  vector = hyperparams.weight_vector(leak, _METHOD, "leak")
  if size is not None and size != vector.shape[0]:
    raise ValueError(f"{_METHOD}: num_tasks={size} but leak has "
                     f"{vector.shape[0]} entries; pass one leak per task, a "
                     f"single number, or omit num_tasks.")
  return vector, vector.shape[0], "len(leak)"


def graddrop(
    leak: Any = 0.0,
    seed: int = 0,
    *,
    num_tasks: int | None = None,
    shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """GradDrop: per coordinate, drops the task gradients of one sign.

  For every coordinate ``k`` of the shared parameters, the sign purity of the
  task gradients and a uniform draw decide which sign survives:

  .. math::
     P_k = \\frac12 \\Big(1 + \\frac{\\sum_t g_{tk}}{\\sum_t |g_{tk}|}\\Big),
     \\qquad U_k \\sim \\mathcal U(0, 1),

  .. math::
     M_{tk} = [U_k < P_k]\\,[g_{tk} > 0] + [U_k \\ge P_k]\\,[g_{tk} < 0],
     \\qquad u_k = \\sum_t \\ell_t\\, g_{tk} + (1 - \\ell_t)\\, M_{tk}\\, g_{tk} .

  A coordinate whose gradients mostly agree in sign keeps that sign with
  high probability; when they all agree (``P`` is 0 or 1) the update is
  their sum. ``P = 1/2`` where every gradient is 0 (the update is then 0
  whatever side is kept). The leak ``l_t`` passes back a fraction of what
  task t had dropped: ``leak=1`` is the sum of the task gradients. Heads
  (``shared=``) are summed. Fresh uniforms are drawn at every update from
  the key in the state (one key per leaf, folded in by the leaf's index), so
  a seed fixes every update bit for bit and ``jit`` gives the eager result.

  The update is not a weighted sum: it is computed in the combination pass
  and reads no Gramian, so it needs the stacked path (every task's full
  gradient, ``mtl.value_and_jacobian``). The paper drops signs of the
  gradients at a chosen activation layer; here they are dropped on the
  gradients of the shared parameters.

  Args:
    leak: ``l`` in [0, 1], one number or one value per task (which fixes T).
      May be traced (``optax.inject_hyperparams``).
    seed: integer seed of the PRNG key kept in the state.
    num_tasks: optional T; when given, the state keeps ``task_weights``.
    shared: optional mask of shared leaves (pytree of bools or callable on
      params); other leaves are task-specific heads, summed over tasks.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` aggregator whose state is a
    :class:`GradDropState`.

  Raises:
    TypeError: ``seed`` is not an integer.
    ValueError: ``leak`` outside [0, 1], not a scalar or vector, or of a
      length other than ``num_tasks``.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.graddrop()
    >>> task_grads = {"w": jnp.array([[1.0, -2.0], [3.0, -1.0]])}
    >>> tx.update(task_grads, tx.init(None))[0]["w"]
    Array([ 4., -3.], dtype=float32)

  References:
    Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just Pick a
    Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout",
    NeurIPS 2020 (Algorithm 1).
  """
  leak_values, size, argument = _leak(leak, num_tasks)
  hyperparams.seed(seed, _METHOD)

  def init(num):
    return GradDropState(weighting.initial_weights(num),
                         jax.random.key_data(jax.random.key(seed)))

  def rule(inputs, state):
    key = jax.random.split(jax.random.wrap_key_data(state.key))[0]
    return (jnp.ones((inputs.num_tasks,), jnp.float32),
            state._replace(key=jax.random.key_data(key)))

  def per_coordinate(leaf, state, index):
    factors = jnp.broadcast_to(leak_values, (leaf.shape[0],))
    return drop_signs(leaf, state.key, index, factors)

  claims = {"homogeneous"}
  if np.ndim(leak) == 0:
    # P, U and the masks are symmetric in the tasks when they share one leak.
    claims.add("permutation_equivariant")
  return transform.aggregator(weighting.Weighting(
      name=_METHOD, rule=rule, init=init, num_tasks=size,
      tasks_argument=argument, claims=claims,
      per_coordinate=per_coordinate), shared=shared)
