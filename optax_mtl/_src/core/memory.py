"""Aggregators whose state holds a per-task memory of the gradients.

MoCo and DB-MTL combine an exponential moving average of each task's gradient
instead of the gradient itself, and Excess-MTL weighs the tasks by an
AdaGrad-style accumulator of each task's squared gradient. Their state holds
T copies of the shared parameters, so it is built from the parameters
(``tx.init(params)``), not from T alone as a :class:`~optax_mtl.Weighting`'s
state is. This module builds such a method from three pieces, so its module
holds its paper's math and nothing else:

* ``init(num_tasks, memory) -> state``: the method's state, a NamedTuple
  whose first field is ``task_weights`` and which has a ``memory`` field;
  ``memory`` is the zero memory the builder made: ``[T, *param.shape]``
  buffers for the shared leaves, None for the heads, in the parameters'
  structure and dtypes;
* ``update(state, inputs) -> leaf_update``: given the state before the step
  and the step's inputs (losses, ...), a function ``(memory_leaf,
  grad_leaf) -> (new_memory_leaf, sums)`` applied to every shared leaf in
  float32 (float64 for float64 leaves); ``sums`` is None or a [T] vector of
  per-task sums over the leaf, added over the leaves for the rule (Excess-MTL
  reads its excess-risk estimates from the same pass that updates its
  accumulator);
* a :class:`~optax_mtl.Weighting` whose rule maps a :class:`MemoryInputs`
  (the statistics of what the weights combine, the sums, the losses) and the
  state to the [T] weights and the new state.

One update then makes one pass that updates the memory (and the sums), one
statistics pass (the Gramian, or only the norms, when the rule reads them)
and one combination pass. With ``combine="memory"`` the update is ``sum_t w_t
m_t`` over the updated memory ``m`` and the statistics are the memory's; with
``combine="gradients"`` it is ``sum_t w_t g_t`` over the gradients received,
and so are the statistics. Heads (``shared=``) keep no memory and receive the
sum of their tasks' gradients, as with every aggregator.

Dtypes: the memory has the parameters' dtype (the gradients' dtype in a
standard train step) and keeps it whatever the gradients' dtype at update;
it is updated in float32 (float64 for float64 leaves) and rounded back.
Statistics are accumulated in float32 (float64 for float64 leaves). The
update has the gradients' dtypes.

Such a transformation is an ordinary ``optax.GradientTransformationExtraArgs``
but not a :class:`~optax_mtl.Method`: :func:`optax_mtl.chain` fuses methods
whose state is shaped by T only, and the gradient paths that never hold the
per-task gradients cannot update a gradient memory. Compose it with
``optax.chain`` (task scalings before it, the optimizer after it) and pass it
the stacked per-task gradients.

The non-finite policy is the library's (:mod:`optax_mtl._src.core.finite`): a
step whose gradients, memory, update or read losses are not finite returns a
zero update and keeps the state, with ``task_weights`` zeroed. The memory is
tested in the pass that writes it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src.core import finite
from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting as weighting_lib
from optax_mtl._src.engine import combine as combine_lib
from optax_mtl._src.engine import masking
from optax_mtl._src.engine import statistics
from optax_mtl._src.engine import validation

COMBINE_MEMORY = "memory"
COMBINE_GRADIENTS = "gradients"


class MemoryInputs(NamedTuple):
  """What the rule of a memory method reads at one update.

  Attributes:
    num_tasks: T, a static Python int.
    gramian: the :class:`~optax_mtl.Gramian` of what the weights combine
      (the updated memory, or the gradients), over the shared leaves, when
      the rule reads "gramian"; else None.
    norms: [T] norms of the same vectors when the rule reads "gramian" or
      "norms"; else None.
    sums: the [T] per-task sums returned by the memory update, added over
      the shared leaves (float32, float64 for float64 leaves); None when the
      update returns none.
    losses: [T] float32 losses when given (required if the rule reads
      "losses").
    kpis: [T] float32 KPIs when given (required if the rule reads "kpis").
    extra: the other keyword arguments passed to ``update``.
  """
  num_tasks: int
  gramian: statistics.Gramian | None
  norms: jax.Array | None
  sums: jax.Array | None
  losses: jax.Array | None
  kpis: jax.Array | None
  extra: Mapping[str, Any]


LeafUpdate = Callable[[jax.Array, jax.Array], "tuple[jax.Array, jax.Array | None]"]


def per_task(vector: jax.Array, leaf: jax.Array) -> jax.Array:
  """A [T] vector shaped to multiply a [T, ...] leaf task by task."""
  return vector.astype(leaf.dtype).reshape((leaf.shape[0],) + (1,) * (leaf.ndim - 1))


def task_sums(values: jax.Array) -> jax.Array:
  """Sums a [T, ...] leaf over every axis but the task axis: [T]."""
  return jnp.sum(values, axis=tuple(range(1, values.ndim)))


@dataclasses.dataclass(frozen=True)
class _Spec:
  weighting: weighting_lib.Weighting
  init: Callable[[int, Any], Any]
  update: Callable[[Any, MemoryInputs], LeafUpdate]
  combine: str
  shared: masking.SharedMask


class MemoryMethod(optax.GradientTransformationExtraArgs):
  """An aggregator whose state holds a per-task memory of the gradients.

  An ordinary ``optax.GradientTransformationExtraArgs``; the properties
  describe it as :class:`~optax_mtl.Method` describes its members (``kind``,
  ``reads``, ``claims``, ``parts``). It is not a ``Method``, so
  :func:`optax_mtl.chain` refuses it: compose it with ``optax.chain``.
  """

  #: Read by :func:`optax_mtl.chain` and the gradient paths to say why they
  #: refuse it.
  keeps_gradient_memory = True

  @property
  def name(self) -> str:
    """The public name, e.g. ``"mtl.moco"``."""
    return self.spec.weighting.name

  @property
  def kind(self) -> str:
    """Always ``"aggregator"``: the output has the parameters' shapes."""
    return transform.AGGREGATOR

  @property
  def reads(self) -> frozenset:
    """The statistics and keyword arguments the rule reads."""
    return self.spec.weighting.reads

  @property
  def claims(self) -> frozenset:
    """The properties the method guarantees."""
    return self.spec.weighting.claims

  @property
  def combines_memory(self) -> bool:
    """True when the update is ``sum_t w_t m_t`` over the memory, not the gradients."""
    return self.spec.combine == COMBINE_MEMORY

  @property
  def parts(self) -> tuple:
    """The one member (the rule's weighting and the ``shared=`` mask), for introspection."""
    member = transform.Member(self.spec.weighting, transform.AGGREGATOR,
                              self.spec.shared)
    return (transform.Part((member,)),)


