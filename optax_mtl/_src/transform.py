"""Builders that turn small per-task weight rules into optax transformations.

Every method of the library is one of two shapes:

* an *aggregator* maps per-task gradients (leading task axis T) to one update
  with the parameters' shapes: ``update = sum_t w_t g_t`` over shared leaves,
  heads summed;
* a *task scaling* maps per-task gradients to per-task gradients, task t
  multiplied by ``w_t``.

Either way a method is a rule ``weights_fn(inputs, state) -> (w, state)`` on a
:class:`TaskInputs` (T, the Gramian, the losses, extra keyword arguments); the
builders here check the inputs, run the two engine passes (Gramian, then the
combination) and nothing else on the full gradients.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import optax

from optax_mtl._src import combine as combine_lib
from optax_mtl._src import gramian as gramian_lib
from optax_mtl._src import masking
from optax_mtl._src import validation


class TaskInputs(NamedTuple):
  """What a weight rule may read at one update.

  Attributes:
    num_tasks: T, a static Python int.
    gramian: the :class:`~optax_mtl.Gramian` over the shared leaves when the
      method asked for it, else None.
    losses: [T] float32 losses when given (required if the method said so),
      else None.
    extra: the other keyword arguments passed to ``update`` (e.g. ``kpis``).
  """
  num_tasks: int
  gramian: gramian_lib.Gramian | None
  losses: jax.Array | None
  extra: dict


WeightsFn = Callable[[TaskInputs, Any], tuple[jax.Array, Any]]


def _empty_init(params):
  del params
  return optax.EmptyState()


def _inputs(method, task_grads, params, losses, extra, shared, uses_gramian,
            needs_losses):
  expected = validation.expected_tasks(losses, method)
  num_tasks = validation.num_tasks(task_grads, method, expected)
  losses = validation.check_losses(losses, num_tasks, method,
                                   required=needs_losses)
  mask = masking.resolve_shared(shared, task_grads, params, method)
  gram = gramian_lib.gramian(task_grads, mask) if uses_gramian else None
  return TaskInputs(num_tasks, gram, losses, extra), mask


def aggregator(
    method: str,
    weights_fn: WeightsFn,
    init_fn: Callable[[Any], Any] = _empty_init,
    *,
    shared: masking.SharedMask = None,
    uses_gramian: bool = True,
    needs_losses: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Builds an aggregator from a weight rule.

  Args:
    method: public name, used in error messages.
    weights_fn: ``(TaskInputs, state) -> ([T] weights, new_state)``.
    init_fn: ``params -> state`` (a NamedTuple of arrays).
    shared: the ``shared=`` mask of the public factory.
    uses_gramian: whether ``weights_fn`` reads ``inputs.gramian``.
    needs_losses: whether ``update`` requires ``losses=``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose update maps per-task
    gradients to one update with the parameters' structure.
  """
  def update_fn(task_grads, state, params=None, *, losses=None, **extra):
    inputs, mask = _inputs(method, task_grads, params, losses, extra, shared,
                           uses_gramian, needs_losses)
    weights, state = weights_fn(inputs, state)
    return combine_lib.combine(weights, task_grads, mask), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def task_scaling(
    method: str,
    weights_fn: WeightsFn,
    init_fn: Callable[[Any], Any] = _empty_init,
    *,
    shared: masking.SharedMask = None,
    uses_gramian: bool = False,
    needs_losses: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Builds a task scaling (per-task gradients in, scaled per-task gradients out).

  Same arguments as :func:`aggregator`; ``shared`` only restricts which leaves
  enter the Gramian (e.g. the last shared layer for GradNorm): the scaling
  itself applies to every leaf.
  """
  def update_fn(task_grads, state, params=None, *, losses=None, **extra):
    inputs, _ = _inputs(method, task_grads, params, losses, extra, shared,
                        uses_gramian, needs_losses)
    scales, state = weights_fn(inputs, state)
    return combine_lib.scale_tasks(scales, task_grads), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
