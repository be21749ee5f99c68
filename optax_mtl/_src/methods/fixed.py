"""Aggregators with fixed weights: ``sum``, ``mean`` and ``weighted``."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams
from optax_mtl._src.engine import masking

_EQUAL = frozenset({"permutation_equivariant", "homogeneous"})


def sum_(*, num_tasks: int | None = None, shared: masking.SharedMask = None
         ) -> optax.GradientTransformationExtraArgs:
  """Sums the task gradients: the gradient of ``sum_t L_t``.

  .. math::
     u = \\sum_{t=1}^T g_t

  Args:
    num_tasks: optional T; when given, the state keeps the weights (ones) in
      ``task_weights``.
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
  size = hyperparams.num_tasks(num_tasks, "mtl.sum", required=False)
  return transform.aggregator(
      weighting.constant("mtl.sum", lambda t: jnp.ones(t, jnp.float32), size,
                         _EQUAL),
      shared=shared)


def mean(*, num_tasks: int | None = None, shared: masking.SharedMask = None
         ) -> optax.GradientTransformationExtraArgs:
  """Averages the task gradients over the shared leaves; heads are summed.

  .. math::
     u^\\ell = \\frac{1}{T} \\sum_{t=1}^T g_t^\\ell \\ \\text{(shared)}, \\qquad
     u^\\ell = \\sum_t g_t^\\ell \\ \\text{(heads)}

  Args:
    num_tasks: optional T; when given, the state keeps the weights (1/T) in
      ``task_weights``.
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
  size = hyperparams.num_tasks(num_tasks, "mtl.mean", required=False)
  return transform.aggregator(
      weighting.constant("mtl.mean", lambda t: jnp.full(t, 1.0 / t, jnp.float32),
                         size, _EQUAL),
      shared=shared)


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
  vector = hyperparams.weight_vector(weights, "mtl.weighted", "weights")
  size = vector.shape[0]
  rule = weighting.Weighting(
      name="mtl.weighted", num_tasks=size, claims=frozenset({"homogeneous"}),
      tasks_argument="len(weights)",
      init=lambda t: weighting.WeightsState(vector),
      rule=lambda inputs, state: (vector, state))
  return transform.aggregator(rule, shared=shared)