def _flatten(method):
  return (method.init, method.update), method.spec


def _unflatten(spec, children):
  method = MemoryMethod(*children)
  method.spec = spec
  return method


# As a NamedTuple it would be rebuilt from its two fields alone by any pytree
# map, losing its spec (see transform.Method).
jax.tree_util.register_pytree_node(MemoryMethod, _flatten, _unflatten)


def _is_none(x) -> bool:
  return x is None


def _compute_dtype(*dtypes):
  dtype = jnp.dtype(jnp.float32)
  for d in dtypes:
    dtype = jnp.promote_types(dtype, d)
  return jnp.dtype(jnp.float64) if dtype == jnp.float64 else jnp.dtype(jnp.float32)


def _zero_buffer(param, num_tasks):
  param = jnp.asarray(param)
  if not jnp.issubdtype(param.dtype, jnp.inexact):
    raise ValueError(
        f"a parameter of dtype {param.dtype} was marked shared; the memory of "
        f"its gradients needs a floating point parameter.")
  # Broadcast from the parameter itself so that the buffer keeps its
  # sharding over the parameter axes.
  return jnp.broadcast_to(jnp.zeros_like(param)[None], (num_tasks,) + param.shape)


def _check_state(state, name):
  fields = getattr(state, "_fields", ())
  if "task_weights" not in fields or "memory" not in fields:
    raise TypeError(
        f"{name}: the state passed to update is a {type(state).__name__}, not "
        f"this method's state. Pass the state returned by tx.init(params) (or "
        f"by the previous update).")


