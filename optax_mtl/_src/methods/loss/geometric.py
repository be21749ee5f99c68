"""Geometric loss strategy (GLS): the gradient of the geometric mean loss."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from optax_mtl._src.core import aliases
from optax_mtl._src.core import loss_inputs
from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams

_METHOD = "mtl.scale_by_geometric_loss"


def scale_by_geometric_loss(*, num_tasks: int | None = None
                            ) -> optax.GradientTransformationExtraArgs:
  """Scales the tasks so that their sum is the gradient of the geometric mean.

  .. math::
     \\mathcal{L} = \\Big(\\prod_{t=1}^T L_t\\Big)^{1/T}, \\qquad
     \\nabla \\mathcal{L} = \\sum_t \\underbrace{\\frac{\\mathcal{L}}{T L_t}}_{w_t}
     \\nabla L_t

  The geometric mean is computed in log space, ``exp(mean_t log L_t)``, so
  it neither overflows nor underflows for many tasks.

  Args:
    num_tasks: optional T; when given, the state keeps the weights of the
      last update in ``task_weights``.

  Returns:
    A task scaling; ``update`` requires ``losses=``.

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
  def rule(inputs, state):
    log_losses = jnp.log(loss_inputs.positive_losses(inputs.losses, _METHOD))
    # w_t = exp(mean log L - log L_t) / T, formed as one exponent so that
    # neither the product nor L_t alone has to be representable.
    weights = jnp.exp(jnp.mean(log_losses) - log_losses) / inputs.num_tasks
    return weights, state

  return transform.task_scaling(weighting.Weighting(
      name=_METHOD, rule=rule, reads={"losses"},
      num_tasks=hyperparams.num_tasks(num_tasks, _METHOD, required=False),
      claims={"permutation_equivariant", "homogeneous"}))


geometric_loss_weighting = aliases.alias(scale_by_geometric_loss,
                                         "geometric_loss_weighting")
