"""PCGrad: project each task gradient off the ones it conflicts with."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams
from optax_mtl._src.engine import masking

_METHOD = "mtl.pcgrad"
REDUCTIONS = ("sum", "mean")


class PCGradState(NamedTuple):
  """State of :func:`pcgrad`.

  Attributes:
    task_weights: [T] effective weights of the last update, ``update = sum_t
      w_t g_t`` (None without ``num_tasks``).
    key: uint32 raw PRNG key data (``jax.random.key_data``), split at every
      update; raw data keeps the state a plain, checkpointable array.
  """
  task_weights: jax.Array
  key: jax.Array


# Compiled once per shape, so eager updates do not retrace the scan.
@jax.jit
def projection_coefficients(gram_matrix: jax.Array, orders: jax.Array) -> jax.Array:
  """PCGrad's projected gradients as combinations of the original ones.

  Row i of the result holds ``c_i`` with ``g_i^PC = sum_j c_ij g_j``. Starting
  from ``c_i = e_i``, for each ``j != i`` in the order ``orders[i]``:
  ``p = <g_i^PC, g_j> = (c_i G)_j``; if ``p < 0``, ``c_i <- c_i - p / G_jj
  e_j``. Rows are independent (vmapped over i).

  Args:
    gram_matrix: [T, T] Gramian (any global scale).
    orders: [T, T] int, row i a permutation of the tasks (i itself skipped).

  Returns:
    [T, T] float32 coefficients.
  """
  gram_matrix = jnp.asarray(gram_matrix, jnp.float32)
  num = gram_matrix.shape[0]
  eye = jnp.eye(num, dtype=jnp.float32)

  def row(i, order):
    def visit(coeffs, j):
      dot = coeffs @ gram_matrix[:, j]
      norm_sq = gram_matrix[j, j]
      conflict = (dot < 0) & (norm_sq > 0) & (j != i)
      factor = jnp.where(conflict, dot / jnp.where(norm_sq > 0, norm_sq, 1.0), 0.0)
      return coeffs - factor * eye[j], None
    coeffs, _ = lax.scan(visit, eye[i], order, unroll=True)
    return coeffs

  return jax.vmap(row)(jnp.arange(num), orders)


def pcgrad(
    seed: int = 0,
    reduction: str = "sum",
    *,
    num_tasks: int | None = None,
    shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """PCGrad (gradient surgery): projects away conflicting components.

  For each task i, the other tasks j are visited in a fresh random order and

  .. math::
     g_i^{PC} \\leftarrow g_i^{PC}
       - \\frac{\\min(\\langle g_i^{PC}, g_j\\rangle, 0)}{\\|g_j\\|^2} g_j ,
     \\qquad \\text{update} = \\sum_i g_i^{PC}

  (``reduction="mean"`` divides by T). Every ``g_i^PC`` stays a combination
  of the original gradients, so the projections are done on coefficient
  vectors with the Gramian (vmapped over i) and the gradients are combined
  once. Gradients that conflict with no other task are left untouched.
  Task-specific leaves (``shared=``) are summed, as in the authors' code.
  ``mtl.layerwise(mtl.pcgrad())`` projects layer by layer instead.

  Args:
    seed: seed of the random visiting orders; the key lives in the state and
      is split at every update.
    reduction: ``"sum"`` (Algorithm 1) or ``"mean"``.
    num_tasks: optional T; when given, the state keeps the effective weights
      of the last update in ``task_weights``.
    shared: optional mask of shared leaves (pytree of bools or callable on
      params); other leaves are task-specific heads, summed over tasks.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` aggregator whose state is a
    :class:`PCGradState`.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.pcgrad()
    >>> task_grads = {"w": jnp.array([[1.0, 1.0], [-1.0, 0.0]])}
    >>> update, state = tx.update(task_grads, tx.init(None))
    >>> update["w"]
    Array([-0.5,  1.5], dtype=float32)

  References:
    Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for
    Multi-Task Learning", NeurIPS 2020 (Algorithm 1).
  """
  hyperparams.choice(reduction, REDUCTIONS, _METHOD, "reduction")
  hyperparams.seed(seed, _METHOD)

  def init(size):
    return PCGradState(weighting.initial_weights(size),
                       jax.random.key_data(jax.random.key(seed)))

  def rule(inputs, state):
    num = inputs.num_tasks
    key, step_key = jax.random.split(jax.random.wrap_key_data(state.key))
    orders = jax.vmap(lambda k: jax.random.permutation(k, num))(
        jax.random.split(step_key, num))
    coeffs = projection_coefficients(inputs.gramian.normalized, orders)
    weights = jnp.sum(coeffs, axis=0)
    if reduction == "mean":
      weights = weights / num
    return weights, state._replace(key=jax.random.key_data(key))

  return transform.aggregator(weighting.Weighting(
      name=_METHOD, rule=rule, init=init, reads={"gramian"},
      num_tasks=hyperparams.num_tasks(num_tasks, _METHOD, required=False),
      claims={"homogeneous"}), shared=shared)