def _memory_leaves(memory, task_grads, mask_leaves, name):
  """The memory's leaves aligned with the gradients' (None for heads), checked."""
  grads_def = jax.tree.structure(task_grads)
  memory_def = jax.tree.structure(memory, is_leaf=_is_none)
  if grads_def != memory_def:
    raise ValueError(
        f"{name}: the state's memory was built by tx.init(params) for "
        f"parameters with structure {memory_def}, but task_grads has structure "
        f"{grads_def}. Call tx.init with the parameters whose per-task "
        f"gradients you pass to update.")
  paths = jax.tree_util.tree_flatten_with_path(task_grads)[0]
  leaves = jax.tree.leaves(memory, is_leaf=_is_none)
  for (path, grad), buffer, shared in zip(paths, leaves, mask_leaves):
    where = jax.tree_util.keystr(path) or "<root>"
    if (buffer is None) == shared:
      kept = "keeps no memory" if buffer is None else "keeps a memory"
      raise ValueError(
          f"{name}: leaf {where} {kept} in the state, but the shared= mask "
          f"now marks it as {'shared' if shared else 'a head'}. The mask must "
          f"select the same leaves in tx.init(params) and in update.")
    if buffer is not None and tuple(buffer.shape) != tuple(grad.shape):
      raise ValueError(
          f"{name}: leaf {where} of task_grads has shape {tuple(grad.shape)}, "
          f"but its memory in the state has shape {tuple(buffer.shape)} "
          f"(num_tasks, *param.shape). Call tx.init with the parameters whose "
          f"per-task gradients you pass to update.")
  return leaves


def _read_vectors(reads, num_tasks, name, losses, kwargs):
  losses = validation.check_losses(losses, num_tasks, name,
                                   required="losses" in reads)
  kpis = kwargs.get("kpis")
  if "kpis" in reads or kpis is not None:
    kpis = validation.check_losses(kpis, num_tasks, name,
                                   required="kpis" in reads, name="kpis")
  extra = {k: v for k, v in kwargs.items() if k != "kpis"}
  return losses, kpis, extra


