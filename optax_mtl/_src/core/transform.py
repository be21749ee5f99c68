"""Builders that turn weightings into optax transformations, and compose them.

A transformation built here is a chain of *members*: zero or more task
scalings (task t's gradient multiplied by ``d_t``), optionally ending with an
aggregator (shared leaves combined with ``w``, heads summed). Whatever the
chain, one update makes

1. one statistics pass: each leaf is read once for the Gramian (or only the
   norms) of every set of leaves a member reads (:mod:`..engine.statistics`);
   a member after scalings reads the Gramian of the *scaled* gradients,
   ``D G D`` with ``D = diag(d)``, formed on the T x T matrix;
2. one combination pass: ``sum_t d_t w_t g_t`` on shared leaves and
   ``sum_t d_t g_t`` on heads (or the scaled stack when the chain ends with a
   scaling).

``optax.chain`` of the same transformations gives the same update and states
with one pass per member; :func:`chain` fuses them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src.core import diagnostics as diagnostics_lib
from optax_mtl._src.core import finite
from optax_mtl._src.core import groups as groups_lib
from optax_mtl._src.core import weighting as weighting_lib
from optax_mtl._src.engine import combine as combine_lib
from optax_mtl._src.engine import masking
from optax_mtl._src.engine import statistics
from optax_mtl._src.engine import validation

AGGREGATOR = "aggregator"
SCALING = "scaling"


class Member(NamedTuple):
  """One weighting in a chain.

  Attributes:
    weighting: the method.
    kind: ``AGGREGATOR`` or ``SCALING``.
    mask: the ``shared=`` mask: for an aggregator, the shared leaves (combined
      by its weights, the others summed) and the leaves its statistics are
      read over; for a scaling, only the latter (every leaf is scaled).
    groups: None, or the grouping of the shared leaves of a per-group
      aggregator (:func:`layerwise`): its rule runs on each group's
      statistics and each group is combined with its own weights.
  """
  weighting: weighting_lib.Weighting
  kind: str
  mask: masking.SharedMask
  groups: masking.GroupSpec | None = None


class Part(NamedTuple):
  """Members that share one state in the user's view.

  A public factory gives one member. An alias (a scaling summed over tasks)
  gives two whose state is the scaling's, its ``task_weights`` the product of
  both members' weights (the weights applied to the shared leaves).
  """
  members: tuple
  merged: bool = False

  def init(self, params):
    first = self.members[0]
    if first.groups is None:
      return first.weighting.initial_state()
    name = first.weighting.name
    if params is None:
      raise ValueError(
          f"{name}: the state holds one state per group of parameters, so "
          f"init needs them: call tx.init(params), not tx.init(None).")
    mask = masking.resolve_shared(first.mask, params, params, name)
    return groups_lib.initial_state(
        first.weighting, masking.resolve_groups(first.groups, mask, params, params, name))

  def unpack(self, state) -> list:
    rest = [m.weighting.initial_state() for m in self.members[1:]]
    return [state] + rest

  def pack(self, states: list, weights: list):
    if not self.merged:
      return states[0]
    product = weights[0]
    for w in weights[1:]:
      product = product * w
    first = states[0]
    if first.task_weights is not None:
      first = first._replace(task_weights=product.astype(first.task_weights.dtype))
    return first


class Method(optax.GradientTransformationExtraArgs):
  """An optax transformation built from weightings.

  It is an ordinary ``optax.GradientTransformationExtraArgs``; its ``parts``
  let :func:`chain`, :func:`optax_mtl.loss_weights` and the gradient paths
  read what each member needs; ``diagnostics`` says whether its state keeps
  the conflict diagnostics (:func:`with_diagnostics`).
  """
  diagnostics = False

  @property
  def reads(self) -> frozenset:
    """Everything the members read (statistics and keyword arguments)."""
    return frozenset().union(*(m.weighting.reads for p in self.parts
                               for m in p.members))

  @property
  def kind(self) -> str:
    """``AGGREGATOR`` if the output has the parameters' shapes, else ``SCALING``."""
    return self.parts[-1].members[-1].kind

  @property
  def claims(self) -> frozenset:
    """The properties every member claims (what the whole chain keeps)."""
    members = [m for p in self.parts for m in p.members]
    return frozenset.intersection(*(m.weighting.claims for m in members))


