"""The two-batch path: per-task gradients on two or three mini-batches.

The stochastic methods :func:`optax_mtl.sdmgrad` and :func:`optax_mtl.modo`
step their task weights with the product ``J1 J2^T`` of the Jacobians of two
*independent* mini-batches: its expectation is the Gramian of the expected
gradients, whereas the Gramian ``J J^T`` of one mini-batch is biased by the
gradients' variance. The update itself is a weighted sum of the per-task
gradients of one batch: a third, independent one in the papers' analysis, or
the first one. A train step therefore computes per-task gradients on each
batch, at the same parameters::

  losses, (g1, g2, g3) = mtl.value_and_jacobians(loss_fn)(
      params, (batch_1, batch_2, batch_3))
  updates, opt_state = tx.update(g1, opt_state, params,
                                 second_grads=g2, third_grads=g3)

* ``task_grads`` (the first argument) and ``second_grads`` give the cross
  matrix ``J1 J2^T`` (over the ``shared=`` leaves), read in one pass over
  the leaves (:mod:`optax_mtl._src.engine.cross`);
* the update is ``sum_t w_t g3_t`` on the shared leaves (heads: ``sum_t
  g3_t``) with ``g3 = third_grads``, or ``task_grads`` when ``third_grads``
  is not given, and ``task_weights`` in the state logs that ``w``.

Without ``second_grads`` these methods raise a ``ValueError``;
:func:`same_batch` makes them read ``task_grads`` twice (the Gramian of one
batch) where only one batch is at hand.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting as weighting_lib
from optax_mtl._src.engine import cross as cross_lib
from optax_mtl._src.engine import hyperparams
from optax_mtl._src.engine import masking
from optax_mtl._src.engine import validation
from optax_mtl._src.paths import arguments
from optax_mtl._src.paths import jacobian

_NAME = "mtl.value_and_jacobians"
_SAME_NAME = "mtl.same_batch"
# Keyword under which the cross matrix reaches a two-batch method's rule
# (through TaskInputs.extra); no public keyword starts with an underscore.
_CROSS = "_two_batch_cross"
# Names of the two-batch methods built here, for same_batch's check.
_TWO_BATCH_NAMES: set = set()

_HOW_TO_FEED = (
    "Compute per-task gradients on two independent mini-batches at the same "
    "parameters: losses, (g1, g2) = mtl.value_and_jacobians(loss_fn)(params, "
    "(batch_1, batch_2)); then tx.update(g1, state, params, second_grads=g2) "
    "(add third_grads=g3 from a third batch for the update itself). With a "
    "single batch, wrap the method: mtl.same_batch(tx) reads task_grads twice "
    "(the Gramian of one batch, a biased estimate).")


def _batch_positions(batch_argnums, name):
  single = isinstance(batch_argnums, int)
  positions = (batch_argnums,) if single else tuple(batch_argnums)
  if not positions:
    raise ValueError(f"{name}: batch_argnums must name at least one argument "
                     f"(the position of the sequence of batches).")
  for p in positions:
    if isinstance(p, bool) or not isinstance(p, int):
      raise TypeError(f"{name}: batch_argnums must be an int or a sequence of "
                      f"ints, got {batch_argnums!r}.")
  return positions


def _split_batches(args, positions, argnums, name):
  """The number of batches K and, per batch k, the arguments of call k."""
  sizes = {}
  for p in positions:
    if not -len(args) <= p < len(args):
      raise ValueError(
          f"{name}: batch_argnums={p} but the function was called with "
          f"{len(args)} positional arguments.")
    batches = args[p]
    if not isinstance(batches, (tuple, list)):
      raise ValueError(
          f"{name}: argument {p} (batch_argnums) must be a tuple or list of "
          f"mini-batches, one per gradient set, e.g. (batch_1, batch_2); got "
          f"{type(batches).__name__}.")
    sizes[p % len(args)] = len(batches)
  counts = set(sizes.values())
  if len(counts) != 1:
    raise ValueError(f"{name}: the arguments at batch_argnums hold different "
                     f"numbers of batches {sizes}; give each the same number.")
  (count,) = counts
  if count < 2:
    raise ValueError(
        f"{name}: got {count} mini-batch; this path computes per-task "
        f"gradients on two or more (two independent batches for the cross "
        f"matrix J1 J2^T, a third for the update). For one batch use "
        f"mtl.value_and_jacobian(loss_fn)(params, batch).")
  differentiated = {q % len(args) for q in
                    ((argnums,) if isinstance(argnums, int) else tuple(argnums))}
  overlap = differentiated & set(sizes)
  if overlap:
    raise ValueError(f"{name}: argument(s) {sorted(overlap)} are both "
                     f"differentiated (argnums) and batches (batch_argnums).")
  calls = []
  for k in range(count):
    call_args = list(args)
    for p in sizes:
      call_args[p] = args[p][k]
    calls.append(tuple(call_args))
  return calls


def value_and_jacobians(
    loss_fn: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    *,
    batch_argnums: int | Sequence[int] = 1,
    chunk_size: int | None = None,
) -> Callable[..., Any]:
  """Per-task losses and gradients on several mini-batches, at the same point.

  .. math::
     (L^{(k)}(\\theta), J_k)_{k=1..K}, \\quad
     L^{(k)} \\in \\mathbb{R}^T,\\ (J_k)_t = \\nabla_\\theta L^{(k)}_t

  The function returned takes ``loss_fn``'s arguments, except that each
  argument at ``batch_argnums`` is a tuple of K >= 2 mini-batches. ``loss_fn``
  is called once per batch (the k-th entry of every such argument) at the
  same parameters, and each call gives per-task gradients as
  :func:`optax_mtl.value_and_jacobian` does: every leaf ``(T, *param_shape)``,
  one forward pass and T vmapped backward passes per batch (``chunk_size``
  bounds them as there). Flax NNX modules are handled as there too; their
  non-parameter state (BatchNorm statistics, RNG counters) advances once per
  batch, as after K forward passes.

  Args:
    loss_fn: function returning a [T] vector of per-task losses (or
      ``(losses, aux)`` with ``has_aux``), called on one batch at a time.
    argnums: which positional argument(s) to differentiate.
    has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
    batch_argnums: the position(s) of the arguments that hold the batches
      (each a tuple or list of K entries).
    chunk_size: optional number of tasks whose backward passes run together.

  Returns:
    A function returning ``(losses, task_grads)``: ``losses`` a tuple of the
    K batches' [T] loss vectors (with ``has_aux``, ``(losses, auxes)``, both
    tuples of K), ``task_grads`` a tuple of the K batches' per-task
    gradients (each a tuple when ``argnums`` is a sequence).

  Raises:
    ValueError: fewer than two batches, arguments with different numbers of
      batches, a batch argument that is also differentiated, or batches
      whose losses have different T.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> def losses_fn(w, x):  # task t: x_t w_t
    ...   return x * w
    >>> w = jnp.array([1.0, 2.0])
    >>> losses, (g1, g2) = mtl.value_and_jacobians(losses_fn)(
    ...     w, (jnp.array([2.0, 1.0]), jnp.array([1.0, 1.0])))
    >>> g1
    Array([[2., 0.],
           [0., 1.]], dtype=float32)
    >>> tx = mtl.modo(gamma=0.5, rho=0.0, num_tasks=2)
    >>> update, state = tx.update(g1, tx.init(w), w, second_grads=g2)
    >>> state.task_weights
    Array([0.4375, 0.5625], dtype=float32)
  """
  single, chosen = arguments.positions(argnums, _NAME)
  positions = _batch_positions(batch_argnums, _NAME)
  if chunk_size is not None:
    hyperparams.integer(chunk_size, _NAME, "chunk_size")

  @functools.wraps(loss_fn)
  def wrapped(*args, **kwargs):
    losses_out, auxes, grads_out = [], [], []
    for call_args in _split_batches(args, positions, argnums, _NAME):
      call = arguments.Call(call_args, argnums, chosen, _NAME)
      losses, vjp_fn, (aux, new_rest) = jax.vjp(
          call.pure(loss_fn, kwargs, has_aux, _NAME), call.values, has_aux=True)
      if losses_out and losses.shape != losses_out[0].shape:
        raise ValueError(
            f"{_NAME}: batch {len(losses_out) + 1} gives {losses.shape[0]} "
            f"losses but batch 1 gives {losses_out[0].shape[0]}; loss_fn must "
            f"return the same T tasks on every batch.")
      grads = jacobian.stacked(vjp_fn, losses, chunk_size)
      call.write_back(new_rest)
      validation.num_tasks(grads, _NAME)
      losses_out.append(losses)
      auxes.append(aux)
      grads_out.append(grads[0] if single else tuple(grads))
    losses_out = tuple(losses_out)
    value = (losses_out, tuple(auxes)) if has_aux else losses_out
    return value, tuple(grads_out)

  return wrapped


def _check_like(other, task_grads, argument, name):
  """``other`` has the structure, shapes and floating dtypes of ``task_grads``."""
  if jax.tree.structure(other) != jax.tree.structure(task_grads):
    raise ValueError(
        f"{name}: {argument} must have the structure of task_grads (the "
        f"per-task gradients of another mini-batch at the same parameters), "
        f"got {jax.tree.structure(other)} for {jax.tree.structure(task_grads)}.")
  paths = jax.tree_util.tree_flatten_with_path(task_grads)[0]
  for (path, leaf), theirs in zip(paths, jax.tree.leaves(other)):
    shape = getattr(theirs, "shape", None)
    dtype = getattr(theirs, "dtype", None)
    where = jax.tree_util.keystr(path) or "<root>"
    if shape is None or tuple(shape) != tuple(leaf.shape):
      raise ValueError(
          f"{name}: leaf {where} of {argument} has shape {shape}, but "
          f"task_grads has {tuple(leaf.shape)}; both are (T,) + param.shape, "
          f"the per-task gradients of two mini-batches at the same "
          f"parameters.")
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise ValueError(f"{name}: leaf {where} of {argument} has dtype {dtype}; "
                       f"gradients must be floating point.")


def aggregator(weighting: weighting_lib.Weighting, *,
               shared: masking.SharedMask = None) -> transform.Method:
  """A two-batch aggregator: its rule reads the cross matrix of two batches.

  The rule finds the :class:`~optax_mtl._src.engine.cross.CrossGramian` of
  ``task_grads`` and ``second_grads`` (over the shared leaves) with
  :func:`cross_matrix`; the update combines ``third_grads`` (or
  ``task_grads``) with the rule's weights, as any aggregator does.

  Args:
    weighting: the method; it reads no engine statistics.
    shared: optional mask of shared leaves.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``second_grads=`` (required) and ``third_grads=`` (optional).
  """
  name = weighting.name
  _TWO_BATCH_NAMES.add(name)
  inner = transform.aggregator(weighting, shared=shared)

  def update_fn(task_grads, state, params=None, *, second_grads=None,
                third_grads=None, **kwargs):
    expected = validation.expected_tasks(kwargs.get("losses"), name)
    validation.num_tasks(task_grads, name, expected, params)
    if second_grads is None:
      raise ValueError(
          f"{name} steps its task weights with the product J1 J2^T of the "
          f"per-task gradients of two mini-batches, so update needs "
          f"second_grads=. " + _HOW_TO_FEED)
    _check_like(second_grads, task_grads, "second_grads", name)
    if third_grads is not None:
      _check_like(third_grads, task_grads, "third_grads", name)
    mask = masking.resolve_shared(shared, task_grads, params, name)
    cross = cross_lib.cross_gramian(task_grads, second_grads, mask)
    direction = task_grads if third_grads is None else third_grads
    return inner.update(direction, state, params, **{_CROSS: cross}, **kwargs)

  method = transform.Method(inner.init, update_fn)
  method.parts = inner.parts
  method.single = inner.single
  return method


def cross_matrix(inputs: weighting_lib.TaskInputs, name: str) -> cross_lib.CrossGramian:
  """The cross matrix a two-batch method's rule reads.

  Raises:
    ValueError: the rule runs without it: inside :func:`optax_mtl.chain` or
      on a gradient path that computes one batch's statistics.
  """
  cross = inputs.extra.get(_CROSS)
  if cross is None:
    raise ValueError(
        f"{name} reads the cross matrix J1 J2^T of two mini-batches, which "
        f"mtl.chain and the one-batch gradient paths do not compute. Use it "
        f"alone, with optimizers after it: tx = optax.chain({name}(...), "
        f"optax.adam(1e-3)), then tx.update(g1, state, params, "
        f"second_grads=g2). Task scalings cannot come before it: they would "
        f"rescale one batch's gradients only.")
  return cross


def same_batch(method: transform.Method) -> transform.Method:
  """Feeds a two-batch method one batch: ``second_grads = task_grads``.

  SDMGrad and MoDo read the cross matrix ``J1 J2^T`` of two independent
  mini-batches. With one batch (full-batch or deterministic gradients, or a
  budget of one Jacobian per step) this wrapper passes ``task_grads`` as
  ``second_grads`` when the call has none, so the methods read the Gramian
  ``J J^T``: exact for deterministic gradients, a biased estimate for
  stochastic ones (the SDMGrad authors' code for NYU-v2 and Cityscapes
  works this way). ``second_grads=`` and ``third_grads=`` given to
  ``update`` are still used.

  Args:
    method: :func:`optax_mtl.sdmgrad` or :func:`optax_mtl.modo`.

  Returns:
    The method, whose ``update`` no longer needs ``second_grads``.

  Raises:
    TypeError: ``method`` is not a two-batch method of this library.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.same_batch(mtl.modo(gamma=0.5, rho=0.0, num_tasks=2))
    >>> grads = {"w": jnp.array([[2.0, 0.0], [0.0, 1.0]])}
    >>> update, state = tx.update(grads, tx.init(None))
    >>> state.task_weights
    Array([0.40625, 0.59375], dtype=float32)
  """
  members = transform.method_members(method, _SAME_NAME)
  if not (method.single and len(members) == 1
          and members[0].weighting.name in _TWO_BATCH_NAMES):
    names = [m.weighting.name for m in members]
    raise TypeError(
        f"{_SAME_NAME}: the method must be a two-batch method "
        f"({', '.join(sorted(_TWO_BATCH_NAMES)) or 'mtl.sdmgrad, mtl.modo'}) "
        f"built by its factory, got {names}. Other methods read one batch "
        f"already.")

  def update_fn(task_grads, state, params=None, *, second_grads=None, **kwargs):
    if second_grads is None:
      second_grads = task_grads
    return method.update(task_grads, state, params, second_grads=second_grads,
                         **kwargs)

  wrapped = transform.Method(method.init, update_fn)
  wrapped.parts = method.parts
  wrapped.single = method.single
  return wrapped