def memory_aggregator(
    weighting: weighting_lib.Weighting,
    *,
    init: Callable[[int, Any], Any],
    update: Callable[[Any, MemoryInputs], LeafUpdate],
    combine: str,
    shared: masking.SharedMask = None,
) -> MemoryMethod:
  """Builds an aggregator whose state holds a per-task memory of the gradients.

  Args:
    weighting: the method's rule, ``(MemoryInputs, state) -> ([T] weights,
      new state)``, with its name, what it reads (``"gramian"`` or
      ``"norms"`` of what the weights combine, ``"losses"``, ``"kpis"``), its
      claims and its ``num_tasks`` (required: the memory is shaped by T).
    init: ``(num_tasks, memory) -> state``, a NamedTuple whose first field
      is ``task_weights`` and which has a ``memory`` field.
    update: ``(state before the step, MemoryInputs with the losses, KPIs and
      extra arguments only) -> leaf_update``; ``leaf_update(memory_leaf,
      grad_leaf) -> (new_memory_leaf, sums)`` on [T, ...] float32 (float64)
      arrays, ``sums`` None or [T].
    combine: ``"memory"`` (update ``sum_t w_t m_t`` over the updated memory)
      or ``"gradients"`` (``sum_t w_t g_t`` over the gradients received).
    shared: the ``shared=`` mask of shared leaves; only they keep a memory.

  Returns:
    A :class:`MemoryMethod`.
  """
  name = weighting.name
  if weighting.num_tasks is None:
    raise ValueError(f"{name}: a memory method's weighting needs num_tasks.")
  if combine not in (COMBINE_MEMORY, COMBINE_GRADIENTS):
    raise ValueError(f"{name}: combine must be {COMBINE_MEMORY!r} or "
                     f"{COMBINE_GRADIENTS!r}, got {combine!r}.")
  num_tasks = weighting.num_tasks
  kind = weighting.statistics

  def init_fn(params):
    if params is None:
      raise TypeError(
          f"{name} keeps a memory of each task's gradient of the shared "
          f"parameters in its state, so init needs the parameters: call "
          f"tx.init(params), not tx.init(None).")
    mask = masking.resolve_shared(shared, params, params, name)
    try:
      memory = jax.tree.map(
          lambda p, s: _zero_buffer(p, num_tasks) if s else None, params, mask)
    except ValueError as error:
      raise ValueError(f"{name}: {error} Mark it False in shared=.") from None
    state = init(num_tasks, memory)
    _check_state(state, name)
    return state

  def update_fn(task_grads, state, params=None, *, losses=None, **kwargs):
    expected = validation.expected_tasks(losses, name)
    tasks = validation.num_tasks(task_grads, name, expected, params)
    validation.check_configured_tasks(tasks, num_tasks, name)
    losses, kpis, extra = _read_vectors(weighting.reads, tasks, name, losses,
                                        kwargs)
    _check_state(state, name)
    mask = masking.resolve_shared(shared, task_grads, params, name)
    mask_leaves = jax.tree.leaves(mask)
    grad_leaves, treedef = jax.tree.flatten(task_grads)
    memory_leaves = _memory_leaves(state.memory, task_grads, mask_leaves, name)

    step_inputs = MemoryInputs(tasks, None, None, None, losses, kpis, extra)
    leaf_update = update(state, step_inputs)
    new_memory, sums, flags = [], None, []
    for buffer, grad in zip(memory_leaves, grad_leaves):
      if buffer is None:
        new_memory.append(None)
        continue
      compute = _compute_dtype(buffer.dtype, grad.dtype)
      new, partial = leaf_update(buffer.astype(compute), grad.astype(compute))
      new = new.astype(buffer.dtype)
      new_memory.append(new)
      # Reduced in the pass that writes the buffer, so a non-finite memory
      # costs no extra read.
      flags.append(jnp.all(jnp.isfinite(new)))
      if partial is not None:
        sums = partial if sums is None else sums + partial
    memory_tree = jax.tree.unflatten(treedef, new_memory)

    if combine == COMBINE_MEMORY:
      combined = [g if m is None else m for m, g in zip(new_memory, grad_leaves)]
    else:
      combined = grad_leaves
    gram = norms = None
    if kind is not None:
      (result,) = statistics.task_statistics(
          combined, [statistics.Request(tuple(bool(s) for s in mask_leaves),
                                        kind == "gramian")])
      gram, norms = result.gramian, result.norms
    inputs = MemoryInputs(tasks, gram, norms, sums, losses, kpis, extra)
    weights, new_state = weighting.apply(inputs, state._replace(memory=memory_tree))

    updates = combine_lib.combine(weights, jax.tree.unflatten(treedef, combined),
                                  mask)
    updates = jax.tree.map(lambda u, g: u.astype(g.dtype), updates, task_grads)
    read = [v for key, v in (("losses", losses), ("kpis", kpis))
            if key in weighting.reads]
    ok = finite.all_finite(updates, new_state._replace(memory=None), *read)
    if flags:
      ok = ok & jnp.all(jnp.stack(flags))
    new_state = finite.guard_state(ok, new_state, state)
    return finite.zero_unless(ok, updates), new_state

  method = MemoryMethod(init_fn, update_fn)
  method.spec = _Spec(weighting, init, update, combine, shared)
  return method
