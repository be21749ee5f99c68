"""Real-time loss normalisation: task t scaled by 1 / L_t at every step."""

from __future__ import annotations

from typing import Any

import optax

from optax_mtl._src import masking
from optax_mtl._src import transform
from optax_mtl._src.loss_weighting import _common


def scale_by_realtime_loss() -> optax.GradientTransformationExtraArgs:
  """Scales each task by the reciprocal of its current loss.

  .. math::
     g_t \\leftarrow \\frac{g_t}{L_t}
     = \\nabla_\\theta \\frac{L_t}{\\operatorname{sg}(L_t)}
     = \\nabla_\\theta \\log L_t

  Every task's effective loss ``L_t / sg(L_t)`` equals 1, so the tasks enter
  with the same magnitude whatever their units; summed, this is the gradient
  of ``sum_t log L_t`` (scale invariant: multiplying a loss by a constant does
  not change the update).

  Returns:
    A stateless task scaling; ``update`` requires ``losses=``.

  Raises:
    TypeError: ``losses`` missing at update.
    ValueError: a loss is zero, negative or non-finite (outside ``jit``; under
      ``jit`` the losses are clamped to ``[1e-12, 1e30]``).

  Example:
    >>> import jax.numpy as jnp, optax, optax_mtl as mtl
    >>> tx = optax.chain(mtl.scale_by_realtime_loss(), mtl.sum())
    >>> g = {"w": jnp.array([[4.0], [1.0]])}
    >>> tx.update(g, tx.init(None), losses=jnp.array([4.0, 0.5]))[0]["w"]
    Array([3.], dtype=float32)

  References:
    Jianlin Su, "Multi-task learning notes (1): in the name of loss", 2022,
    https://spaces.ac.cn/archives/8896.
  """
  method = "mtl.scale_by_realtime_loss"

  def weights_fn(inputs, state):
    return 1.0 / _common.positive_losses(inputs.losses, method), state

  return transform.task_scaling(method, weights_fn, needs_losses=True)


def realtime_loss_weighting(
    *, priorities: Any = None, shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """``scale_by_realtime_loss`` chained with ``sum()`` (or ``weighted``).

  Args:
    priorities: optional [T] task priorities multiplied on top.
    shared: ``shared=`` mask passed to the aggregator.

  Returns:
    An aggregator: ``sum_t p_t g_t / L_t``.
  """
  return _common.alias(scale_by_realtime_loss(), priorities, shared)
