"""Per-task gradients: one forward pass, T backward passes vmapped."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from optax_mtl._src import validation

_NAME = "mtl.value_and_jacobian"


def _is_module(x) -> bool:
  return nnx.graph.is_graph_node(x)


def _loss_vector(out, has_aux: bool):
  if has_aux:
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
      raise ValueError(
          f"{_NAME}(has_aux=True): loss_fn must return a pair (losses, aux), "
          f"got {type(out).__name__}.")
    losses, aux = out
  else:
    losses, aux = out, None
  if isinstance(losses, (tuple, list)):
    losses = jnp.stack([jnp.asarray(l) for l in losses])
  losses = jnp.asarray(losses)
  if losses.ndim != 1:
    hint = (" It returned a scalar: return one loss per task, e.g. "
            "jnp.stack([loss_a, loss_b]); for a scalar loss use jax.grad."
            if losses.ndim == 0 else "")
    raise ValueError(
        f"{_NAME}: loss_fn must return a vector of shape (T,) with one loss "
        f"per task, got shape {losses.shape}.{hint}")
  if not jnp.issubdtype(losses.dtype, jnp.floating):
    raise ValueError(f"{_NAME}: loss_fn returned losses of dtype "
                     f"{losses.dtype}; they must be floating point.")
  return losses, aux


def value_and_jacobian(
    loss_fn: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
) -> Callable[..., Any]:
  """Like ``jax.value_and_grad`` for a loss function returning T task losses.

  .. math::
     (L(\\theta), J) \\quad\\text{with}\\quad
     L \\in \\mathbb{R}^T,\\ J_t = \\nabla_\\theta L_t

  One forward pass builds the VJP; the T backward passes are ``jax.vmap``-ed
  over the rows of the identity, so the per-task gradients come out stacked:
  every leaf has shape ``(T, *param_shape)``, the layout every transformation
  of this library takes.

  Arguments at ``argnums`` may be pytrees of arrays or Flax NNX modules. For a
  module, the gradients are taken with respect to its ``nnx.Param`` variables
  and returned as an ``nnx.State`` (as ``nnx.grad`` does); its other state
  (BatchNorm statistics, Dropout RNG counters) is updated in place, once, as
  in a single forward pass. Modules passed at other positions are updated too.

  Args:
    loss_fn: function returning a [T] vector of per-task losses (a list or
      tuple of scalars is stacked), or ``(losses, aux)`` with ``has_aux``.
    argnums: which positional argument(s) to differentiate.
    has_aux: whether ``loss_fn`` returns ``(losses, aux)``.

  Returns:
    A function with ``loss_fn``'s arguments returning ``(losses, task_grads)``
    or ``((losses, aux), task_grads)``; ``task_grads`` is a tuple when
    ``argnums`` is a sequence.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> def losses_fn(w, x):
    ...   return jnp.stack([jnp.sum(w * x), jnp.sum(w ** 2)])
    >>> losses, task_grads = mtl.value_and_jacobian(losses_fn)(
    ...     jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0]))
    >>> task_grads
    Array([[3., 4.],
           [2., 4.]], dtype=float32)
  """
  single = isinstance(argnums, int)
  positions = (argnums,) if single else tuple(argnums)
  if not positions:
    raise ValueError(f"{_NAME}: argnums must name at least one argument.")

  @functools.wraps(loss_fn)
  def wrapped(*args, **kwargs):
    for p in positions:
      if not -len(args) <= p < len(args):
        raise ValueError(
            f"{_NAME}: argnums={argnums} but the function was called with "
            f"{len(args)} positional arguments.")
    diff_positions = tuple(p % len(args) for p in positions)
    graphdefs, diff, rest = {}, [], {}
    for i, arg in enumerate(args):
      if _is_module(arg):
        if i in diff_positions:
          graphdefs[i], params, rest[i] = nnx.split(arg, nnx.Param, ...)
          diff.append(params)
        else:
          graphdefs[i], rest[i] = nnx.split(arg)
      elif i in diff_positions:
        diff.append(arg)

    def pure(diff_values):
      values = dict(zip(diff_positions, diff_values))
      call_args, merged = list(args), {}
      for i in range(len(args)):
        if i in graphdefs:
          states = (values[i], rest[i]) if i in values else (rest[i],)
          merged[i] = nnx.merge(graphdefs[i], *states, copy=True)
          call_args[i] = merged[i]
        elif i in values:
          call_args[i] = values[i]
      losses, aux = _loss_vector(loss_fn(*call_args, **kwargs), has_aux)
      new_rest = {
          i: (nnx.split(m, nnx.Param, ...)[2] if i in values
              else nnx.split(m)[1])
          for i, m in merged.items()
      }
      return losses, (aux, new_rest)

    losses, vjp_fn, (aux, new_rest) = jax.vjp(pure, tuple(diff), has_aux=True)
    num_tasks = losses.shape[0]
    (grads,) = jax.vmap(vjp_fn)(jnp.eye(num_tasks, dtype=losses.dtype))
    for i, state in new_rest.items():
      nnx.update(args[i], state)
    validation.num_tasks(grads, _NAME)
    task_grads = grads[0] if single else tuple(grads)
    return ((losses, aux) if has_aux else losses), task_grads

  return wrapped
