"""Real-time loss normalisation: task t scaled by 1 / L_t at every step."""

from __future__ import annotations

import optax

from optax_mtl._src.core import aliases
from optax_mtl._src.core import loss_inputs
from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams

_METHOD = "mtl.scale_by_realtime_loss"


def scale_by_realtime_loss(*, num_tasks: int | None = None
                           ) -> optax.GradientTransformationExtraArgs:
  """Scales each task by the reciprocal of its current loss.

  .. math::
     g_t \\leftarrow \\frac{g_t}{L_t}
     = \\nabla_\\theta \\frac{L_t}{\\operatorname{sg}(L_t)}
     = \\nabla_\\theta \\log L_t

  Every task's effective loss ``L_t / sg(L_t)`` equals 1, so the tasks enter
  with the same magnitude whatever their units; summed, this is the gradient
  of ``sum_t log L_t`` (scale invariant: multiplying a loss by a constant does
  not change the update).

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
    >>> tx = optax.chain(mtl.scale_by_realtime_loss(), mtl.sum())
    >>> g = {"w": jnp.array([[4.0], [1.0]])}
    >>> tx.update(g, tx.init(None), losses=jnp.array([4.0, 0.5]))[0]["w"]
    Array([3.], dtype=float32)

  References:
    Jianlin Su, "Multi-task learning notes (1): in the name of loss", 2022,
    https://spaces.ac.cn/archives/8896.
  """
  def rule(inputs, state):
    return 1.0 / loss_inputs.positive_losses(inputs.losses, _METHOD), state

  return transform.task_scaling(weighting.Weighting(
      name=_METHOD, rule=rule, reads={"losses"},
      num_tasks=hyperparams.num_tasks(num_tasks, _METHOD, required=False),
      claims={"permutation_equivariant", "homogeneous"}))


realtime_loss_weighting = aliases.alias(scale_by_realtime_loss,
                                        "realtime_loss_weighting")


def on_log_losses(method: transform.Method, *, num_tasks: int | None = None
                  ) -> optax.GradientTransformationExtraArgs:
  """Any method applied to the gradients of the log losses.

  .. math::
     \\nabla_\\theta \\log L_t = \\frac{g_t}{L_t}, \\qquad
     G^{\\log}_{ts} = \\frac{G_{ts}}{L_t L_s}

  ``on_log_losses(m)`` is ``mtl.chain(mtl.scale_by_realtime_loss(), m)``: the
  method sees the gradients of ``log L_t`` (their Gramian formed on the
  T x T matrix, still one pass over the gradients), so a loss measured in
  other units, or simply larger, no longer dominates the method's weights.
  ``on_log_losses(mtl.mgda())``, ``on_log_losses(mtl.cagrad())`` and
  ``on_log_losses(mtl.imtl_g())`` are the log-MGDA, log-CAGrad and log-IMTL
  baselines of the FAMO and FairGrad papers.

  Args:
    method: an aggregator or task scaling of this library (or an
      :func:`optax_mtl.chain` of them).
    num_tasks: optional T; when given, the scaling's state keeps the
      ``1 / L_t`` it applied in ``task_weights``.

  Returns:
    The chain; its state is ``(scaling state, method state)`` and ``update``
    requires ``losses=``.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.on_log_losses(mtl.mgda())
    >>> g = {"w": jnp.array([[2.0, 0.0], [0.0, 1.0]])}
    >>> tx.update(g, tx.init(None), losses=jnp.array([2.0, 1.0]))[0]["w"]
    Array([0.5, 0.5], dtype=float32)

  References:
    Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization",
    NeurIPS 2023 (log-loss baselines); Ban & Ji, "Fair Resource Allocation
    in Multi-Task Learning", ICML 2024.
  """
  return transform.chain(scale_by_realtime_loss(num_tasks=num_tasks), method)
