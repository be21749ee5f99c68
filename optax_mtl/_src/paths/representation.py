"""The representation path: per-task gradients of the shared features only.

A model split into a shared encoder ``z = f(theta_e, x)`` and task heads
``L = h(theta_h, z)`` is balanced on the gradients of the losses with respect
to the features ``z`` (T small [batch, features] arrays) instead of the
encoder's parameters: one forward pass, T backward passes through the heads
alone (vmapped), the method's weights from the features' Gramian, and one
weighted backward pass through the encoder. Its cost is close to that of a
plain summed loss whatever T is.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from optax_mtl._src.core import transform
from optax_mtl._src.engine import combine as combine_lib
from optax_mtl._src.engine import statistics
from optax_mtl._src.paths import arguments
from optax_mtl._src.paths import canonical_convolutions

_NAME = "mtl.value_and_representation_grad"
_CALL = "step(method_state, encoder, heads, x, *head_args, method_args=None)"


def _check_method(method) -> str | None:
  """Refuses what this path cannot run; returns the statistics it must compute.

  Returns:
    ``"gramian"``, ``"norms"`` or None: the most any member reads.
  """
  kinds = set()
  for member in transform.method_members(method, _NAME):
    if member.kind == transform.AGGREGATOR and member.mask is not None:
      raise ValueError(
          f"{_NAME}: {member.weighting.name} was built with shared=. On the "
          f"representation path the encoder/heads split replaces the mask: "
          f"the encoder's parameters are the shared ones (they receive "
          f"sum_t w_t dL_t/dtheta_e) and the heads' parameters the "
          f"task-specific ones. Build it without shared=.")
    if member.weighting.statistics is not None:
      kinds.add(member.weighting.statistics)
  if "gramian" in kinds or method.diagnostics:
    return "gramian"
  return "norms" if kinds else None


def _check_state(state, method):
  expected = type(method.init(None))
  if not isinstance(state, expected):
    raise TypeError(
        f"{_NAME}: the first argument of the step must be the method's state "
        f"(method.init(params), or the state the previous step returned), got "
        f"{type(state).__name__}. Call it as {_CALL}.")


def _check_features(features):
  leaves = jax.tree_util.tree_flatten_with_path(features)[0]
  if not leaves:
    raise ValueError(f"{_NAME}: encoder_fn returned no arrays; it must return "
                     f"the features (an array or a pytree of arrays).")
  for path, leaf in leaves:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
      where = jax.tree_util.keystr(path) or "<root>"
      raise ValueError(
          f"{_NAME}: feature {where} returned by encoder_fn has dtype "
          f"{dtype}; the features are differentiated, so every leaf must be "
          f"a floating-point array. Pass integer or boolean side inputs to "
          f"the heads through *head_args instead.")


class _Encoder:
  """One forward pass of the encoder, its parameters split out when a module."""

  def __init__(self, encoder, x, encoder_fn):
    self._fn, self._x = encoder_fn, x
    self._module = encoder if arguments.is_module(encoder) else None
    if self._module is not None:
      self._graphdef, self.values, self._rest = nnx.split(encoder, nnx.Param, ...)
    else:
      self.values = encoder

  def pure(self, values):
    """``values -> (features, new_rest)``."""
    if self._module is None:
      return self._fn(values, self._x), None
    module = nnx.merge(self._graphdef, values, self._rest, copy=True)
    features = self._fn(module, self._x)
    return features, nnx.split(module, nnx.Param, ...)[2]

  def write_back(self, new_rest):
    if self._module is not None:
      nnx.update(self._module, new_rest)


def value_and_representation_grad(
    encoder_fn: Callable[[Any, Any], Any],
    heads_fn: Callable[..., Any],
    method: transform.Method,
    has_aux: bool = False,
) -> Callable[..., Any]:
  """Balances the tasks on the gradients of the shared features (MGDA-UB).

  With the features ``z = f(theta_e, x)``, the losses ``L = h(theta_h, z)``
  and ``J_t = dL_t/dz`` (the gradients with respect to the features only):

  .. math::
     G_{ts} = \\langle J_t, J_s \\rangle, \\quad
     (w, d, s') = \\text{method}(G, L, s), \\quad
     \\nabla_{\\theta_e} = \\Big(\\frac{\\partial z}{\\partial \\theta_e}\\Big)^{\\!\\top}
       \\sum_t w_t J_t, \\quad
     \\nabla_{\\theta_h} = \\sum_t d_t \\frac{\\partial L_t}{\\partial \\theta_h}

  One forward pass (the encoder's VJP is kept), T backward passes through the
  heads alone (``jax.vmap`` over the rows of the identity), the method's rule
  on the Gramian of the feature gradients (summed over every feature leaf,
  batch axis included), and one backward pass through the encoder with the
  cotangent ``sum_t w_t J_t``. The heads get their own task's gradient, times
  ``d_t`` when task scalings come first (ones otherwise), as the heads of the
  stacked path with ``shared=`` the encoder. Since
  ``||sum_t w_t J_t||`` bounds the encoder's update up to the norm of
  ``dz/dtheta_e``, this is the upper-bound of Sener & Koltun (MGDA-UB) for
  ``mtl.mgda()``; any method of the library runs on it. Methods that read no
  gradient statistics (``mtl.mean()``, loss-based weightings) skip the T
  backward passes: two weighted VJPs of the heads give the same result.

  Encoder and heads may be pytrees of parameters or Flax NNX modules. For a
  module the gradients are taken with respect to its ``nnx.Param`` variables
  and returned as an ``nnx.State`` (as ``nnx.grad`` does); its other state
  (BatchNorm statistics, Dropout RNG counters) advances once, as in one
  forward pass. Modules among ``head_args`` are updated too. It runs under
  ``jax.jit`` and ``nnx.jit``.

  Args:
    encoder_fn: ``encoder_fn(encoder, x) -> features``, a floating array or
      pytree of arrays of any shape (typically [batch, features]).
    heads_fn: ``heads_fn(heads, features, *head_args) -> losses``, a [T]
      vector (a list or tuple of scalars is stacked), or ``(losses, aux)``
      with ``has_aux``.
    method: a method of this library: an aggregator (``mtl.mgda()``,
      ``mtl.pcgrad()``, ``mtl.cagrad()``, ``mtl.mean()``...), task scalings
      (alone their scaled gradients are summed), an alias, or an
      ``mtl.chain`` of them, with no optimizer after it. Every member reads
      its statistics over all the features, so members built with a mask of
      their own (``shared=``, ``layer=``) are refused: here the
      encoder/heads split is the mask.
    has_aux: whether ``heads_fn`` returns ``(losses, aux)``.

  Returns:
    A function ``step(method_state, encoder, heads, x, *head_args,
    method_args=None) -> (value, (encoder_grads, head_grads), new_state)``:
    ``value`` is ``losses`` or ``(losses, aux)``; the gradients have the
    structure of ``encoder`` and ``heads`` (``nnx.State`` for modules), ready
    for any optax optimizer; ``new_state`` is the method's state after the
    update (its ``task_weights`` the weights applied to the encoder);
    ``method_args`` is a dict of extra keywords for the method
    (``{"kpis": k}``...).

  Raises:
    TypeError: ``method`` is not a method of this library (at construction);
      the state is not the method's (at the call).
    ValueError: ``method`` has a member built with ``shared=`` (at
      construction) or ``layer=``; ``heads_fn`` does not return a [T]
      vector; a feature is not a floating array.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> def encoder_fn(w, x):
    ...   return w * x                      # the features z
    >>> def heads_fn(h, z):
    ...   return jnp.stack([jnp.sum(h["a"] * z), jnp.sum(h["b"] * z)])
    >>> tx = mtl.mgda(num_tasks=2)
    >>> step = mtl.value_and_representation_grad(encoder_fn, heads_fn, tx)
    >>> heads = {"a": jnp.array([2.0, 0.0]), "b": jnp.array([0.0, 1.0])}
    >>> losses, (encoder_grads, head_grads), state = step(
    ...     tx.init(None), jnp.ones(2), heads, jnp.array([1.0, 2.0]))
    >>> state.task_weights              # min-norm point of J_a = (2, 0), J_b = (0, 1)
    Array([0.2, 0.8], dtype=float32)
    >>> encoder_grads                   # x * (0.2 J_a + 0.8 J_b)
    Array([0.4, 1.6], dtype=float32)

  References:
    Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
    NeurIPS 2018 (Section 3.3, MGDA-UB). Quinton & Rey, "Jacobian Descent for
    Multi-Objective Optimization", 2024 (TorchJD's ``mtl_backward``). Lin &
    Zhang, "LibMTL: A Python Library for Multi-Task Learning", JMLR 2023
    (``rep_grad``).
  """
  for fn, what in ((encoder_fn, "encoder_fn"), (heads_fn, "heads_fn")):
    if not callable(fn):
      raise TypeError(f"{_NAME}: {what} must be callable, got "
                      f"{type(fn).__name__}. The signature is {_NAME}("
                      f"encoder_fn, heads_fn, method, has_aux=False).")
  reads = _check_method(method)

  def step(method_state, encoder, heads, x, *head_args, method_args=None):
    _check_state(method_state, method)
    forward = _Encoder(encoder, x, encoder_fn)
    features, encoder_vjp, encoder_rest = jax.vjp(
        canonical_convolutions.native(forward.pure), forward.values, has_aux=True)
    _check_features(features)
    call = arguments.Call((heads, features) + tuple(head_args), (0, 1), (0, 1),
                          _NAME)
    losses, heads_vjp, (aux, heads_rest) = jax.vjp(
        call.pure(heads_fn, {}, has_aux, _NAME + " (heads_fn)"), call.values,
        has_aux=True)
    num_tasks = losses.shape[0]
    if num_tasks == 0:
      raise ValueError(f"{_NAME}: heads_fn returned no losses; at least one "
                       f"task is needed.")

    feature_grads, gram = None, None
    if reads is not None:
      ((_, feature_grads),) = jax.vmap(heads_vjp)(
          jnp.eye(num_tasks, dtype=losses.dtype))
      mask = tuple(True for _ in jax.tree.leaves(feature_grads))
      (gram,) = statistics.task_statistics(
          feature_grads, [statistics.Request(mask, reads == "gramian")])
    weights, new_state = transform.weights_from_statistics(
        method, method_state, num_tasks, gram, losses, dict(method_args or {}),
        _NAME)

    if feature_grads is None:
      ((_, cotangent),) = heads_vjp(weights.shared.astype(losses.dtype))
    else:
      cotangent = combine_lib.combine(weights.shared, feature_grads)
    ((head_grads, _),) = heads_vjp(weights.heads.astype(losses.dtype))
    (encoder_grads,) = encoder_vjp(cotangent)
    (encoder_grads, head_grads), new_state = transform.skip_if_not_finite(
        method, (encoder_grads, head_grads), method_state, new_state, losses,
        dict(method_args or {}), _NAME)
    forward.write_back(encoder_rest)
    call.write_back(heads_rest)
    value = (losses, aux) if has_aux else losses
    return value, (encoder_grads, head_grads), new_state

  return step
