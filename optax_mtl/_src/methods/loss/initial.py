"""Weights from a reference loss: the initial loss, or a prior loss."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src.core import aliases
from optax_mtl._src.core import loss_inputs
from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams


class InitialLossState(NamedTuple):
  """State of :func:`scale_by_initial_loss`.

  Attributes:
    task_weights: [T] weights of the last update, 1 / L_t(0).
    initial_losses: [T] reference losses L_t(0) (zeros until recorded).
    count: int32 number of updates so far.
  """
  task_weights: jax.Array
  initial_losses: jax.Array
  count: jax.Array


def _reference_vector(values: Any, method: str, argument: str) -> jax.Array:
  vector = hyperparams.weight_vector(values, method, argument)
  return loss_inputs.positive_losses(vector, method, name=argument)


def scale_by_initial_loss(
    initial_losses: Any = None, *, num_tasks: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Scales each task by the reciprocal of its initial loss.

  .. math::
     g_t \\leftarrow \\frac{g_t}{L_t^{(0)}}

  so that ``sum_t L_t / L_t(0)`` starts at T and every task starts at the same
  scale. ``L_t(0)`` is either given (e.g. the estimates of
  :func:`optax_mtl.cross_entropy_initial_loss` or
  :func:`optax_mtl.l2_initial_loss`, or an average over a few batches) or
  recorded from the ``losses`` of the first update.

  Args:
    initial_losses: optional [T] vector of positive reference losses. When
      omitted, the losses of the first update are recorded in the state.
    num_tasks: T; required when ``initial_losses`` is omitted (the state holds
      one reference per task and ``init`` only sees the parameters).

  Returns:
    A task scaling (``optax.GradientTransformationExtraArgs``) whose state is
    an :class:`InitialLossState`; ``update`` requires ``losses=``.

  Raises:
    ValueError: neither or inconsistent ``initial_losses`` / ``num_tasks``;
      non-positive or non-finite reference or first losses (outside ``jit``;
      under ``jit`` they are clamped to a tiny positive floor).

  Example:
    >>> import jax.numpy as jnp, optax, optax_mtl as mtl
    >>> tx = optax.chain(mtl.scale_by_initial_loss(num_tasks=2), mtl.sum())
    >>> g = {"w": jnp.ones((2, 3))}
    >>> u, s = tx.update(g, tx.init(None), losses=jnp.array([2.0, 0.5]))
    >>> u["w"]
    Array([2.5, 2.5, 2.5], dtype=float32)

  References:
    Jianlin Su, "Multi-task learning notes (1): in the name of loss", 2022,
    https://spaces.ac.cn/archives/8896 (the 1 / initial-loss rule and the
    log K and E||y||^2 estimates).
  """
  method = "mtl.scale_by_initial_loss"
  if initial_losses is not None:
    given = _reference_vector(initial_losses, method, "initial_losses")
    if num_tasks is not None and hyperparams.num_tasks(num_tasks, method) != given.shape[0]:
      raise ValueError(
          f"{method}: num_tasks={num_tasks} but initial_losses has "
          f"{given.shape[0]} entries; pass one or make them agree.")
    size = given.shape[0]
  elif num_tasks is None:
    raise ValueError(
        f"{method}: pass initial_losses=[L_1(0), ..., L_T(0)], or num_tasks=T "
        f"to record the losses of the first update.")
  else:
    size = hyperparams.num_tasks(num_tasks, method)
    given = None

  def init(size):
    reference = given if given is not None else jnp.zeros(size, jnp.float32)
    return InitialLossState(1.0 / jnp.maximum(reference, loss_inputs.LOSS_FLOOR),
                            reference, jnp.zeros((), jnp.int32))

  def rule(inputs, state):
    losses = loss_inputs.positive_losses(inputs.losses, method)
    if given is None:
      reference = jnp.where(state.count == 0, losses, state.initial_losses)
    else:
      reference = state.initial_losses
    return 1.0 / reference, state._replace(
        initial_losses=reference, count=optax.safe_increment(state.count))

  claims = {"homogeneous"} | ({"permutation_equivariant"} if given is None else set())
  return transform.task_scaling(weighting.Weighting(
      name=method, rule=rule, init=init, reads={"losses"}, num_tasks=size,
      claims=claims))


class PriorLossState(NamedTuple):
  """State of :func:`scale_by_prior_loss`.

  Attributes:
    task_weights: [T] weights 1 / prior loss.
  """
  task_weights: jax.Array


def scale_by_prior_loss(prior_losses: Any) -> optax.GradientTransformationExtraArgs:
  """Scales each task by the reciprocal of its prior loss.

  .. math::
     g_t \\leftarrow \\frac{g_t}{L_t^{(\\mathrm{prior})}}

  The prior loss is the loss of a model that learned only the label
  distribution: the entropy ``-sum_k p_k log p_k`` of the class frequencies for
  cross-entropy (:func:`optax_mtl.cross_entropy_prior_loss`), the label
  variance ``E||y - mu||^2`` for an L2 loss (:func:`optax_mtl.l2_prior_loss`).
  It measures a task's difficulty better than the initial loss.

  Args:
    prior_losses: [T] vector of positive prior losses (may be traced, so it
      can be injected with ``optax.inject_hyperparams``).

  Returns:
    A task scaling whose state is a :class:`PriorLossState`; ``losses`` are
    not read.

  Raises:
    ValueError: ``prior_losses`` is not a vector of positive finite values
      (checked when concrete), or its length differs from T at update.

  Example:
    >>> import jax.numpy as jnp, optax, optax_mtl as mtl
    >>> prior = jnp.array([mtl.cross_entropy_prior_loss(frequencies=[0.5, 0.5]),
    ...                    mtl.l2_prior_loss(jnp.array([[1.0], [3.0]]))])
    >>> tx = mtl.prior_loss_weighting(prior)

  References:
    Jianlin Su, "Multi-task learning notes (1): in the name of loss", 2022,
    https://spaces.ac.cn/archives/8896 (the 1 / prior-loss rule).
  """
  method = "mtl.scale_by_prior_loss"
  reference = _reference_vector(prior_losses, method, "prior_losses")

  def rule(inputs, state):
    return 1.0 / reference, state

  return transform.task_scaling(weighting.Weighting(
      name=method, rule=rule, num_tasks=reference.shape[0],
      init=lambda size: PriorLossState(1.0 / reference),
      tasks_argument="len(prior_losses)", claims={"homogeneous"}))


initial_loss_weighting = aliases.alias(scale_by_initial_loss,
                                       "initial_loss_weighting", "num_tasks=2")
prior_loss_weighting = aliases.alias(scale_by_prior_loss, "prior_loss_weighting",
                                     "[2.3, 0.7]")