def _flatten_method(method):
  return (method.init, method.update), (method.parts, method.single,
                                        method.diagnostics)


def _unflatten_method(aux, children):
  method = Method(*children)
  method.parts, method.single, method.diagnostics = aux
  return method


class DiagnosedState(NamedTuple):
  """State of a method built with :func:`with_diagnostics`.

  Attributes:
    method_state: the method's own state (``task_weights`` included).
    conflict: the :class:`~optax_mtl.ConflictDiagnostics` of the last step's
      task gradients.
  """
  method_state: Any
  conflict: diagnostics_lib.ConflictDiagnostics


# As a NamedTuple, a Method would be rebuilt from its two fields alone by any
# pytree map (nnx.jit's static arguments, jax.tree.map), losing its parts.
jax.tree_util.register_pytree_node(Method, _flatten_method, _unflatten_method)


def _members(parts) -> list:
  return [m for p in parts for m in p.members]


def _check_order(parts, name):
  members = _members(parts)
  for member in members[:-1]:
    if member.kind == AGGREGATOR:
      raise ValueError(
          f"{name}: {member.weighting.name} maps the per-task gradients to one "
          f"update, so it must come last; put task scalings before it and "
          f"optimizers (optax.adam, ...) after the whole chain.")


def _vectors(members, num_tasks, losses, kwargs):
  """Validates the keyword arguments the members read; returns them."""
  def required(key):
    for m in members:
      if key in m.weighting.reads:
        return m.weighting.name
    return None
  owner = required("losses")
  losses = validation.check_losses(losses, num_tasks, owner or members[0].weighting.name,
                                   required=owner is not None)
  owner_k = required("kpis")
  kpis = kwargs.get("kpis")
  if owner_k is not None or kpis is not None:
    kpis = validation.check_losses(kpis, num_tasks,
                                   owner_k or members[0].weighting.name,
                                   required=owner_k is not None, name="kpis")
  extra = {k: v for k, v in kwargs.items() if k != "kpis"}
  return losses, kpis, extra


def _check_tasks(members, num_tasks):
  for m in members:
    configured = m.weighting.num_tasks
    if configured is not None:
      validation.check_configured_tasks(num_tasks, configured, m.weighting.name,
                                        m.weighting.tasks_argument)


def _run(members, states, num_tasks, stats, losses, kpis, extra, layouts=None):
  """Applies the members in order; returns (d, final weights, states, weights).

  ``layouts``: per member, None or (leaf groups, leaf sizes) of a per-group
  aggregator, whose final weights are then [K, T].
  """
  scales = None
  weights_out, new_states, final = [], [], None
  layouts = layouts or [None] * len(members)
  for member, state, member_stats, grouping in zip(members, states, stats, layouts):
    gram = norms = None
    if member_stats is not None:
      gram, norms = member_stats
    if grouping is not None:
      inputs = weighting_lib.TaskInputs(num_tasks, gram, norms, losses, kpis, extra)
      final, mean, state = groups_lib.apply(member.weighting, inputs, state,
                                            *grouping, scales)
      weights_out.append(mean)
      new_states.append(state)
      continue
    if member_stats is not None and scales is not None:
      gram = gram.scaled(scales) if gram is not None else None
      norms = jnp.abs(scales).astype(norms.dtype) * norms
    inputs = weighting_lib.TaskInputs(num_tasks, gram, norms, losses, kpis, extra)
    weights, state = member.weighting.apply(inputs, state)
    weights_out.append(weights)
    new_states.append(state)
    if member.kind == SCALING:
      scales = weights if scales is None else scales * weights
    else:
      final = weights
  return scales, final, new_states, weights_out


def _read_vectors(members, losses, kpis) -> list:
  """The losses and KPIs some member reads (their finiteness decides a skip)."""
  reads = frozenset().union(*(m.weighting.reads for m in members))
  return [v for key, v in (("losses", losses), ("kpis", kpis)) if key in reads]


def _split_states(parts, state, single):
  states = [state] if single else list(state)
  return [s for part, st in zip(parts, states) for s in part.unpack(st)]


def _join_states(parts, member_states, member_weights, single):
  out, start = [], 0
  for part in parts:
    end = start + len(part.members)
    out.append(part.pack(member_states[start:end], member_weights[start:end]))
    start = end
  return out[0] if single else tuple(out)


