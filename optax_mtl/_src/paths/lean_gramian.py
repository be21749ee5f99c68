"""The memory-lean exact Gramian path: the T gradients never stacked.

The Gramian methods (MGDA, PCGrad, CAGrad, ...) read only the T x T Gramian
``G = J J^T`` of the per-task gradients and return ``sum_t w_t g_t``. The
stacked path (``value_and_jacobian``) holds the T gradients at once, T times
the parameters' memory. This path never does. One task (or chunk) at a time:
a VJP with cotangent ``e_t`` gives ``g_t`` (one parameter-sized buffer), and a
JVP of the loss vector along ``g_t`` (restricted to the leaves the statistics
are read over) gives the column ``J g_t = G[:, t]``. All tasks at once
(``chunk_size=None``): one batched backward pass, dense layers' blocks from
their inputs and output cotangents (``factored_gramian``), the other leaves'
blocks from their T gradients. The method's weights then come from ``G``
alone, and one weighted VJP gives the update (all tasks at once: of the
dense-layer weights; the other leaves contract their T gradients). The
loss function is linearised once (one forward pass, its residuals kept as a
VJP keeps them; in reverse mode only with ``chunk_size=None``); every VJP
and JVP reuses that linearisation.

Like TorchJD's "autogram", the Gramian is exact (the stacked path's matrix, up
to float rounding) and the gradients are never stacked.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from optax_mtl._src.core import transform
from optax_mtl._src.engine import combine
from optax_mtl._src.engine import masking
from optax_mtl._src.engine import statistics
from optax_mtl._src.paths import arguments
from optax_mtl._src.paths import canonical_convolutions
from optax_mtl._src.paths import factored_gramian
from optax_mtl._src.paths import weight_products

_NAME = "mtl.value_and_gramian_grad"
_GRAMIAN_NAME = "mtl.value_and_gramian"


def _chunk_size(chunk_size, name):
  if chunk_size is None:
    return None
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"{name}: chunk_size must be a positive int (tasks whose "
                     f"gradients are held at once) or None (all of them), got "
                     f"{chunk_size!r}.")
  return chunk_size


@contextlib.contextmanager
def _forward_mode_hint(name: str):
  """Turns JAX's forward-mode failure inside the block into this path's advice."""
  try:
    yield
  except TypeError as error:
    if "forward-mode" not in str(error):
      raise
    first_line = str(error).split("\n")[0]
    raise TypeError(
        f"{name} with a chunk_size differentiates loss_fn in forward mode "
        f"(JVPs along the task gradients) as well as in reverse mode, and "
        f"loss_fn does not support forward mode ({first_line}). Pass "
        f"chunk_size=None (all tasks at once, reverse mode only); or give the "
        f"jax.custom_vjp function a JVP rule (define it with jax.custom_jvp); "
        f"or use the stacked path: losses, task_grads = "
        f"mtl.value_and_jacobian(loss_fn)(...), then tx.update(task_grads, "
        f"state, params, losses=losses).") from None


class _Linearized:
  """One forward pass of ``loss_fn``, linearised: its VJP (and JVP) on flat leaves.

  Attributes:
    losses: [T] task losses.
    aux: ``(aux, new_rest)`` of :meth:`arguments.Call.pure`.
    leaves: the differentiated values' leaves (flattening order).
    name: the public function's name, for error messages.
  """

  def __init__(self, call: arguments.Call, loss_fn, kwargs, has_aux, name,
               forward_mode: bool):
    """``forward_mode``: linearise in forward mode (for :meth:`jvp`), not
    only in reverse mode (enough for :meth:`vjp`, and for ``jax.custom_vjp``
    functions)."""
    values = call.values
    self.name = name
    self.leaves, self._treedef = jax.tree.flatten(values)
    pure = call.pure(loss_fn, kwargs, has_aux, name)
    self._jvp = None
    if forward_mode:
      with _forward_mode_hint(name):
        self.losses, self._jvp, self.aux = jax.linearize(pure, values, has_aux=True)
      self._vjp = jax.linear_transpose(self._jvp, values)
    else:
      self.losses, self._vjp, self.aux = jax.vjp(pure, values, has_aux=True)

  def vjp(self, cotangent: jax.Array) -> list:
    """``sum_t c_t grad L_t`` as a list of leaves."""
    (grads,) = self._vjp(cotangent.astype(self.losses.dtype))
    return jax.tree.leaves(grads)

  def jvp(self, tangent_leaves: list) -> jax.Array:
    """``J v``, [T], for a tangent given as a list of leaves."""
    with _forward_mode_hint(self.name):
      return self._jvp(jax.tree.unflatten(self._treedef, tangent_leaves))


def _unit(leaves, mask, dtype):
  """``(g / ||g||, ||g||)`` over the masked leaves, without overflow or NaN.

  The norm is ``m ||g / m||`` with ``m`` the largest magnitude, so it is in
  range whenever the entries are; a zero gradient has norm 0 and a zero unit
  vector. Unmasked leaves get a zero tangent.
  """
  selected = [l for l, m in zip(leaves, mask) if m and l.size]
  safe = statistics.magnitude_divisor(selected, dtype)
  squares = jnp.zeros((), dtype)
  for leaf in selected:
    squares = squares + jnp.sum(jnp.square(leaf.astype(dtype) / safe))
  norm = safe * jnp.sqrt(squares)
  divisor = jnp.where(norm > 0, norm, 1.0)
  unit = [(l.astype(dtype) / divisor).astype(l.dtype) if m else jnp.zeros_like(l)
          for l, m in zip(leaves, mask)]
  return unit, norm


def _finish(columns, norms, dtype) -> statistics.Gramian:
  """The Gramian from ``columns[t, s] = <g_s, g_t> / n_t`` and ``norms[t] = n_t``.

  ``|columns[t, s]| <= n_s``: in range whenever the gradients are. The matrix
  is ``G / c**2`` with ``c = max_t n_t``, formed without ever squaring ``c``,
  then divided by its largest diagonal entry (1 up to rounding) so that entry
  is exactly 1, as in :func:`~optax_mtl.gramian`.
  """
  largest = jnp.max(norms)
  safe = jnp.where(largest > 0, largest, 1.0)
  return _from_raw((columns / safe) * (norms / safe)[:, None], dtype, largest)


def _from_raw(raw, dtype, unit=1.0) -> statistics.Gramian:
  """``unit**2 raw`` (raw finite), symmetrised, as its normalized matrix and scale."""
  raw = 0.5 * (raw + raw.T)
  top = jnp.max(jnp.diagonal(raw))
  positive = top > 0
  normalized = raw / jnp.where(positive, top, 1.0)
  # NaN stays NaN (a non-finite gradient), as on the stacked path.
  scale = unit * jnp.sqrt(jnp.maximum(top, 0.0))
  return statistics.Gramian(normalized.astype(dtype), scale.astype(dtype))


def _live_sets(lin: _Linearized, sets: Sequence[tuple]):
  """``(dtype, empty, live)``: the accumulation dtype, the Gramian of a set
  with no entries, and the sets that have some."""
  num_tasks = lin.losses.shape[0]
  dtype = statistics.accumulation_dtype(lin.leaves)
  empty = statistics.Gramian(jnp.zeros((num_tasks, num_tasks), dtype),
                             jnp.zeros((), dtype))
  live = [s for s in sets if any(m and l.size for l, m in zip(lin.leaves, s))]
  return dtype, empty, live


def _column_gramians(lin: _Linearized, sets: Sequence[tuple],
                     chunk_size) -> list[statistics.Gramian]:
  """The exact Gramian over each set of leaves, one task (or chunk) at a time.

  Per task: one VJP gives ``g_t``; per set S, one JVP along ``g_t^S / n_t^S``
  (``g_t`` restricted to S, zero elsewhere) gives ``G_S[:, t] / n_t^S``. The
  JVPs of several sets run vmapped.
  """
  num_tasks = lin.losses.shape[0]
  dtype, empty, live = _live_sets(lin, sets)
  if not live:
    return [empty for _ in sets]

  def column(row):
    leaves = lin.vjp(row)
    pairs = [_unit(leaves, mask, dtype) for mask in live]
    if len(live) == 1:
      ((unit, norm),) = pairs
      return lin.jvp(unit).astype(dtype)[None], norm[None]
    units = [jnp.stack(ls) for ls in zip(*(u for u, _ in pairs))]
    columns = jax.vmap(lin.jvp)(units).astype(dtype)
    return columns, jnp.stack([n for _, n in pairs])

  rows = jnp.eye(num_tasks, dtype=lin.losses.dtype)
  # The loop body is traced, then re-evaluated with its convolutions
  # rewritten: a forward-mode failure may surface only then.
  with _forward_mode_hint(lin.name):
    columns, norms = canonical_convolutions.loop_map(column, rows, chunk_size)
  # columns: [T, sets, T], norms: [T, sets].
  by_set = {s: _finish(columns[:, i], norms[:, i], dtype)
            for i, s in enumerate(live)}
  return [by_set.get(s, empty) for s in sets]


def _all_at_once(lin: _Linearized, used: Sequence[int], dtype, scales=None):
  """``factored_gramian.leaf_blocks`` of the used leaves, each task's
  cotangent ``e_t`` scaled by ``scales[t]`` if given."""
  vjp = lin.vjp if scales is None else (lambda c: lin.vjp(c * scales))
  return factored_gramian.leaf_blocks(weight_products.analyse(vjp, lin.losses),
                                      used, dtype)


def _rescaled_gramians(lin: _Linearized, live: Sequence[tuple],
                       dtype) -> list[statistics.Gramian]:
  """The Gramian of each set from its unit task gradients: in range whenever
  the gradients are, with reverse mode only.

  One task at a time, a VJP gives ``g_t`` and its norm ``n_t`` over the set
  (computed as ``m ||g_t / m||``, ``m`` its largest entry). Then all tasks at
  once with the cotangents ``e_t / n_t``: the blocks of ``u_t = g_t / n_t``,
  entries in [-1, 1], and ``G = diag(n) U diag(n)`` normalised without
  forming ``G``. A zero gradient gets a zero row and column.
  """
  def set_norms(row):
    leaves = lin.vjp(row)
    return jnp.stack([_unit(leaves, mask, dtype)[1] for mask in live])

  rows = jnp.eye(lin.losses.shape[0], dtype=lin.losses.dtype)
  norms = canonical_convolutions.loop_map(set_norms, rows)  # [T, sets]
  smallest = jnp.finfo(dtype).tiny
  grams = []
  for i, mask in enumerate(live):
    # Divisors whose inverse is a finite normal number: a norm beyond that
    # range is clipped, and the matrix rebuilt from the divisors applied.
    norm = norms[:, i]
    applied = jnp.where(norm > 0, jnp.clip(norm, smallest, 1 / smallest), 0.0)
    scales = jnp.where(applied > 0, 1 / jnp.where(applied > 0, applied, 1.0), 0.0)
    used = [j for j, (l, m) in enumerate(zip(lin.leaves, mask)) if m and l.size]
    blocks, _ = _all_at_once(lin, used, dtype, scales.astype(lin.losses.dtype))
    # <u_s, u_t> n_s = <g_s, g_t> / n_t: _finish's columns, entries <= n_s.
    grams.append(_finish(sum(blocks[j] for j in used) * applied[None, :], applied, dtype))
  return grams


def _gramians(lin: _Linearized, sets: Sequence[tuple], chunk_size
              ) -> tuple[list[statistics.Gramian], dict[int, jax.Array]]:
  """The exact Gramian over each set of leaves, and the task gradients it held.

  With ``chunk_size`` below T, one chunk of tasks at a time
  (:func:`_column_gramians`), holding no gradient past its chunk. Otherwise
  all tasks at once, leaf by leaf (``factored_gramian``: dense-layer weights
  from their inputs and the T output cotangents, other leaves from their T
  gradients, which are returned, leaf index -> [T, ...]); a Gramian that
  overflows or underflows there is computed again from the unit task
  gradients (:func:`_rescaled_gramians`), which keeps it in range.
  """
  num_tasks = lin.losses.shape[0]
  if chunk_size is not None and chunk_size < num_tasks:
    return _column_gramians(lin, sets, chunk_size), {}
  dtype, empty, live = _live_sets(lin, sets)
  if not live:
    return [empty for _ in sets], {}
  used = sorted({i for s in live for i, (l, m) in enumerate(zip(lin.leaves, s))
                 if m and l.size})
  blocks, gradients = _all_at_once(lin, used, dtype)
  zero = jnp.zeros((num_tasks, num_tasks), dtype)
  raws = [sum((blocks[i] for i in used if s[i]), zero) for s in live]
  # A zero matrix too: products of gradients below about 1e-19 (float32)
  # may have been flushed to zero.
  bad = jnp.any(jnp.stack([
      ~jnp.all(jnp.isfinite(raw)) | statistics.out_of_range(jnp.max(jnp.diagonal(raw)), dtype)
      for raw in raws]))
  grams = lax.cond(statistics.any_in_batch(bad),
                   lambda: _rescaled_gramians(lin, live, dtype),
                   lambda: [_from_raw(raw, dtype) for raw in raws])
  by_set = dict(zip(live, grams))
  return [by_set.get(s, empty) for s in sets], gradients


def _view(values, single):
  return values[0] if single else tuple(values)


def _mask_leaves(shared, values, single, name) -> tuple:
  view = _view(values, single)
  return tuple(bool(m) for m in jax.tree.leaves(
      masking.resolve_shared(shared, view, view, name)))


def value_and_gramian(
    loss_fn: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    *,
    shared: masking.SharedMask = None,
    chunk_size: int | None = 1,
) -> Callable[..., Any]:
  """The losses and the exact Gramian of the task gradients, never stacked.

  .. math::
     G_{st} = \\langle g_s, g_t \\rangle
       = \\big(J\\, g_t\\big)_s, \\qquad g_t = J^\\top e_t

  Two ways, chosen by ``chunk_size``:

  * ``chunk_size`` below T (default 1): for each task t, a VJP gives ``g_t``
    and a JVP along it (zero tangent on the leaves outside ``shared``) gives
    the column ``G[:, t]``: T VJPs and T JVPs of one linearisation, holding
    ``chunk_size`` gradients at a time instead of the stacked path's T.
  * ``chunk_size=None`` (or at least T): all tasks at once, leaf by leaf. A
    weight used once in a product ``y = x W`` (a dense layer, any
    ``dot_general``) has task gradients ``x^T d_t``, ``d_t`` the cotangent of
    ``y``, so its block is ``sum_{c,c'} (x x^T)_{cc'} (d_s d_t^T)_{cc'}``: from
    the layer's input and the T output cotangents, without the T weight
    gradients, where that is fewer multiply-adds (e.g. a batch of 128
    through 512 x 512 layers). Every other leaf (biases, convolution
    kernels) gets its T gradients, computed together as the stacked path
    computes them, and their products. One batched backward pass and no
    JVP: the fastest way, holding T cotangents per dense layer and T
    gradients of the other leaves.

  Either gives the matrix that ``mtl.gramian(task_grads, mask)`` gives on
  the stacked path, kept in range the same way (see below).

  Range: one chunk at a time, the JVP runs along the unit vector ``g_t /
  ||g_t||``, whose norm is computed as ``m ||g_t / m||`` (``m`` its largest
  entry), so each computed entry ``<g_s, g_t> / ||g_t||`` is at most
  ``||g_s||``: no overflow or underflow while the gradients themselves are in
  range (float32 gradients of 1e20 or 1e-20 give the right normalized matrix
  and scale, in one pass, where ``G`` itself would overflow or underflow).
  With ``chunk_size=None`` a Gramian that overflows or underflows (gradients
  beyond about 1e19 or below 1e-15 in float32, or all its products flushed to
  zero) is computed again from the unit gradients: the norms one task at a
  time, then the blocks of ``g_t / ||g_t||`` from the cotangents ``e_t /
  ||g_t||``, all tasks at once, with the same guarantee. A zero task gradient
  gives a zero row and column, and all-zero gradients a zero matrix with
  scale 0, never NaN. Gradients that are not finite (inf or NaN out of the
  VJP) give a non-finite Gramian, as on the stacked path. The entries are
  computed by ``loss_fn``'s own operations (in forward mode, one chunk at a
  time), so their precision is that of its matrix products (TF32 on recent
  GPUs by default; ``jax.default_matmul_precision("highest")`` for full
  float32).

  Args:
    loss_fn: function returning a [T] vector of task losses, or ``(losses,
      aux)`` with ``has_aux``. With a ``chunk_size`` it must support
      forward-mode differentiation (a ``jax.custom_vjp`` function without a
      JVP rule does not); ``chunk_size=None`` needs reverse mode only.
    argnums: which positional argument(s) to differentiate (pytrees of arrays
      or Flax NNX modules, as for ``value_and_jacobian``).
    has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
    shared: optional mask of the leaves the Gramian is over (pytree of bools,
      a prefix of the differentiated argument's structure, or a callable on
      it); default all.
    chunk_size: tasks whose gradients are computed together (vmapped), so
      about that many gradients are held at once; None for all T at once,
      dense-layer blocks factored (see above).

  Returns:
    A function with ``loss_fn``'s arguments returning ``(value, gramian)``:
    ``value`` is ``losses`` or ``(losses, aux)``, ``gramian`` a
    :class:`~optax_mtl.Gramian`. NNX modules' non-parameter state advances
    once.

  Raises:
    ValueError: ``losses`` is not a vector, ``argnums`` does not match the
      call, the mask does not match the parameters, or ``chunk_size`` is not
      a positive int.
    TypeError: ``loss_fn`` does not support forward mode (with a
      ``chunk_size``).

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> def loss_fn(w):
    ...   return jnp.stack([3.0 * w[0], 1.5 * w[1]])
    >>> losses, gram = mtl.value_and_gramian(loss_fn)(jnp.ones(2))
    >>> gram.scale, gram.normalized
    (Array(3., dtype=float32), Array([[1.  , 0.  ],
           [0.  , 0.25]], dtype=float32))

  References:
    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization",
    2024 (TorchJD and its Gramian-based "autogram" engine).
  """
  single, chosen = arguments.positions(argnums, _GRAMIAN_NAME)
  chunk_size = _chunk_size(chunk_size, _GRAMIAN_NAME)

  @functools.wraps(loss_fn)
  def wrapped(*args, **kwargs):
    call = arguments.Call(args, argnums, chosen, _GRAMIAN_NAME)
    mask = _mask_leaves(shared, call.values, single, _GRAMIAN_NAME)
    lin = _Linearized(call, loss_fn, kwargs, has_aux, _GRAMIAN_NAME,
                      forward_mode=chunk_size is not None)
    (gram,), _ = _gramians(lin, [mask], chunk_size)
    aux, new_rest = lin.aux
    call.write_back(new_rest)
    return ((lin.losses, aux) if has_aux else lin.losses), gram

  return wrapped


def _weights(method, state, lin, values, single, chunk_size, losses, kwargs):
  """The method's weights and new state, from the Gramians its members read,
  and the task gradients computing those Gramians held (leaf index ->
  [T, ...])."""
  members = transform.method_members(method, _NAME)
  num_tasks = losses.shape[0]
  # With diagnostics the last member's Gramian is wanted even if it reads none.
  masks = [None if m.weighting.statistics is None and not (
      method.diagnostics and i == len(members) - 1) else
           _mask_leaves(m.mask, values, single, m.weighting.name)
           for i, m in enumerate(members)]
  sets = list(dict.fromkeys(mask for mask in masks if mask is not None))
  grams, held = _gramians(lin, sets, chunk_size) if sets else ([], {})
  grams = dict(zip(sets, grams))
  # Each member reads the Gramian of its own leaves, as on the stacked path.
  per_member = [None if mask is None else grams[mask] for mask in masks]
  weights, new_state = transform.weights_from_statistics(
      method, state, num_tasks, per_member, losses, kwargs, _NAME)
  return weights, new_state, held


def _update(lin: _Linearized, weights, mask: tuple, held: dict) -> list:
  """``sum_t w_t g_t`` leaf by leaf (``h`` for the leaves outside ``mask``).

  A leaf whose T gradients the Gramian held (a convolution kernel, a bias)
  is their contraction with the weights, as on the stacked path; the others
  come from one weighted VJP, which then runs back only as far as they need
  (not through a convolutional trunk below the last dense layer).
  """
  rest = [i for i in range(len(lin.leaves)) if i not in held]
  leaves = dict(zip(held, combine.combine(
      weights.shared, list(held.values()), [mask[i] for i in held], weights.heads)))
  if rest:
    shared = [mask[i] for i in rest]
    if all(shared):
      full = lin.vjp(weights.shared)
    elif not any(shared):
      full = lin.vjp(weights.heads)
    else:
      both = jax.vmap(lin.vjp)(jnp.stack([weights.shared, weights.heads]))
      full = [l[0] if m else l[1] for l, m in zip(both, mask)]
    leaves.update((i, full[i]) for i in rest)
  return [leaves[i] for i in range(len(lin.leaves))]


def value_and_gramian_grad(
    loss_fn: Callable[..., Any],
    method: transform.Method,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    *,
    chunk_size: int | None = 1,
) -> Callable[..., Any]:
  """Like ``jax.value_and_grad`` for a Gramian method, without stacking gradients.

  .. math::
     G = J J^\\top \\ \\text{(column } t = J\\,(J^\\top e_t)\\text{)}, \\quad
     (w, s') = \\text{method}(s, G, L), \\quad
     \\nabla = J^\\top w = \\sum_t w_t\\, g_t

  Same update and new state as the stacked path (``value_and_jacobian``,
  then ``method.update(task_grads, state, params, losses=losses)``), for any
  method of this library whose statistics are the Gramian or the norms
  (``mgda``, ``pcgrad``, ``cagrad``, ``mgda("l2")``, ``normalize_gradients``,
  GradNorm...), loss-based and fixed weightings, and ``mtl.chain`` of task
  scalings and an aggregator. The Gramian is computed by
  :func:`value_and_gramian` (see there for its range and precision).

  Cost: one forward pass (linearised once), the Gramian (skipped when no
  member reads gradient statistics), then one weighted VJP. With
  ``chunk_size`` below T (default 1) the Gramian takes T VJPs and T JVPs
  (about 2T backward passes' work) and the peak memory is the forward's
  residuals plus a few parameter-sized buffers (``g_t``, its unit vector,
  the update; ``chunk_size`` times the first two), instead of the stacked
  path's T. With ``chunk_size=None`` it takes one batched backward pass,
  dense layers' blocks computed from their inputs and T output cotangents
  (see :func:`value_and_gramian`): faster than the stacked path on dense
  layers, holding T cotangents per dense layer and T gradients of the
  other leaves (convolution kernels: the stacked path's memory for them).
  Those other leaves then take their update from the T gradients already
  computed, ``sum_t w_t g_t`` (the gradients are held until the weights
  are known), and the weighted VJP gives only the dense layers' weights,
  so it runs back no further than they need: not through a convolutional
  trunk below the last dense layer (measured on a 2-core CPU, the CNN of
  ``benchmarks/compare_torchjd.py`` with MGDA: at T = 10 a step 233 -> 209
  ms, peak 73 -> 70 MiB; at T = 40 755 -> 684 ms, peak 195 -> 225 MiB).
  With an aggregator's ``shared=`` mask, shared leaves receive ``sum_t w_t
  g_t`` and heads ``sum_t h_t g_t`` (``h`` = ones, or the scalings'
  weights): the last VJP then runs with the two cotangents ``w`` and ``h``
  vmapped (two backward passes' work, two gradients held, one kept per
  leaf). That is exact whichever leaves each task reaches; without a mask
  (or when every leaf is shared) it is a single VJP. A chain ending with a
  task scaling is summed over tasks, as if followed by ``mtl.sum()``.

  On XLA's CPU backend the loop over tasks (any ``chunk_size`` below T) has
  its convolutions rewritten to batch-spatial-feature order first: in a loop
  body XLA:CPU would otherwise run a kernel gradient's convolution on a
  generic loop, 50-100x slower (jax-ml/jax issue 12868). The values are the
  same; GPU and TPU programs are not changed.

  Args:
    loss_fn: function returning a [T] vector of task losses, or ``(losses,
      aux)`` with ``has_aux``; with a ``chunk_size`` it must support
      forward mode (a ``jax.custom_vjp`` function needs a JVP rule), with
      ``chunk_size=None`` reverse mode is enough. Arguments at
      ``argnums`` may be pytrees of arrays or Flax NNX modules (gradients
      w.r.t. their ``nnx.Param``, returned as an ``nnx.State``; their other
      state advances once).
    method: a method of this library (aggregator, task scaling, alias or
      ``mtl.chain``) with no optimizer chained after it. Each member reads
      its statistics over its own leaves, as on the stacked path: the
      aggregator over its ``shared=`` leaves, a task scaling over every leaf
      or its own mask (``layer=``, ``shared=``); each distinct set of leaves
      costs one more JVP per task (vmapped with the others).
    argnums: which positional argument(s) of ``loss_fn`` to differentiate.
    has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
    chunk_size: tasks whose gradients are computed together for the Gramian
      (vmapped: memory grows with it); None for all T at once, dense-layer
      blocks factored.

  Returns:
    A function ``(state, *args, method_args=None, **kwargs) -> (value, grads,
    new_state)``: ``value`` is ``losses`` or ``(losses, aux)``, ``grads`` has
    the structure of the differentiated argument(s) (a tuple for a sequence
    ``argnums``), ``new_state`` is what ``method.update`` returns and
    ``method_args`` a dict of its extra keywords (e.g. ``{"kpis": k}``).
    ``kwargs`` go to ``loss_fn``.

  Raises:
    TypeError: ``method`` is not a method of this library (at construction),
      or ``loss_fn`` does not support forward mode (with a ``chunk_size``).
    ValueError: ``losses`` is not a vector, ``chunk_size`` is invalid, or a
      ``shared=`` mask does not match the parameters.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> def loss_fn(params, x):
    ...   return jnp.stack([jnp.sum(params["w"] * x), jnp.sum(params["w"] ** 2)])
    >>> tx = mtl.mgda()
    >>> step = mtl.value_and_gramian_grad(loss_fn, tx)
    >>> params = {"w": jnp.array([1.0, 0.0])}
    >>> losses, grads, state = step(tx.init(params), params, jnp.array([0.0, 1.0]))
    >>> [round(float(v), 4) for v in grads["w"]]  # min-norm of (0, 1), (2, 0)
    [0.4, 0.8]

  References:
    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization",
    2024 (TorchJD's "autogram"). Sener & Koltun, "Multi-Task Learning as
    Multi-Objective Optimization", NeurIPS 2018.
  """
  transform.method_members(method, _NAME)
  single, chosen = arguments.positions(argnums, _NAME)
  chunk_size = _chunk_size(chunk_size, _NAME)
  last = transform.method_members(method, _NAME)[-1]
  combine_mask = last.mask if last.kind == transform.AGGREGATOR else None

  @functools.wraps(loss_fn)
  def wrapped(state, *args, method_args=None, **kwargs):
    call = arguments.Call(args, argnums, chosen, _NAME + " (after the method state)")
    mask = _mask_leaves(combine_mask, call.values, single, last.weighting.name)
    lin = _Linearized(call, loss_fn, kwargs, has_aux, _NAME,
                      forward_mode=chunk_size is not None)
    losses = lin.losses
    weights, new_state, held = _weights(method, state, lin, call.values, single,
                                        chunk_size, lax.stop_gradient(losses),
                                        dict(method_args or {}))
    leaves = _update(lin, weights, mask, held)
    grads = jax.tree.unflatten(jax.tree.structure(call.values), leaves)
    grads, new_state = transform.skip_if_not_finite(
        method, grads, state, new_state, losses, dict(method_args or {}), _NAME)
    aux, new_rest = lin.aux
    call.write_back(new_rest)
    value = (losses, aux) if has_aux else losses
    return value, _view(grads, single), new_state

  return wrapped
