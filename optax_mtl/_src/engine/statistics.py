"""Statistics of the per-task gradients: the T x T Gramian, or only its diagonal.

``G[t, s] = <g_t, g_s>`` summed over a set of leaves (the shared ones, or a
layer), one contraction per leaf. A step may need statistics over several
sets (a task scaling restricted to one layer, an aggregator over the whole
trunk): each leaf is still read once, its [T, T] block (or, when only norms
are asked for, its [T] squared norms) computed once and summed into every
set that holds it. The gradients are never flattened into one vector
(``ravel_pytree`` would concatenate, and so all-gather, sharded leaves).

Accumulation is in float32 for float32 and narrower gradients, in float64 for
float64 gradients (under ``jax_enable_x64``). Results that leave that range
(gradients around 1e20 in float32, or norms below 1e-15) are recomputed on
the gradients divided by their largest magnitude; that second pass runs only
when needed, also under ``vmap`` (see :func:`any_in_batch`).
"""

from __future__ import annotations

import functools

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import custom_batching
from jax import lax

from optax_mtl._src.engine import native
from optax_mtl._src.engine import platform
from optax_mtl._src.engine import sharding


class Gramian(NamedTuple):
  """The Gramian of the task gradients, kept in range.

  Attributes:
    normalized: [T, T], ``G / scale**2``; its largest diagonal entry is 1 (all
      zeros when every task gradient is zero). float32, or float64 for
      float64 gradients.
    scale: scalar, the largest task-gradient norm ``sqrt(max_t G_tt)``, so
      ``G = scale**2 * normalized`` even when ``scale**2`` would overflow.
  """
  normalized: jax.Array
  scale: jax.Array

  def norms(self) -> jax.Array:
    """Per-task gradient norms ``||g_t||``, [T], without overflow."""
    return self.scale * jnp.sqrt(jnp.maximum(jnp.diagonal(self.normalized), 0.0))

  def scaled(self, factors: jax.Array) -> "Gramian":
    """The Gramian ``D G D`` of the gradients ``factors[t] * g_t``.

    Computed on the T x T matrix alone, kept in range whatever the factors'
    magnitude (they are divided by their largest entry first).
    """
    factors = factors.astype(self.normalized.dtype)
    largest = jnp.max(jnp.abs(factors))
    unit = factors / jnp.where(largest > 0, largest, 1.0)
    matrix = self.normalized * unit[:, None] * unit[None, :]
    top = jnp.max(jnp.diagonal(matrix))
    safe = jnp.where(top > 0, top, 1.0)
    return Gramian(matrix / safe, self.scale * largest * jnp.sqrt(top))


# Below this largest squared norm, products of float32 gradient entries start
# to underflow; float64 gradients have their own bound.
TINY_SQUARED_NORM = {jnp.dtype(jnp.float32): 1e-30,
                      jnp.dtype(jnp.float64): 1e-290}
# Above this one, its reciprocal (XLA divides by a scalar as a product with
# it) is subnormal, which the CPU flushes to zero: the normalised Gramian
# would come out zero.
HUGE_SQUARED_NORM = {jnp.dtype(jnp.float32): 1e30,
                     jnp.dtype(jnp.float64): 1e290}


def out_of_range(top: jax.Array, dtype) -> jax.Array:
  """Whether a largest squared norm ``top`` needs the rescue pass: too small
  or too large to normalise by in ``dtype``."""
  dtype = jnp.dtype(dtype)
  return (top < TINY_SQUARED_NORM[dtype]) | (top > HUGE_SQUARED_NORM[dtype])


@custom_batching.custom_vmap
def any_in_batch(flag: jax.Array) -> jax.Array:
  """``flag`` itself; under ``vmap``, whether it is True for any batch member.

  A ``lax.cond`` whose predicate is batched becomes a select that runs both
  branches. The rescue pass is wanted only when some member needs it, so its
  predicate goes through this function: the result is unbatched, the cond
  stays a cond, and each member then picks its own result with a select.
  """
  return flag


@any_in_batch.def_vmap
def _any_in_batch_rule(axis_size, in_batched, flag):
  del axis_size
  (batched,) = in_batched
  return any_in_batch(jnp.any(flag) if batched else flag), False


class Request(NamedTuple):
  """Statistics wanted over one set of leaves.

  Attributes:
    mask: tuple of Python bools, one per gradient leaf (flattening order).
    gramian: True for the full T x T Gramian, False for the norms alone.
  """
  mask: tuple
  gramian: bool


class Statistics(NamedTuple):
  """What one request produced: the Gramian (if asked for) and the norms."""
  gramian: Gramian | None
  norms: jax.Array