def _name(parts, single):
  if single:
    return parts[0].members[-1].weighting.name
  return "mtl.chain"


def build(parts: Sequence[Part], *, single: bool,
          diagnostics: bool = False) -> Method:
  """The transformation of ``parts``; ``single``: its state is the one part's.

  Args:
    parts: the members grouped by the state the user sees.
    single: True for one public method (state = that part's state), False
      for :func:`chain` (state = the tuple of the parts' states, as
      ``optax.chain`` gives).
    diagnostics: whether the state is wrapped in a :class:`DiagnosedState`
      (see :func:`with_diagnostics`).

  Returns:
    A :class:`Method`.
  """
  parts = tuple(parts)
  name = _name(parts, single)
  _check_order(parts, name)
  members = _members(parts)
  diagnosed_tasks = _diagnosed_tasks(members, name) if diagnostics else None

  def init_fn(params):
    states = [p.init(params) for p in parts]
    inner = states[0] if single else tuple(states)
    if diagnostics:
      return DiagnosedState(inner, diagnostics_lib.empty(diagnosed_tasks))
    return inner

  def update_fn(task_grads, state, params=None, *, losses=None, **kwargs):
    expected = validation.expected_tasks(losses, name)
    num_tasks = validation.num_tasks(task_grads, name, expected, params)
    _check_tasks(members, num_tasks)
    losses, kpis, extra = _vectors(members, num_tasks, losses, kwargs)
    masks = [masking.resolve_shared(m.mask, task_grads, params, m.weighting.name)
             for m in members]
    layouts = _layouts(members, masks, task_grads, params)
    stats, raw = _statistics(members, masks, task_grads,
                             masks[-1] if diagnostics else None, layouts)
    outer = state
    if diagnostics:
      state = _unwrap(state, name)
    old_states = _split_states(parts, state, single)
    for member, member_state, grouping in zip(members, old_states, layouts):
      if grouping is not None:
        groups_lib.check_state(member_state, grouping[0], member.weighting.name)
    scales, final, states, weights = _run(members, old_states, num_tasks, stats,
                                          losses, kpis, extra, layouts)
    last = members[-1]
    if last.kind == AGGREGATOR:
      # [K, T] for a per-group aggregator, else [T].
      shared = final if scales is None else scales.reshape(
          (1,) * (final.ndim - 1) + scales.shape) * final
      if layouts[-1] is not None:
        updates = combine_lib.combine_groups(shared, task_grads, layouts[-1][0],
                                             head_weights=scales)
      elif last.weighting.per_coordinate is None:
        updates = combine_lib.combine(shared, task_grads, masks[-1],
                                      head_weights=scales)
      else:
        last_state = states[-1]
        updates = combine_lib.reduce_tasks(
            lambda leaf, index: finite.poison_unless_finite(
                leaf, last.weighting.per_coordinate(leaf, last_state, index)),
            shared, task_grads, masks[-1], head_weights=scales)
    else:
      updates = combine_lib.scale_tasks(scales, task_grads)
    conflict = diagnostics_lib.from_gramian(raw) if diagnostics else None
    ok = finite.all_finite(updates, states, conflict,
                           *_read_vectors(members, losses, kpis))
    states = [finite.guard_state(ok, n, o) for n, o in zip(states, old_states)]
    weights = [finite.zero_unless(ok, w) for w in weights]
    new_state = _join_states(parts, states, weights, single)
    if diagnostics:
      new_state = DiagnosedState(
          new_state, finite.keep_if(ok, conflict, outer.conflict))
    return finite.zero_unless(ok, updates), new_state

  method = Method(init_fn, update_fn)
  method.parts = parts
  method.single = single
  method.diagnostics = diagnostics
  return method


def _diagnosed_tasks(members, name) -> int:
  for m in members:
    if m.weighting.num_tasks is not None:
      return m.weighting.num_tasks
  raise ValueError(
      f"mtl.with_diagnostics({name}): the diagnostics in the state are [T] "
      f"and [T, T] arrays, so T must be known at init: build the method with "
      f"num_tasks=T (e.g. mtl.mgda(num_tasks=3)).")


