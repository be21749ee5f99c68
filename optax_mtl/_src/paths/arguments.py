"""Argument handling shared by the gradient paths: argnums, has_aux, NNX modules.

Every path differentiates a loss function returning T task losses with
respect to some of its positional arguments, like ``jax.value_and_grad``.
Arguments may be pytrees of arrays or Flax NNX modules: a module is split
into its ``nnx.Param`` variables (differentiated, returned as an
``nnx.State``) and the rest (BatchNorm statistics, RNG counters), which the
loss function may update; those updates are written back once, as after one
forward pass.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax.numpy as jnp
from flax import nnx

from optax_mtl._src.paths import canonical_convolutions


def is_module(x) -> bool:
  return nnx.graph.is_graph_node(x)


def positions(argnums: int | Sequence[int], name: str) -> tuple[bool, tuple]:
  """``(single, positions)`` of ``argnums``, as ``jax.grad`` reads them."""
  single = isinstance(argnums, int)
  chosen = (argnums,) if single else tuple(argnums)
  if not chosen:
    raise ValueError(f"{name}: argnums must name at least one argument.")
  return single, chosen


def loss_vector(out: Any, has_aux: bool, name: str):
  """Checks a loss function's output: ``(losses [T], aux or None)``."""
  if has_aux:
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
      raise ValueError(
          f"{name}(has_aux=True): loss_fn must return a pair (losses, aux), "
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
        f"{name}: loss_fn must return a vector of shape (T,) with one loss "
        f"per task, got shape {losses.shape}.{hint}")
  if not jnp.issubdtype(losses.dtype, jnp.floating):
    raise ValueError(f"{name}: loss_fn returned losses of dtype "
                     f"{losses.dtype}; they must be floating point.")
  return losses, aux


class Call:
  """One call of a loss function, split into differentiated values and the rest.

  Attributes:
    values: tuple of the differentiated values (pytrees, or the ``nnx.Param``
      states of modules), in ``argnums`` order.
  """

  def __init__(self, args: tuple, argnums, chosen: tuple, name: str):
    for p in chosen:
      if not -len(args) <= p < len(args):
        raise ValueError(
            f"{name}: argnums={argnums} but the function was called with "
            f"{len(args)} positional arguments.")
    self._args = args
    self._positions = tuple(p % len(args) for p in chosen)
    self._graphdefs, self._rest = {}, {}
    values = []
    for i, arg in enumerate(args):
      if is_module(arg):
        if i in self._positions:
          self._graphdefs[i], params, self._rest[i] = nnx.split(arg, nnx.Param, ...)
          values.append(params)
        else:
          self._graphdefs[i], self._rest[i] = nnx.split(arg)
      elif i in self._positions:
        values.append(arg)
    self.values = tuple(values)

  def pure(self, loss_fn: Callable[..., Any], kwargs: dict, has_aux: bool,
           name: str) -> Callable[[tuple], Any]:
    """``values -> (losses, (aux, new_rest))``, a pure function to differentiate."""
    def fn(values):
      by_position = dict(zip(self._positions, values))
      call_args, merged = list(self._args), {}
      for i in range(len(self._args)):
        if i in self._graphdefs:
          states = ((by_position[i], self._rest[i]) if i in by_position
                    else (self._rest[i],))
          merged[i] = nnx.merge(self._graphdefs[i], *states, copy=True)
          call_args[i] = merged[i]
        elif i in by_position:
          call_args[i] = by_position[i]
      losses, aux = loss_vector(loss_fn(*call_args, **kwargs), has_aux, name)
      new_rest = {
          i: (nnx.split(m, nnx.Param, ...)[2] if i in by_position
              else nnx.split(m)[1])
          for i, m in merged.items()
      }
      return losses, (aux, new_rest)
    return canonical_convolutions.native(fn)

  def write_back(self, new_rest: dict) -> None:
    """Updates the modules' non-differentiated state in place, once."""
    for i, state in new_rest.items():
      nnx.update(self._args[i], state)
