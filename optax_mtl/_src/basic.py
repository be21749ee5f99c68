"""Aggregators with fixed weights: ``sum``, ``mean`` and ``weighted``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_mtl._src import masking
from optax_mtl._src import transform
from optax_mtl._src import validation


def sum_(*, shared: masking.SharedMask = None) -> optax.GradientTransformationExtraArgs:
  """Sums the task gradients: the gradient of ``sum_t L_t``.

  .. math::
     u = \\sum_{t=1}^T g_t

  Args:
    shared: optional mask of shared leaves (pytree of bools or callable on
      params). Heads are summed too, so the mask changes nothing here; it is
      accepted so that every aggregator takes the same arguments.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_mtl as mtl
    >>> tx = optax.chain(mtl.sum(), optax.sgd(0.1))
    >>> params = {"w": jnp.zeros(2)}
    >>> task_grads = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
    >>> updates, _ = tx.update(task_grads, tx.init(params), params)
    >>> updates["w"]
    Array([-0.1, -0.2], dtype=float32)
  """
  return transform.aggregator(
      "mtl.sum", lambda inputs, state: (jnp.ones(inputs.num_tasks), state),
      shared=shared, uses_gramian=False)


def mean(*, shared: masking.SharedMask = None) -> optax.GradientTransformationExtraArgs:
  """Averages the task gradients over the shared leaves; heads are summed.

  .. math::
     u^\\ell = \\frac{1}{T} \\sum_{t=1}^T g_t^\\ell \\ \\text{(shared)}, \\qquad
     u^\\ell = \\sum_t g_t^\\ell \\ \\text{(heads)}

  Args:
    shared: optional mask of shared leaves (pytree of bools or callable on
      params); leaves marked False are task-specific and summed, so each head
      keeps its own task's full gradient.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, optax_mtl as mtl
    >>> tx = optax.chain(mtl.mean(), optax.adam(1e-3))
    >>> params = {"w": jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones((2, 3))}, state, params)
  """
  return transform.aggregator(
      "mtl.mean",
      lambda inputs, state: (jnp.full(inputs.num_tasks, 1.0 / inputs.num_tasks), state),
      shared=shared, uses_gramian=False)


def _check_weights(weights) -> jax.Array:
  shape = np.shape(weights)
  if len(shape) != 1 or shape[0] == 0:
    raise ValueError(
        f"mtl.weighted: weights must be a non-empty vector with one entry per "
        f"task, got shape {tuple(shape)}.")
  if not isinstance(weights, jax.core.Tracer):
    concrete = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(concrete)):
      raise ValueError(
          f"mtl.weighted: weights must be finite, got {concrete.tolist()}.")
  return jnp.asarray(weights, jnp.float32)


def weighted(weights, *, shared: masking.SharedMask = None
             ) -> optax.GradientTransformationExtraArgs:
  """Combines the task gradients with fixed weights (task priorities).

  .. math::
     u^\\ell = \\sum_t w_t\\, g_t^\\ell \\ \\text{(shared)}, \\qquad
     u^\\ell = \\sum_t g_t^\\ell \\ \\text{(heads)}

  This is the gradient of the weighted loss ``sum_t w_t L_t`` when every leaf
  is shared. Chained after a task scaling, it sets task priorities on top of
  an automatic balance ("additional weights can be added on top").

  Args:
    weights: [T] vector of per-task weights. It may be traced, so
      ``optax.inject_hyperparams(mtl.weighted)(weights=...)`` can change it
      during training.
    shared: optional mask of shared leaves (pytree of bools or callable on
      params); leaves marked False are summed over tasks without weights.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    ValueError: ``weights`` is not a vector, holds non-finite values, or (at
      update) its length is not the number of tasks.

  Example:
    >>> import jax.numpy as jnp, optax, optax_mtl as mtl
    >>> tx = mtl.weighted(jnp.array([1.0, 0.5]))
    >>> task_grads = {"w": jnp.array([[2.0], [2.0]])}
    >>> tx.update(task_grads, tx.init(None))[0]["w"]
    Array([3.], dtype=float32)
  """
  vector = _check_weights(weights)

  def weights_fn(inputs, state):
    validation.check_configured_tasks(inputs.num_tasks, vector.shape[0],
                                      "mtl.weighted", "len(weights)")
    return vector, state

  return transform.aggregator("mtl.weighted", weights_fn, shared=shared,
                              uses_gramian=False)
