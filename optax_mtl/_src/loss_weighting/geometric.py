"""Geometric loss strategy (GLS): the gradient of the geometric mean loss."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from optax_mtl._src import masking
from optax_mtl._src import transform
from optax_mtl._src.loss_weighting import _common


def scale_by_geometric_loss() -> optax.GradientTransformationExtraArgs:
  """Scales the tasks so that their sum is the gradient of the geometric mean.

  .. math::
     \\mathcal{L} = \\Big(\\prod_{t=1}^T L_t\\Big)^{1/T}, \\qquad
     \\nabla \\mathcal{L} = \\sum_t \\underbrace{\\frac{\\mathcal{L}}{T L_t}}_{w_t}
     \\nabla L_t

  The geometric mean is computed in log space, ``exp(mean_t log L_t)``, so
  it neither overflows nor underflows for many tasks.

  Returns:
    A stateless task scaling; ``update`` requires ``losses=``.

  Raises:
    TypeError: ``losses`` missing at update.
    ValueError: a loss is zero, negative or non-finite (outside ``jit``; under
      ``jit`` the losses are clamped to ``[1e-12, 1e30]``).

  Example:
    >>> import jax.numpy as jnp, optax, optax_mtl as mtl
    >>> tx = mtl.geometric_loss_weighting()
    >>> g = {"w": jnp.array([[1.0], [1.0]])}
    >>> tx.update(g, tx.init(None), losses=jnp.array([1.0, 4.0]))[0]["w"]
    Array([1.25], dtype=float32)

  References:
    Chennupati, Sistu, Yogamani, Rawashdeh, "MultiNet++: Multi-Stream Feature
    Aggregation and Geometric Loss Strategy for Multi-Task Learning", CVPR
    Workshops 2019.
  """
  method = "mtl.scale_by_geometric_loss"

  def weights_fn(inputs, state):
    log_losses = jnp.log(_common.positive_losses(inputs.losses, method))
    # w_t = exp(mean log L - log L_t) / T, formed as one exponent so that
    # neither the product nor L_t alone has to be representable.
    weights = jnp.exp(jnp.mean(log_losses) - log_losses) / inputs.num_tasks
    return weights, state

  return transform.task_scaling(method, weights_fn, needs_losses=True)


def geometric_loss_weighting(
    *, priorities: Any = None, shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """``scale_by_geometric_loss`` chained with ``sum()`` (or ``weighted``).

  Args:
    priorities: optional [T] task priorities multiplied on top.
    shared: ``shared=`` mask passed to the aggregator.

  Returns:
    An aggregator: the gradient of ``(prod_t L_t)^(1/T)``.
  """
  return _common.alias(scale_by_geometric_loss(), priorities, shared)
