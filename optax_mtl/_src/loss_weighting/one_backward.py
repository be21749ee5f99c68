"""The one-backward path: loss-based weights, then a single weighted VJP.

A loss-based weighting multiplies task t's gradient by a weight that depends
only on the losses (and its state), so ``sum_t w_t g_t`` is the gradient of
``sum_t sg(w_t) L_t``: one VJP of the loss vector with the weights as
cotangent, instead of T backward passes. The weight rule is not written twice:
the weighting's own ``update`` is called on the identity matrix as "per-task
gradients" (one leaf of shape [T, T]). A scaling returns ``diag(w)``; a
scaling chained with ``sum()`` or ``weighted(p)`` returns ``p * w``; either
way the state update is exactly the one of the stacked path.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src import jacobian
from optax_mtl._src import validation

_NAME = "mtl.loss_weights"


def loss_weights(
    weighting: optax.GradientTransformationExtraArgs, state: Any, losses: Any,
    **extra: Any,
) -> tuple[jax.Array, Any]:
  """Returns the per-task weights of a loss-based weighting and its new state.

  .. math::
     (w, s') = \\text{weighting.update}(I_T, s, \\text{losses}=L, \\dots),
     \\qquad \\nabla_\\theta \\sum_t w_t L_t = \\sum_t w_t g_t

  Args:
    weighting: a loss-based task scaling (``scale_by_uncertainty()``,
      ``scale_by_dwa()``...), or one chained with ``sum()`` / ``weighted(p)``
      (the aliases, priorities included), built without ``shared=`` and with
      no optimizer after it (an optimizer would transform the weights).
      Methods that read the gradients themselves (Gramian-based aggregators, GradNorm,
      gradient normalisation) give meaningless weights here: use the stacked
      path for them.
    state: the weighting's state (``weighting.init(params)``).
    losses: [T] task losses (treated as constants).
    **extra: other keyword arguments of the weighting's ``update`` (``kpis``,
      ``previous_batch_losses``...).

  Returns:
    ``(weights, new_state)``: [T] float32 weights and the state the stacked
    ``weighting.update`` would have returned.

  Raises:
    ValueError: ``losses`` is not a vector, or the weighting does not map
      per-task gradients to per-task gradients or to one update.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.scale_by_realtime_loss()
    >>> w, _ = mtl.loss_weights(tx, tx.init(None), jnp.array([2.0, 4.0]))
    >>> w
    Array([0.5 , 0.25], dtype=float32)
  """
  vector = validation.losses_vector(losses, _NAME)
  if vector is None:
    raise TypeError(f"{_NAME} needs the per-task losses: pass a vector of "
                    f"shape (T,).")
  vector = jax.lax.stop_gradient(vector)
  num_tasks = vector.shape[0]
  probe = jnp.eye(num_tasks, dtype=jnp.float32)
  out, new_state = weighting.update(probe, state, None, losses=vector, **extra)
  shape = getattr(out, "shape", None)
  if shape == (num_tasks, num_tasks):
    weights = jnp.diagonal(out)
  elif shape == (num_tasks,):
    weights = out
  else:
    raise ValueError(
        f"{_NAME}: the weighting must be a loss-based task scaling, or one "
        f"chained with mtl.sum() / mtl.weighted(...), and nothing else (no "
        f"optimizer after it); probed with [T, T] per-task gradients it "
        f"returned {type(out).__name__} of shape {shape}.")
  return jax.lax.stop_gradient(weights.astype(jnp.float32)), new_state


def weighted_loss(
    weighting: optax.GradientTransformationExtraArgs, state: Any, losses: Any,
    **extra: Any,
) -> tuple[jax.Array, tuple[jax.Array, Any]]:
  """The scalar ``sum_t sg(w_t) L_t`` to differentiate once, inside a loss.

  For frameworks that differentiate a scalar loss (``jax.value_and_grad``,
  ``nnx.value_and_grad``): call it at the end of the loss function and return
  ``(loss, aux)`` with ``has_aux=True``. The weights are computed from
  ``stop_gradient(losses)``, so the gradient is ``sum_t w_t g_t`` and one
  backward pass runs.

  Args:
    weighting: see :func:`loss_weights`.
    state: the weighting's state.
    losses: [T] task losses (differentiable).
    **extra: other keyword arguments of the weighting's ``update``.

  Returns:
    ``(loss, (weights, new_state))``.

  Example:
    >>> import jax, jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.scale_by_realtime_loss()
    >>> def loss_fn(w, state):
    ...   losses = jnp.stack([jnp.sum(w ** 2), jnp.sum(w)])
    ...   return mtl.weighted_loss(tx, state, losses)
    >>> (loss, (weights, state)), grad = jax.value_and_grad(
    ...     loss_fn, has_aux=True)(jnp.array([1.0, 2.0]), tx.init(None))
  """
  vector = validation.losses_vector(losses, _NAME)
  if vector is None:
    raise TypeError(f"{_NAME} needs the per-task losses: pass a vector of "
                    f"shape (T,).")
  weights, new_state = loss_weights(weighting, state, vector, **extra)
  loss = jnp.sum(weights.astype(vector.dtype) * vector)
  return loss, (weights, new_state)


def value_and_weighted_grad(
    loss_fn: Callable[..., Any],
    weighting: optax.GradientTransformationExtraArgs,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
) -> Callable[..., Any]:
  """Like ``jax.value_and_grad`` for ``sum_t w_t L_t`` with loss-based weights.

  .. math::
     L, \\mathrm{vjp} = \\operatorname{vjp}(\\theta \\mapsto L(\\theta)), \\quad
     (w, s') = \\text{loss\\_weights}(s, L), \\quad
     \\nabla = \\mathrm{vjp}(w) = \\sum_t w_t \\nabla L_t

  One forward pass and one backward pass whatever T: the same parameter
  update as ``value_and_jacobian`` + ``weighting`` (all leaves shared) at the
  cost of plain summed-loss training, with the same state updates.

  Args:
    loss_fn: function returning a [T] vector of task losses, or
      ``(losses, aux)`` with ``has_aux``. The arguments at ``argnums`` must be
      pytrees of arrays; for Flax NNX modules use :func:`weighted_loss` inside
      ``nnx.value_and_grad``.
    weighting: see :func:`loss_weights`.
    argnums: which positional argument(s) of ``loss_fn`` to differentiate.
    has_aux: whether ``loss_fn`` returns ``(losses, aux)``.

  Returns:
    A function ``(weighting_state, *args, weighting_args=None, **kwargs) ->
    (value, grads, new_weighting_state)`` where ``value`` is ``losses`` or
    ``(losses, aux)``, ``grads`` has the structure of the differentiated
    argument(s) (a tuple for a sequence ``argnums``), and ``weighting_args``
    is a dict of extra keywords for the weighting (e.g. ``{"kpis": k}``).

  Example:
    >>> import jax.numpy as jnp, optax, optax_mtl as mtl
    >>> weighting = mtl.scale_by_uncertainty(num_tasks=2)
    >>> def loss_fn(params, x):
    ...   return jnp.stack([jnp.sum((params["w"] * x) ** 2), jnp.sum(params["w"])])
    >>> params = {"w": jnp.ones(3)}
    >>> step = mtl.value_and_weighted_grad(loss_fn, weighting)
    >>> losses, grads, w_state = step(weighting.init(params), params, jnp.ones(3))
  """
  single = isinstance(argnums, int)
  positions = (argnums,) if single else tuple(argnums)
  if not positions:
    raise ValueError("mtl.value_and_weighted_grad: argnums must name at least "
                     "one argument.")

  @functools.wraps(loss_fn)
  def wrapped(weighting_state, *args, weighting_args=None, **kwargs):
    for p in positions:
      if not -len(args) <= p < len(args):
        raise ValueError(
            f"mtl.value_and_weighted_grad: argnums={argnums} but the function "
            f"was called with {len(args)} positional arguments (after the "
            f"weighting state).")
    diff_positions = tuple(p % len(args) for p in positions)
    for p in diff_positions:
      if jacobian._is_module(args[p]):  # pylint: disable=protected-access
        raise TypeError(
            f"mtl.value_and_weighted_grad differentiates pytrees of arrays; "
            f"argument {p} is a Flax NNX module. Call mtl.weighted_loss(...) "
            f"at the end of the loss function and differentiate it with "
            f"nnx.value_and_grad(..., has_aux=True): it is the same single "
            f"backward pass.")

    def pure(*diff_values):
      call_args = list(args)
      for p, value in zip(diff_positions, diff_values):
        call_args[p] = value
      # The jacobian module's checks give the same messages for bad losses.
      return jacobian._loss_vector(loss_fn(*call_args, **kwargs), has_aux)  # pylint: disable=protected-access

    losses, vjp_fn, aux = jax.vjp(pure, *(args[p] for p in diff_positions),
                                  has_aux=True)
    weights, new_state = loss_weights(weighting, weighting_state, losses,
                                      **(weighting_args or {}))
    grads = vjp_fn(weights.astype(losses.dtype))
    value = (losses, aux) if has_aux else losses
    return value, (grads[0] if single else grads), new_state

  return wrapped