def magnitude_divisor(leaves: Sequence[jax.Array], dtype) -> jax.Array:
  """The largest ``|entry|`` of ``leaves`` in ``dtype``; 1 when there is none
  but zeros (empty leaves included): a divisor that brings the entries to
  [-1, 1] without turning zeros into NaN."""
  largest = jnp.zeros((), dtype)
  for leaf in leaves:
    largest = jnp.maximum(largest, jnp.max(jnp.abs(leaf), initial=0).astype(dtype))
  return jnp.where(largest > 0, largest, 1.0)


def accumulation_dtype(leaves: Sequence[jax.Array]):
  """float64 when any leaf is float64, else float32."""
  dtype = jnp.dtype(jnp.float32)
  for leaf in leaves:
    dtype = jnp.promote_types(dtype, leaf.dtype)
  return jnp.dtype(jnp.float64) if dtype == jnp.float64 else jnp.dtype(jnp.float32)


# Columns of a [T, n] leaf per step of the CPU Gramian loop: a [T, chunk]
# block and its transpose stay in the core's cache (measured on a 2-core
# AVX-512 machine: 8192 columns up to 1.5x faster than 4096 at T = 10, no
# slower at T = 40).
CPU_CHUNK = 8192

# Above this many tasks a block is transposed ROWS_PER_GROUP rows at a time.
# A leaf whose rows are a power of two of bytes apart (a [T, 512, 512] weight
# gradient) maps every row of a [T, chunk] block to the same cache sets, and
# a transpose reading all T rows at once thrashes them (measured on a 2-core
# Zen 4 machine: four [40, 131072] leaves 51 ms in one transpose, 22 ms in
# groups of 4; [40, 125000] leaves on par; at T = 10 one transpose is faster).
GROUPED_ABOVE_TASKS = 16
ROWS_PER_GROUP = 4


def _portable_block(leaf, dtype, divisor):
  if divisor is not None:
    leaf = leaf.astype(dtype) / divisor
  dims = tuple(range(1, leaf.ndim))
  return lax.dot_general(
      leaf, leaf, ((dims, dims), ((), ())),
      precision=lax.Precision.HIGHEST,
      preferred_element_type=dtype,
      **sharding.replicated_out(leaf))


def _cpu_block(leaf, dtype, divisor):
  """The Gramian block of one leaf on XLA's CPU backend.

  The compiled kernel (:mod:`~optax_mtl._src.engine.native`) where it
  applies. Otherwise the pure-JAX form: XLA's CPU dot of a [T, n] matrix
  with itself over the long axis runs about 3x slower than the same product
  laid out as [n, T], so the columns are taken in cache-sized blocks, each
  transposed to [chunk, T] and contracted over its leading axis, the T x T
  partial products summed.
  """
  num_tasks = leaf.shape[0]
  flat = leaf.reshape(num_tasks, -1)
  if native.applies([leaf], dtype, (divisor,)):
    return native.gramian(flat)
  steps = flat.shape[1] // CPU_CHUNK

  def gram(block):
    if divisor is not None:
      block = block.astype(dtype) / divisor
    # The barriers keep the transposes physical; folded into the dot, they
    # would give back the slow layout.
    if num_tasks > GROUPED_ABOVE_TASKS:
      columns = jnp.concatenate(
          [lax.optimization_barrier(block[i:i + ROWS_PER_GROUP].T)
           for i in range(0, num_tasks, ROWS_PER_GROUP)], axis=1)
    else:
      columns = lax.optimization_barrier(block.T)
    return lax.dot_general(columns, columns, (((0,), (0,)), ((), ())),
                           preferred_element_type=dtype)

  def body(i, total):
    block = lax.dynamic_slice_in_dim(flat, i * CPU_CHUNK, CPU_CHUNK, axis=1)
    return total + gram(block)

  total = lax.fori_loop(0, steps, body, jnp.zeros((num_tasks, num_tasks), dtype))
  rest = flat[:, steps * CPU_CHUNK:]
  return total + gram(rest) if rest.shape[1] else total


def _leaf_block(leaf, dtype, divisor):
  portable = lambda x: _portable_block(x, dtype, divisor)
  # Blocks of a sharded leaf would be gathered; small leaves gain nothing.
  if (leaf.size < 4 * CPU_CHUNK * leaf.shape[0] or sharding.replicated_out(leaf)
      or not jax.sharding.get_abstract_mesh().empty):
    return portable(leaf)
  return platform.dependent(
      leaf, cpu=lambda x: _cpu_block(x, dtype, divisor), default=portable)


def leaf_gramian(leaf: jax.Array, dtype) -> jax.Array:
  """The raw [T, T] Gramian of one [T, ...] leaf, accumulated in ``dtype``."""
  return _leaf_block(leaf, dtype, None)


def _leaf_squares(leaf, dtype, divisor):
  values = leaf.astype(dtype)
  if divisor is not None:
    values = values / divisor
  return jnp.sum(jnp.square(values), axis=tuple(range(1, leaf.ndim)))


