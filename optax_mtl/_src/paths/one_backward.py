"""The one-backward path: loss-based weights, then a single weighted VJP.

A method whose weights depend only on the losses (and its state) makes the
update ``sum_t w_t g_t``, the gradient of ``sum_t sg(w_t) L_t``: one VJP of
the loss vector with the weights as cotangent, instead of T backward passes.
The weights are the method's own rule, read from its weighting, and the state
update is exactly the one of the stacked path.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src.core import transform
from optax_mtl._src.engine import validation
from optax_mtl._src.paths import arguments

_NAME = "mtl.loss_weights"


def _vector(losses, name):
  vector = validation.losses_vector(losses, name)
  if vector is None:
    raise TypeError(f"{name} needs the per-task losses: pass a vector of "
                    f"shape (T,).")
  return vector


def loss_weights(
    weighting: optax.GradientTransformationExtraArgs, state: Any, losses: Any,
    **extra: Any,
) -> tuple[jax.Array, Any]:
  """Returns the per-task weights of a loss-based method and its new state.

  .. math::
     \\nabla_\\theta \\sum_t \\operatorname{sg}(w_t) L_t = \\sum_t w_t g_t

  Args:
    weighting: a loss-based task scaling (``scale_by_uncertainty()``,
      ``scale_by_dwa()``...), an alias (``dwa()``, priorities included), or
      an ``mtl.chain`` of them, built without ``shared=`` and with no
      optimizer after it. Methods that read gradient statistics (the
      Gramian methods, GradNorm, gradient normalisation) are refused: they
      need the stacked path.
    state: the weighting's state (``weighting.init(params)``).
    losses: [T] task losses (treated as constants).
    **extra: other keyword arguments of the weighting's ``update`` (``kpis``,
      ``previous_batch_losses``...).

  Returns:
    ``(weights, new_state)``: [T] float32 weights and the state that
    ``weighting.update`` would have returned. When a loss (or a KPI the
    method reads) is NaN or inf, the weights are zero and the state is the
    old one; the gradient of such a loss is the caller's to reject (e.g.
    with ``optax.apply_if_finite``), since it never passes through here.

  Raises:
    TypeError: ``weighting`` is not a method of this library.
    ValueError: ``losses`` is not a vector, or the method reads gradient
      statistics or has a ``shared=`` mask.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.scale_by_realtime_loss()
    >>> w, _ = mtl.loss_weights(tx, tx.init(None), jnp.array([2.0, 4.0]))
    >>> w
    Array([0.5 , 0.25], dtype=float32)
  """
  vector = jax.lax.stop_gradient(_vector(losses, _NAME))
  weights, new_state = transform.weights_from_losses(weighting, state, vector,
                                                     extra, _NAME)
  weights, new_state = transform.skip_if_not_finite(
      weighting, weights, state, new_state, vector, extra, _NAME)
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
  vector = _vector(losses, "mtl.weighted_loss")
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
      ``(losses, aux)`` with ``has_aux``. The arguments at ``argnums`` may be
      pytrees of arrays or Flax NNX modules (gradients w.r.t. their
      ``nnx.Param``, returned as an ``nnx.State``; their other state advances
      once).
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
  name = "mtl.value_and_weighted_grad"
  single, chosen = arguments.positions(argnums, name)

  @functools.wraps(loss_fn)
  def wrapped(weighting_state, *args, weighting_args=None, **kwargs):
    call = arguments.Call(args, argnums, chosen, name + " (after the weighting state)")
    losses, vjp_fn, (aux, new_rest) = jax.vjp(
        call.pure(loss_fn, kwargs, has_aux, name), call.values, has_aux=True)
    weights, new_state = loss_weights(weighting, weighting_state, losses,
                                      **(weighting_args or {}))
    (grads,) = vjp_fn(weights.astype(losses.dtype))
    grads, new_state = transform.skip_if_not_finite(
        weighting, grads, weighting_state, new_state, losses,
        dict(weighting_args or {}), name)
    call.write_back(new_rest)
    value = (losses, aux) if has_aux else losses
    return value, (grads[0] if single else tuple(grads)), new_state

  return wrapped