def _unwrap(state, name):
  if not isinstance(state, DiagnosedState):
    raise TypeError(
        f"{name} was built with mtl.with_diagnostics, so its state is a "
        f"DiagnosedState; got {type(state).__name__}. Pass the state "
        f"returned by tx.init(params) (or by the previous update).")
  return state.method_state


def _layouts(members, masks, task_grads, params) -> list:
  """Per member: None, or (leaf groups, leaf sizes) of a per-group aggregator."""
  out = []
  for member, mask in zip(members, masks):
    if member.groups is None:
      out.append(None)
      continue
    leaf_groups = masking.resolve_groups(member.groups, mask, task_grads, params,
                                         member.weighting.name)
    sizes = [leaf.size // max(leaf.shape[0], 1) for leaf in jax.tree.leaves(task_grads)]
    out.append((leaf_groups, sizes))
  return out


def _statistics(members, masks, task_grads, diagnosed=None, layouts=None):
  """One engine pass for every member's statistics; None where none is read.

  ``diagnosed``: a mask whose raw Gramian is wanted too (for the
  diagnostics); it shares the pass, and costs nothing more when a member
  already reads the Gramian of those leaves. A per-group member (``layouts``)
  reads one set of statistics per group, stacked along a leading axis.

  Returns:
    ``(per-member (gramian, norms) or None, the diagnosed Gramian or None)``.
  """
  layouts = layouts or [None] * len(members)
  keys_of = []
  wanted = {}
  for member, mask, grouping in zip(members, masks, layouts):
    kind = member.weighting.statistics
    keys = []
    if kind is not None:
      keys = ([tuple(jax.tree.leaves(mask))] if grouping is None
              else groups_lib.group_masks(grouping[0]))
      for key in keys:
        wanted[key] = wanted.get(key, False) or kind == "gramian"
    keys_of.append(keys)
  if diagnosed is not None:
    wanted[tuple(jax.tree.leaves(diagnosed))] = True
  if not wanted:
    return [None] * len(members), None
  keys = list(wanted)
  results = statistics.task_statistics(
      task_grads, [statistics.Request(k, wanted[k]) for k in keys])
  by_key = dict(zip(keys, results))
  out = []
  for member, member_keys, grouping in zip(members, keys_of, layouts):
    if member.weighting.statistics is None:
      out.append(None)
      continue
    found = [by_key[k] for k in member_keys]
    result = found[0] if grouping is None else jax.tree.map(
        lambda *xs: jnp.stack(xs), *found)
    gram = result.gramian if member.weighting.statistics == "gramian" else None
    out.append((gram, result.norms))
  raw = None if diagnosed is None else by_key[tuple(jax.tree.leaves(diagnosed))].gramian
  return out, raw


def aggregator(weighting: weighting_lib.Weighting, *,
               shared: masking.SharedMask = None) -> Method:
  """Turns a weighting into an aggregator: per-task gradients in, one update out.

  .. math::
     u^\\ell = \\sum_t w_t\\, g_t^\\ell \\ \\text{(shared leaves)}, \\qquad
     u^\\ell = \\sum_t g_t^\\ell \\ \\text{(heads)}

  Args:
    weighting: the method (:class:`optax_mtl.Weighting`).
    shared: optional mask of shared leaves (pytree of bools, a prefix of the
      parameters' structure, or a callable on the params). Its statistics
      are read over these leaves.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return build([Part((Member(weighting, AGGREGATOR, shared),))], single=True)


def task_scaling(weighting: weighting_lib.Weighting, *,
                 shared: masking.SharedMask = None) -> Method:
  """Turns a weighting into a task scaling: task t's gradient times ``w_t``.

  Args:
    weighting: the method (:class:`optax_mtl.Weighting`).
    shared: optional mask of the leaves its statistics are read over (e.g.
      the last shared layer for GradNorm); every leaf is scaled.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (stacked in, stacked out).
  """
  return build([Part((Member(weighting, SCALING, shared),))], single=True)


def _single_member(tx, name, position):
  if getattr(tx, "keeps_gradient_memory", False):
    raise TypeError(
        f"{name}: argument {position} ({tx.name}) keeps a memory of each "
        f"task's gradient in its state, which mtl.chain cannot fuse. Compose "
        f"it with optax.chain instead: optax.chain(task scalings..., "
        f"{tx.name}(...), optimizer).")
  if isinstance(tx, Method) and tx.diagnostics:
    raise TypeError(
        f"{name}: argument {position} was built with mtl.with_diagnostics; "
        f"apply it to the whole chain instead: "
        f"mtl.with_diagnostics(mtl.chain(...)).")
  if not isinstance(tx, Method) or not tx.single or len(tx.parts) != 1:
    raise TypeError(
        f"{name}: argument {position} is not a method of optax_mtl built by "
        f"its factories (got {type(tx).__name__}). mtl.chain fuses task "
        f"scalings and one aggregator; wrap optimizers and other optax "
        f"transformations around it with optax.chain.")
  return tx.parts[0]


def chain(*transformations: Method) -> Method:
  """Chains task scalings and an aggregator with one pass of each kind.

  ``mtl.chain(s_1, ..., s_k, aggregator)`` gives the same update and the same
  states as ``optax.chain(s_1, ..., s_k, aggregator)``, but reads the
  gradients twice in total instead of once or twice per member: one
  statistics pass (the Gramian of the scaled gradients is ``D G D``, formed
  on the T x T matrix) and one combination pass (``sum_t d_t w_t g_t``).

  Args:
    *transformations: task scalings of this library, optionally ending with
      one of its aggregators (or an alias such as ``mtl.dwa(...)``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its state is the tuple of
    the members' states, as ``optax.chain`` gives.

  Raises:
    TypeError: an argument is not a method of this library.
    ValueError: an aggregator is not last, or no argument is given.

  Example:
    >>> import jax.numpy as jnp, optax, optax_mtl as mtl
    >>> tx = optax.chain(mtl.chain(mtl.normalize_gradients(), mtl.mgda()),
    ...                  optax.adam(1e-3))
    >>> state = tx.init({"w": jnp.zeros(2)})
  """
  if not transformations:
    raise ValueError("mtl.chain: pass at least one method, e.g. "
                     "mtl.chain(mtl.scale_by_realtime_loss(), mtl.mgda()).")
  parts = [_single_member(tx, "mtl.chain", i) for i, tx in enumerate(transformations)]
  return build(parts, single=False)


def with_diagnostics(tx: Method) -> Method:
  """The same method, keeping the conflict diagnostics of each step in its state.

  The state becomes ``DiagnosedState(method_state, conflict)``: the method's
  own state and the :class:`~optax_mtl.ConflictDiagnostics` of the task
  gradients of the last step (norms, cosines, conflict fraction, most
  conflicting pair, norm ratio), over the leaves the last member reads (an
  aggregator's ``shared=`` leaves). ``optax.tree.get(state, "task_cosines")``
  or ``"task_weights"`` finds them inside an optimizer's chained state. The
  update is unchanged. A method that reads the Gramian of those leaves
  already (MGDA, UPGrad, PCGrad...) pays only T x T arithmetic; any other
  gets the Gramian in the same statistics pass as the norms it reads, or in
  one pass of its own (one contraction per leaf).

  Args:
    tx: a method of this library built with ``num_tasks=T`` (an aggregator,
      a task scaling, an alias or an ``mtl.chain``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    TypeError: ``tx`` is not a method of this library, or already keeps
      diagnostics.
    ValueError: T is unknown (no ``num_tasks=``).

  Example:
    >>> import jax.numpy as jnp, optax, optax_mtl as mtl
    >>> tx = optax.chain(mtl.with_diagnostics(mtl.mgda(num_tasks=2)), optax.sgd(0.1))
    >>> params = {"w": jnp.zeros(2)}
    >>> grads = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
    >>> _, state = tx.update(grads, tx.init(params), params)
    >>> round(float(optax.tree.get(state, "most_conflicting_cosine")), 4)
    -0.7071
  """
  if not isinstance(tx, Method) or getattr(tx, "keeps_gradient_memory", False):
    raise TypeError(
        f"mtl.with_diagnostics: expected a method of optax_mtl built on the "
        f"weighting core (such as mtl.mgda(num_tasks=T) or an mtl.chain), got "
        f"{type(tx).__name__}. Apply it before chaining the optimizer: "
        f"optax.chain(mtl.with_diagnostics(method), optax.adam(...)).")
  if tx.diagnostics:
    raise TypeError("mtl.with_diagnostics: this method keeps diagnostics "
                    "already; apply it once.")
  return build(tx.parts, single=tx.single, diagnostics=True)


def layerwise(tx: Method, groups: masking.GroupSpec = "layer") -> Method:
  """The same aggregator applied to each layer (group of leaves) on its own.

  Each group k of shared leaves gets the method's weights computed from its
  own statistics (the Gramian ``G_k`` of the task gradients restricted to
  its leaves) and its own state, and is combined with them:

  .. math::
     u^\\ell = \\sum_t W_{k t}\\, g_t^\\ell \\quad (\\ell \\in \\text{group } k),
     \\qquad W_k = \\text{rule}(G_k, \\text{state}_k)

  This is the layer-wise form of PCGrad and GradVac that the GradVac paper
  uses (one cosine target per pair of tasks and per layer) and works with any
  aggregator that reads the Gramian or the norms. The cost stays one
  statistics pass (each leaf is read once; its T x T block goes to its group)
  and one combination pass; the K rules run batched (``vmap``). Heads (the
  leaves ``shared=`` marks False) are summed as before. Properties that hold
  group by group hold for the whole update (non-conflict: ``<u, g_t> =
  sum_k <u_k, g_t^k> >= 0``); a zero update at a Pareto-stationary point
  does not (0 may be in the hull of the full gradients, not of a layer's).

  Random methods (PCGrad, GradVac) draw the same visiting orders in every
  group. The state is a :class:`~optax_mtl.LayerwiseState` whose
  ``task_weights`` are the groups' weights averaged over the parameters and
  whose ``group_weights`` are the [K, T] weights; ``tx.init(params)`` needs
  the parameters (K is read from them).

  Args:
    tx: an aggregator of this library that reads gradient statistics (such
      as ``mtl.pcgrad()``, ``mtl.gradvac(num_tasks=T)``, ``mtl.upgrad()``),
      with its ``shared=`` mask if any.
    groups: ``"layer"`` (default: leaves with the same parent in the
      parameter tree, such as a Flax layer's kernel and bias), ``"leaf"``
      (every leaf its own group), a pytree of labels (str or int, a prefix of
      the parameters' structure; equal labels form one group), or a callable
      on the params returning one.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` aggregator; it chains with
    task scalings in :func:`chain` like any aggregator.

  Raises:
    TypeError: ``tx`` is not one aggregator of this library.
    ValueError: ``tx`` reads no gradient statistics, or combines coordinate
      by coordinate.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.layerwise(mtl.mgda())
    >>> params = {"a": {"w": jnp.zeros(2)}, "b": {"w": jnp.zeros(1)}}
    >>> grads = {"a": {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])},
    ...          "b": {"w": jnp.array([[1.0], [3.0]])}}
    >>> update, state = tx.update(grads, tx.init(params), params)
    >>> update["a"]["w"], update["b"]["w"]
    (Array([0.5, 0.5], dtype=float32), Array([1.], dtype=float32))
  """
  name = "mtl.layerwise"
  if (not isinstance(tx, Method) or getattr(tx, "keeps_gradient_memory", False)
      or tx.diagnostics or not tx.single or len(tx.parts) != 1
      or len(tx.parts[0].members) != 1 or tx.kind != AGGREGATOR):
    raise TypeError(
        f"{name}: expected one aggregator of optax_mtl built by its factories "
        f"(such as mtl.pcgrad() or mtl.gradvac(num_tasks=T)), got "
        f"{getattr(tx, 'name', type(tx).__name__)}. Chain task scalings and "
        f"diagnostics around it: mtl.with_diagnostics(mtl.chain(scaling, "
        f"mtl.layerwise(aggregator))).")
  (member,) = tx.parts[0].members
  inner = member.weighting
  if inner.per_coordinate is not None or inner.statistics is None:
    what = ("combines the task gradients coordinate by coordinate already"
            if inner.per_coordinate is not None else
            "reads no gradient statistics, so every group would get the "
            "same weights")
    raise ValueError(f"{name}: {inner.name} {what}; apply it to the whole "
                     f"model instead.")
  if member.groups is not None:
    raise ValueError(f"{name}: {inner.name} is per-group already; apply "
                     f"layerwise once.")
  if groups is None:
    raise ValueError(f"{name}: groups=None; pass 'layer', 'leaf' or a pytree "
                     f"of labels.")
  grouped = dataclasses.replace(
      inner, name=f"{name}({inner.name})",
      claims=inner.claims - {"stationary_zero"})
  return build([Part((member._replace(weighting=grouped, groups=groups),))],
               single=True)


def alias(scaling: Method, tail: weighting_lib.Weighting,
          shared: masking.SharedMask) -> Method:
  """A task scaling followed by a fixed aggregator, with the scaling's state.

  Args:
    scaling: a task scaling built by :func:`task_scaling`.
    tail: a weighting with fixed weights (the sum, or task priorities).
    shared: the aggregator's ``shared=`` mask; also the scaling's
      statistics leaves when it has no mask of its own.

  Returns:
    An aggregator whose state is the scaling's, with ``task_weights`` the
    weights applied to the shared leaves.
  """
  (member,) = scaling.parts[0].members
  if member.mask is None:
    member = member._replace(mask=shared)
  return build([Part((member, Member(tail, AGGREGATOR, shared)), merged=True)],
               single=True)


class Weights(NamedTuple):
  """The weights a method applies, for a path that combines by itself.

  Attributes:
    shared: [T] weights of the shared leaves (``sum_t shared_t g_t``).
    heads: [T] weights of the task-specific leaves (ones unless task
      scalings came first: they scale the heads too).
  """
  shared: jax.Array
  heads: jax.Array


def method_members(tx, name) -> list:
  if getattr(tx, "keeps_gradient_memory", False):
    raise TypeError(
        f"{name}: {tx.name} keeps a memory of each task's gradient, which "
        f"only the per-task gradients can update. Use the stacked path: "
        f"losses, task_grads = mtl.value_and_jacobian(loss_fn)(params, ...), "
        f"then tx.update(task_grads, state, params, losses=losses).")
  if not isinstance(tx, Method):
    raise TypeError(
        f"{name}: the method must be one of optax_mtl's (an aggregator such "
        f"as mtl.mgda(), a task scaling, an alias such as mtl.dwa(...), or an "
        f"mtl.chain of them), with no optimizer chained after it; got "
        f"{type(tx).__name__}. Chain the optimizer after the gradients this "
        f"path returns.")
  return _members(tx.parts)


def _as_statistics(value) -> statistics.Statistics | None:
  if value is None or isinstance(value, statistics.Statistics):
    return value
  return statistics.Statistics(value, value.norms())


def weights_from_statistics(tx: Method, state: Any, num_tasks: int,
                            gram: Any, losses: Any,
                            kwargs: dict, name: str) -> tuple[Weights, Any]:
  """Runs ``tx``'s rules on statistics a gradient path computed itself.

  The stacked path computes the statistics from the per-task gradients; a
  path that never holds them (one backward pass, the representation path,
  the memory-lean Gramian) passes the Gramian it has, or None, and combines
  the gradients itself with the returned weights. Given one Gramian, every
  member that reads statistics reads it, so task scalings with a mask of
  their own (``layer=``) are refused; a path that computes each member's
  Gramian over its own leaves passes one per member.

  Args:
    tx: a method of this library.
    state: its state.
    num_tasks: T.
    gram: what the members read: a :class:`Gramian`, the engine's
      ``Statistics`` (a Gramian or only the norms), None when the path has
      none, or a list with one of these per member of ``tx``.
    losses: the losses (validated here), or None.
    kwargs: the other keyword arguments of ``update``.
    name: the path's public name, for messages.

  Returns:
    ``(Weights, new_state)``; ``new_state`` is what ``tx.update`` returns.

  Raises:
    TypeError: ``tx`` is not a method of this library.
    ValueError: a member reads statistics the path does not give, or has a
      mask of its own.
  """
  members = method_members(tx, name)
  for m in members:
    if m.groups is not None:
      raise ValueError(
          f"{name}: {m.weighting.name} weights each group of leaves with its "
          f"own Gramian, which this path does not compute. Use the stacked "
          f"path: losses, task_grads = mtl.value_and_jacobian(loss_fn)("
          f"params, ...), then tx.update(task_grads, state, params, "
          f"losses=losses).")
    if m.weighting.per_coordinate is not None:
      raise ValueError(
          f"{name}: {m.weighting.name} combines the task gradients coordinate "
          f"by coordinate, so it needs every task's full gradient. Use the "
          f"stacked path: losses, task_grads = mtl.value_and_jacobian("
          f"loss_fn)(params, ...), then tx.update(task_grads, state, params, "
          f"losses=losses).")
  per_member = isinstance(gram, list)
  grams = [_as_statistics(g) for g in (gram if per_member else [gram] * len(members))]
  for m, member_gram in zip(members, grams):
    kind = m.weighting.statistics
    if kind is None:
      continue
    if member_gram is None or (kind == "gramian" and member_gram.gramian is None):
      raise ValueError(
          f"{name}: {m.weighting.name} reads the {kind} of the per-task "
          f"gradients, which one backward pass does not give. Use the "
          f"stacked path: losses, task_grads = mtl.value_and_jacobian("
          f"loss_fn)(params, ...), then tx.update(task_grads, state, params, "
          f"losses=losses); or a path that computes the Gramian.")
    if not per_member and m.kind == SCALING and m.mask is not None:
      raise ValueError(
          f"{name}: {m.weighting.name} reads its statistics over its own "
          f"leaves (layer= or shared=); on this path every member reads the "
          f"same Gramian. Build it without its own mask, or use the stacked "
          f"path.")
  conflict = None
  if tx.diagnostics:
    state = _unwrap(state, name)
    if grams[-1] is None or grams[-1].gramian is None:
      raise ValueError(
          f"{name}: the method keeps diagnostics (mtl.with_diagnostics), "
          f"which read the Gramian of the task gradients; this path does not "
          f"compute it. Use value_and_gramian_grad, the representation path "
          f"or the stacked path (mtl.value_and_jacobian, then tx.update).")
    conflict = diagnostics_lib.from_gramian(grams[-1].gramian)
  _check_tasks(members, num_tasks)
  losses, kpis, extra = _vectors(members, num_tasks, losses, kwargs)
  stats = [None if m.weighting.statistics is None else
           (g.gramian if m.weighting.statistics == "gramian" else None, g.norms)
           for m, g in zip(members, grams)]
  states = _split_states(tx.parts, state, tx.single)
  scales, final, states, weights = _run(members, states, num_tasks, stats,
                                        losses, kpis, extra)
  heads = jnp.ones((num_tasks,), jnp.float32) if scales is None else scales
  if final is None:
    shared = heads
  else:
    shared = final if scales is None else scales * final
  new_state = _join_states(tx.parts, states, weights, tx.single)
  if conflict is not None:
    new_state = DiagnosedState(new_state, conflict)
  return Weights(shared, heads), new_state


def skip_if_not_finite(tx: Method, updates: Any, old_state: Any,
                       new_state: Any, losses: Any, kwargs: dict,
                       name: str) -> tuple[Any, Any]:
  """A gradient path's step under the non-finite policy of :mod:`.finite`.

  A path that combines the gradients itself applies the policy of
  ``update``: if its result, the new state or the losses or KPIs the method
  reads hold a NaN or inf, the update is zero and the state is the old one
  (``task_weights`` zeroed).

  Returns:
    ``(updates, state)`` after the policy.
  """
  members = method_members(tx, name)
  vectors = _read_vectors(members, losses, kwargs.get("kpis"))
  ok = finite.all_finite(updates, new_state, *vectors)
  return finite.zero_unless(ok, updates), finite.guard_state(ok, new_state, old_state)


def weights_from_losses(tx: Method, state: Any, losses: jax.Array, kwargs: dict,
                        name: str) -> tuple[jax.Array, Any]:
  """The weights and new state of ``tx`` from the losses alone.

  Valid for methods that read no gradient statistics and whose heads are
  weighted like the shared leaves (no ``shared=`` mask): their update is
  then ``sum_t w_t g_t`` on every leaf, the gradient of ``sum_t w_t L_t``.

  Raises:
    TypeError: ``tx`` is not a method of this library.
    ValueError: ``tx`` reads gradient statistics or has a ``shared=`` mask.
  """
  for m in method_members(tx, name):
    if m.kind == AGGREGATOR and m.mask is not None:
      raise ValueError(
          f"{name}: {m.weighting.name} was built with shared=; one backward "
          f"pass weights every leaf alike. Build it without shared= (heads "
          f"then receive w_t times their task's gradient).")
  weights, new_state = weights_from_statistics(tx, state, losses.shape[0], None,
                                               losses, kwargs, name)
  return weights.shared, new_state