def _raw(leaves, requests, dtype, divisors):
  """Per request: the raw [T, T] Gramian or [T] squared norms."""
  num_tasks = leaves[0].shape[0]
  full = [any(r.gramian and r.mask[i] for r in requests) for i in range(len(leaves))]
  cache = {}

  def piece(i, divisor_id, want_block):
    key = (i, divisor_id)
    if key not in cache:
      divisor = divisors[divisor_id] if divisor_id is not None else None
      cache[key] = (_leaf_block if full[i] else _leaf_squares)(leaves[i], dtype, divisor)
    value = cache[key]
    return value if want_block or not full[i] else jnp.diagonal(value)

  out = []
  for index, request in enumerate(requests):
    divisor_id = index if divisors is not None else None
    shape = (num_tasks, num_tasks) if request.gramian else (num_tasks,)
    total = jnp.zeros(shape, dtype)
    for i, selected in enumerate(request.mask):
      if selected:
        total = total + piece(i, divisor_id, request.gramian)
    out.append(total)
  return out


def _diagonal(raw, request):
  return jnp.diagonal(raw) if request.gramian else raw


def task_statistics(task_grads: Any, requests: Sequence[Request]) -> list[Statistics]:
  """Computes every request's statistics, each leaf read once.

  Args:
    task_grads: pytree whose leaves have a leading task axis T.
    requests: the sets of leaves and what each needs.

  Returns:
    One :class:`Statistics` per request, in order.
  """
  return list(_task_statistics(task_grads, tuple(requests)))


# Compiled once per structure: eagerly, the rescue cond's branches are new
# closures at every call and would otherwise be traced and compiled anew.
@functools.partial(jax.jit, static_argnums=1)
def _task_statistics(task_grads: Any, requests: tuple) -> list[Statistics]:
  leaves = jax.tree.leaves(task_grads)
  dtype = accumulation_dtype(leaves)
  raws = _raw(leaves, requests, dtype, None)
  tops = [jnp.max(_diagonal(raw, r)) for raw, r in zip(raws, requests)]
  # A set with no leaves is zero by construction and needs no rescue.
  bad = [(~jnp.all(jnp.isfinite(raw)) | out_of_range(top, dtype)) if any(r.mask)
         else jnp.zeros((), bool) for raw, top, r in zip(raws, tops, requests)]

  def rescue(raws):
    divisors = [magnitude_divisor([l for l, m in zip(leaves, r.mask) if m], dtype)
                for r in requests]
    scaled = _raw(leaves, requests, dtype, divisors)
    return ([jnp.where(b, s, r) for b, s, r in zip(bad, scaled, raws)],
            [jnp.where(b, d, 1.0).astype(dtype) for b, d in zip(bad, divisors)])

  def keep(raws):
    return raws, [jnp.ones((), dtype) for _ in requests]

  needed = any_in_batch(jnp.any(jnp.stack(bad))) if requests else False
  raws, multipliers = lax.cond(needed, rescue, keep, raws)

  results = []
  for raw, multiplier, request in zip(raws, multipliers, requests):
    top = jnp.max(_diagonal(raw, request))
    safe = jnp.where(top > 0, top, 1.0)
    scale = multiplier * jnp.sqrt(jnp.maximum(top, 0.0))
    normalized = raw / safe
    norms = scale * jnp.sqrt(jnp.maximum(_diagonal(normalized, request), 0.0))
    gram = Gramian(normalized, scale) if request.gramian else None
    results.append(Statistics(gram, norms))
  return results


def gramian(task_grads: Any, mask: Any | None = None) -> Gramian:
  """Computes the Gramian of the per-task gradients over the shared leaves.

  .. math::
     G_{ts} = \\sum_{\\text{shared leaves } \\ell} \\langle g_t^\\ell, g_s^\\ell \\rangle

  One pass over the gradients in the common case. When the result leaves the
  accumulation dtype's range (float32 gradients around 1e20, or norms below
  1e-15) a second pass on the gradients divided by their largest entry gives
  the same matrix up to the factor returned in ``scale``.

  Args:
    task_grads: pytree whose leaves have a leading task axis T (any floating
      dtype; bf16 and fp16 are accumulated in float32, float64 in float64).
    mask: optional pytree of Python bools with the structure of
      ``task_grads``; only leaves marked True enter the Gramian.

  Returns:
    A :class:`Gramian` (normalized matrix and scale).

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> g = mtl.gramian({"w": jnp.array([[3.0, 0.0], [0.0, 1.5]])})
    >>> g.scale, g.normalized
    (Array(3., dtype=float32), Array([[1.  , 0.  ],
           [0.  , 0.25]], dtype=float32))
  """
  leaves = jax.tree.leaves(task_grads)
  selected = (tuple(True for _ in leaves) if mask is None
              else tuple(bool(m) for m in jax.tree.leaves(mask)))
  (stats,) = task_statistics(task_grads, [Request(selected, True)])
  return stats.gramian
