"""The stacked exact path: one forward pass, then T backward passes.

Dense-layer weights are the exception: their T gradients ``x^T d_t`` come from
one batched product of the layer input with the T output cotangents
(``weight_products``), laid out with the task axis leading. Stacking T
separately computed gradients would copy every one of them; the batched
product writes them in place and runs as one large matrix product.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from optax_mtl._src.engine import hyperparams
from optax_mtl._src.engine import platform
from optax_mtl._src.engine import validation
from optax_mtl._src.paths import arguments
from optax_mtl._src.paths import canonical_convolutions
from optax_mtl._src.paths import weight_products

_NAME = "mtl.value_and_jacobian"


# Up to this many tasks, CPU runs the backward passes one after another (a
# Python loop): compile time grows with T, so beyond it they are vmapped.
_CPU_UNROLL_MAX_TASKS = 64


def _unrolled(vjp_fn, eye):
  """The rows one backward pass at a time, stacked.

  XLA:CPU runs a vmapped convolution backward pass as a grouped convolution,
  about 2x slower (and with about 2x the temporary memory) than T ordinary
  ones.
  """
  rows = [vjp_fn(eye[t])[0] for t in range(eye.shape[0])]
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *rows)


def _vmapped(vjp_fn, eye):
  (grads,) = jax.vmap(vjp_fn)(eye)
  return grads


def backward_passes(vjp_fn, num_tasks: int, dtype, chunk_size: int | None,
                    unroll_on_cpu: bool = True):
  """``vjp_fn`` (a row to a 1-tuple of a pytree) on the T rows of the identity,
  stacked: all at once or ``chunk_size`` tasks at a time. All at once, with
  ``unroll_on_cpu``, CPU runs the passes one after another (up to 64 tasks)."""
  eye = jnp.eye(num_tasks, dtype=dtype)
  if chunk_size is None or chunk_size >= num_tasks:
    if num_tasks > _CPU_UNROLL_MAX_TASKS or not unroll_on_cpu:
      return _vmapped(vjp_fn, eye)
    return platform.dependent(
        eye, cpu=functools.partial(_unrolled, vjp_fn),
        default=functools.partial(_vmapped, vjp_fn))
  chunks = -(-num_tasks // chunk_size)
  # Padding rows are zero cotangents; their (zero) gradients are dropped.
  padded = jnp.zeros((chunks * chunk_size, num_tasks), dtype).at[:num_tasks].set(eye)
  (grads,) = canonical_convolutions.loop_map(
      jax.vmap(vjp_fn), padded.reshape(chunks, chunk_size, num_tasks))
  return jax.tree.map(
      lambda g: g.reshape((chunks * chunk_size,) + g.shape[2:])[:num_tasks], grads)


def _batched_is_lean(analysis: weight_products.Analysis, index: int) -> bool:
  """Whether the broadcast input and the T cotangents of a product take no
  more memory than its T gradients (not so for a token-wise layer over many
  tokens, whose cotangents outweigh its weight)."""
  product = analysis.products[index]
  leaf = analysis.jaxpr.jaxpr.outvars[index]
  return product.x.aval.size + product.d.aval.size <= leaf.aval.size


def all_tasks(analysis: weight_products.Analysis, gradients: Sequence[int],
              factors: Sequence[int] = (),
              unroll_on_cpu: bool | None = None) -> tuple[dict, dict]:
  """Every task's gradient of some leaves, the factors of others.

  Args:
    analysis: the VJP's weight products.
    gradients: leaves whose T gradients are wanted. Products are computed
      as one batched product where that holds no more memory
      (:func:`_batched_is_lean`), the others by the backward passes.
    factors: product leaves whose input ``x`` and T cotangents ``d`` are
      wanted instead.
    unroll_on_cpu: whether CPU runs the backward passes one after another;
      None: when they go through a convolution. (Measured on a 2-core CPU,
      MLP 512 x 4 at T = 10: a step with batched weight gradients takes 36 ms
      from vmapped passes, 51 ms from unrolled ones.)

  Returns:
    ``(gradients, factors)``: leaf index -> [T, ...] gradients, and leaf index
    -> ``(x, d)`` with ``d`` [T, ...]. One evaluation gives the inputs, one set
    of T backward passes the cotangents and every other gradient.
  """
  jaxpr = analysis.jaxpr.jaxpr
  (cotangent,) = jaxpr.invars
  batched = [i for i in gradients
             if i in analysis.products and _batched_is_lean(analysis, i)]
  direct = [i for i in gradients if i not in batched]
  products = [analysis.products[i] for i in (*factors, *batched)]
  inputs = analysis.inputs(products)
  if unroll_on_cpu is None:
    unroll_on_cpu = analysis.has_convolution()
  rows = backward_passes(
      analysis.row_fn([p.d for p in products] + [jaxpr.outvars[i] for i in direct]),
      analysis.num_tasks, cotangent.aval.dtype, None, unroll_on_cpu)
  cotangents = dict(zip((*factors, *batched), zip(inputs, rows)))
  out = {i: weight_products.every_task(analysis.products[i], *cotangents[i])
         for i in batched}
  out.update(zip(direct, rows[len(products):]))
  return out, {i: cotangents[i] for i in factors}


def _all_at_once(vjp_fn, cotangent: jax.Array):
  """What ``backward_passes`` gives on all T rows at once, dense-layer
  weights from batched products."""
  structure = []

  def leaves(row):
    (grads,) = vjp_fn(row)
    flat, tree = jax.tree.flatten(grads)
    structure.append(tree)  # read from the one trace analyse makes
    return flat

  analysis = weight_products.analyse(leaves, cotangent)
  indices = range(len(analysis.jaxpr.jaxpr.outvars))
  grads, _ = all_tasks(analysis, indices)
  return jax.tree.unflatten(structure[0], [grads[i] for i in indices])


def stacked(vjp_fn, losses: jax.Array, chunk_size: int | None):
  """Every task's gradient, stacked: ``vjp_fn`` (a [T] cotangent to a 1-tuple
  of a pytree) on the rows of the identity, dense-layer weights from batched
  products when all tasks run at once."""
  num_tasks = losses.shape[0]
  # Under an explicit-sharding mesh the batched products would need output
  # shardings of their own; there the backward passes give every leaf.
  if (chunk_size is None or chunk_size >= num_tasks) and (
      jax.sharding.get_abstract_mesh().empty):
    return _all_at_once(vjp_fn, losses)
  return backward_passes(vjp_fn, num_tasks, losses.dtype, chunk_size)


def value_and_jacobian(
    loss_fn: Callable[..., Any],
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    *,
    chunk_size: int | None = None,
) -> Callable[..., Any]:
  """Like ``jax.value_and_grad`` for a loss function returning T task losses.

  .. math::
     (L(\\theta), J) \\quad\\text{with}\\quad
     L \\in \\mathbb{R}^T,\\ J_t = \\nabla_\\theta L_t

  One forward pass builds the VJP; the T backward passes are ``jax.vmap``-ed
  over the rows of the identity (on CPU, through convolutions and for up to
  64 tasks, run one after another: XLA:CPU's batched convolution gradients
  are about 2x slower than T plain ones), so the per-task gradients come out
  stacked: every leaf has shape ``(T, *param_shape)``, the layout every
  transformation of this library takes. A dense layer's weight (used once,
  in a ``dot_general`` with the layer input) gets its T gradients from one
  batched product of that input with the T cotangents of the layer output,
  which writes them in this layout directly (when the cotangents take no
  more memory than the gradients: not for a token-wise layer over many more
  tokens than its width).

  Arguments at ``argnums`` may be pytrees of arrays or Flax NNX modules. For a
  module, the gradients are taken with respect to its ``nnx.Param`` variables
  and returned as an ``nnx.State`` (as ``nnx.grad`` does); its other state
  (BatchNorm statistics, Dropout RNG counters) is updated in place, once, as
  in a single forward pass. Modules passed at other positions are updated too.

  ``chunk_size`` bounds the peak memory of the backward passes: the tasks are
  processed ``chunk_size`` at a time (``lax.map`` over chunks of the identity
  cotangents), so the intermediate buffers of only that many backward passes
  are live at once; the result is the same.

  Args:
    loss_fn: function returning a [T] vector of per-task losses (a list or
      tuple of scalars is stacked), or ``(losses, aux)`` with ``has_aux``.
    argnums: which positional argument(s) to differentiate.
    has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
    chunk_size: optional number of tasks whose backward passes run together
      (a positive int; None: all T at once).

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
  single, chosen = arguments.positions(argnums, _NAME)
  if chunk_size is not None:
    hyperparams.integer(chunk_size, _NAME, "chunk_size")

  @functools.wraps(loss_fn)
  def wrapped(*args, **kwargs):
    call = arguments.Call(args, argnums, chosen, _NAME)
    losses, vjp_fn, (aux, new_rest) = jax.vjp(
        call.pure(loss_fn, kwargs, has_aux, _NAME), call.values, has_aux=True)
    grads = stacked(vjp_fn, losses, chunk_size)
    call.write_back(new_rest)
    validation.num_tasks(grads, _NAME)
    task_grads = grads[0] if single else tuple(grads)
    return ((losses, aux) if has_aux else losses), task_grads

  return wrapped
