"""Weights from a reference loss: the initial loss, or a prior loss."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_mtl._src import masking
from optax_mtl._src import transform
from optax_mtl._src import validation
from optax_mtl._src.loss_weighting import _common


class InitialLossState(NamedTuple):
  """State of :func:`scale_by_initial_loss`.

  Attributes:
    initial_losses: [T] reference losses L_t(0) (zeros until recorded).
    task_weights: [T] weights of the last update, 1 / L_t(0).
    count: int32 number of updates so far.
  """
  initial_losses: jax.Array
  task_weights: jax.Array
  count: jax.Array


def _reference_vector(values: Any, method: str, argument: str) -> jax.Array:
  shape = np.shape(values)
  if len(shape) != 1 or shape[0] == 0:
    raise ValueError(
        f"{method}: {argument} must be a non-empty vector with one entry per "
        f"task, got shape {tuple(shape)}.")
  vector = jnp.asarray(values, jnp.float32)
  return _common.positive_losses(vector, method, name=argument)


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
    if num_tasks is not None and _common.check_num_tasks(num_tasks, method) != given.shape[0]:
      raise ValueError(
          f"{method}: num_tasks={num_tasks} but initial_losses has "
          f"{given.shape[0]} entries; pass one or make them agree.")
    size = given.shape[0]
  elif num_tasks is None:
    raise ValueError(
        f"{method}: pass initial_losses=[L_1(0), ..., L_T(0)], or num_tasks=T "
        f"to record the losses of the first update.")
  else:
    size = _common.check_num_tasks(num_tasks, method)
    given = None

  def init_fn(params):
    del params
    reference = given if given is not None else jnp.zeros(size, jnp.float32)
    return InitialLossState(reference, 1.0 / jnp.maximum(reference, _common.LOSS_FLOOR),
                            jnp.zeros((), jnp.int32))

  def weights_fn(inputs, state):
    validation.check_configured_tasks(inputs.num_tasks, size, method)
    losses = _common.positive_losses(inputs.losses, method)
    if given is None:
      reference = jnp.where(state.count == 0, losses, state.initial_losses)
    else:
      reference = state.initial_losses
    weights = 1.0 / reference
    return weights, InitialLossState(reference, weights,
                                     state.count + jnp.ones((), jnp.int32))

  return transform.task_scaling(method, weights_fn, init_fn, needs_losses=True)


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
    A task scaling whose state is a :class:`PriorLossState`. ``losses`` are
    not read; the matrix of methods passes them anyway.

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
  size = reference.shape[0]

  def init_fn(params):
    del params
    return PriorLossState(1.0 / reference)

  def weights_fn(inputs, state):
    validation.check_configured_tasks(inputs.num_tasks, size, method,
                                      "len(prior_losses)")
    weights = 1.0 / reference
    return weights, PriorLossState(weights)

  return transform.task_scaling(method, weights_fn, init_fn, needs_losses=False)


def initial_loss_weighting(
    initial_losses: Any = None, *, num_tasks: int | None = None,
    priorities: Any = None, shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """``scale_by_initial_loss`` chained with ``sum()`` (or ``weighted``).

  Args:
    initial_losses: see :func:`scale_by_initial_loss`.
    num_tasks: see :func:`scale_by_initial_loss`.
    priorities: optional [T] task priorities multiplied on top of the
      weights (``weighted(priorities)`` replaces ``sum()``).
    shared: ``shared=`` mask passed to the aggregator.

  Returns:
    An aggregator: per-task gradients in, ``sum_t p_t g_t / L_t(0)`` out.
  """
  return _common.alias(scale_by_initial_loss(initial_losses, num_tasks=num_tasks),
                       priorities, shared)


def prior_loss_weighting(
    prior_losses: Any, *, priorities: Any = None,
    shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """``scale_by_prior_loss`` chained with ``sum()`` (or ``weighted``).

  Args:
    prior_losses: see :func:`scale_by_prior_loss`.
    priorities: optional [T] task priorities multiplied on top.
    shared: ``shared=`` mask passed to the aggregator.

  Returns:
    An aggregator: per-task gradients in, ``sum_t p_t g_t / L_t^prior`` out.
  """
  return _common.alias(scale_by_prior_loss(prior_losses), priorities, shared)
