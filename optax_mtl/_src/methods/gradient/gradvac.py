"""GradVac: pull each task gradient toward an adaptive cosine target."""

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

_METHOD = "mtl.gradvac"
# A target cosine of 1 asks for an infinitely long step along g_j (the
# correction has sqrt(1 - target^2) in its denominator); targets are used up
# to this value, which bounds the correction by about 700 ||g_i|| / ||g_j||.
_TARGET_CAP = 1.0 - 1e-6


class GradVacState(NamedTuple):
  """State of :func:`gradvac`.

  Attributes:
    task_weights: [T] effective weights of the last update, ``update = sum_t
      w_t g_t``.
    targets: [T, T] float32 EMA targets ``phihat_ij`` of the cosine between
      task i's corrected gradient and task j's gradient (row i, column j;
      the diagonal is unused and stays 0). They start at 0.
    key: uint32 raw PRNG key data (``jax.random.key_data``), split at every
      update; raw data keeps the state a plain, checkpointable array.
  """
  task_weights: jax.Array
  targets: jax.Array
  key: jax.Array


# Compiled once per shape, so eager updates do not retrace the scan.
@jax.jit
def vaccine_coefficients(gram_matrix: jax.Array, targets: jax.Array,
                         orders: jax.Array, beta) -> tuple[jax.Array, jax.Array]:
  """GradVac's corrected gradients as combinations of the original ones.

  Row i of the coefficients holds ``c_i`` with ``g_i^PC = sum_k c_ik g_k``.
  Starting from ``c_i = e_i``, for each ``j != i`` in the order ``orders[i]``,
  with ``Gc = G c_i`` kept up to date:

  * ``phi = <g_i^PC, g_j> / (||g_i^PC|| ||g_j||) = (Gc)_j / sqrt(c_i.Gc G_jj)``;
  * if ``phi < phihat_ij``: ``c_ij += ||g_i^PC|| (phihat sqrt(1 - phi^2) -
    phi sqrt(1 - phihat^2)) / (||g_j|| sqrt(1 - phihat^2))``;
  * ``phihat_ij <- (1 - beta) phihat_ij + beta phi`` (with the cosine measured
    before the correction, as in Algorithm 1).

  A pair where either gradient is zero has no cosine: it is skipped and its
  target kept. Rows only read and write their own targets, so they are
  independent (vmapped over i).

  Args:
    gram_matrix: [T, T] Gramian (any global scale).
    targets: [T, T] targets ``phihat`` before this step.
    orders: [T, T] int, row i a permutation of the tasks (i itself skipped).
    beta: EMA rate of the targets, in [0, 1].

  Returns:
    ``(coefficients, new_targets)``, both [T, T] float32.
  """
  gram = jnp.asarray(gram_matrix, jnp.float32)
  targets = jnp.asarray(targets, jnp.float32)
  beta = jnp.asarray(beta, jnp.float32)
  num = gram.shape[0]
  eye = jnp.eye(num, dtype=jnp.float32)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))

  def row(i, order, target_row):
    def visit(carry, j):
      coeffs, gc, target_row = carry
      norm_i = jnp.sqrt(jnp.maximum(coeffs @ gc, 0.0))
      norm_j = norms[j]
      valid = (j != i) & (norm_i > 0) & (norm_j > 0)
      phi = jnp.clip(gc[j] / jnp.where(valid, norm_i * norm_j, 1.0), -1.0, 1.0)
      target = target_row[j]
      aim = jnp.minimum(target, _TARGET_CAP)
      sin_phi = jnp.sqrt(jnp.maximum(1.0 - phi * phi, 0.0))
      sin_aim = jnp.sqrt(jnp.maximum(1.0 - aim * aim, 0.0))
      # aim = -1 only when phi < aim is impossible; the guard keeps 0/0 out.
      correct = valid & (phi < aim)
      denom = jnp.where(correct, norm_j * sin_aim, 1.0)
      denom = jnp.where(denom > 0, denom, 1.0)
      factor = jnp.where(correct,
                         norm_i * (aim * sin_phi - phi * sin_aim) / denom, 0.0)
      coeffs = coeffs + factor * eye[j]
      gc = gc + factor * gram[:, j]
      target_row = target_row.at[j].set(
          jnp.where(valid, (1.0 - beta) * target + beta * phi, target))
      return (coeffs, gc, target_row), None

    # Two visits per loop trip: half the trips of a rolled loop (each costs
    # ~20 us on a GPU) at a fraction of the compile time of a full unroll.
    (coeffs, _, target_row), _ = lax.scan(visit, (eye[i], gram[i], target_row),
                                          order, unroll=2)
    return coeffs, target_row

  return jax.vmap(row)(jnp.arange(num), orders, targets)


def gradvac(
    beta: float = 0.5,
    seed: int = 0,
    *,
    num_tasks: int,
    shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """Gradient Vaccine: aligns task gradients to adaptive similarity goals.

  For each task i, the other tasks j are visited in a fresh random order.
  With ``phi_ij = cos(g_i^PC, g_j)`` and the target ``phihat_ij`` (an EMA of
  the cosines seen for that pair, started at 0), a pair below its target
  gets the component along ``g_j`` that brings the cosine exactly to it,
  keeping the component orthogonal to ``g_j``:

  .. math::
     g_i^{PC} \\leftarrow g_i^{PC} + \\frac{\\|g_i^{PC}\\|\\,\\big(\\hat\\phi_{ij}
       \\sqrt{1 - \\phi_{ij}^2} - \\phi_{ij}\\sqrt{1 - \\hat\\phi_{ij}^2}\\big)}
       {\\|g_j\\|\\sqrt{1 - \\hat\\phi_{ij}^2}}\\, g_j
       \\quad \\text{if } \\phi_{ij} < \\hat\\phi_{ij},

  .. math::
     \\hat\\phi_{ij} \\leftarrow (1 - \\beta)\\,\\hat\\phi_{ij} + \\beta\\,\\phi_{ij},
     \\qquad \\text{update} = \\sum_i g_i^{PC} .

  The EMA takes the cosine measured before the correction (Algorithm 1,
  Wang et al.). With ``beta = 0`` the targets stay at 0 and the correction
  is PCGrad's projection ``-<g_i^PC, g_j> / ||g_j||^2 g_j`` on conflicting
  pairs: GradVac then equals :func:`optax_mtl.pcgrad` with the same visiting
  orders (the same seed gives the same orders). Targets are used up to
  ``1 - 1e-6`` (a target of exactly 1 asks for an infinite step); pairs with a
  zero gradient are skipped and keep their target. The corrections are done
  on coefficient vectors with the Gramian (vmapped over i), and the weights
  depend only on cosines and norm ratios, so they are scale-free. Here the
  targets cover the whole shared model; ``mtl.layerwise(mtl.gradvac(...))``
  keeps them per layer, as the paper's experiments do.

  Args:
    beta: EMA rate of the targets, in [0, 1]: 0 keeps them at 0 (PCGrad), 1
      sets them to the last cosine seen. May be traced.
    seed: seed of the random visiting orders; the key lives in the state and
      is split at every update.
    num_tasks: T (the state holds the [T, T] targets).
    shared: optional mask of shared leaves (pytree of bools or callable on
      params); other leaves are task-specific heads, summed over tasks.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` aggregator whose state is a
    :class:`GradVacState`.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.gradvac(beta=0.5, num_tasks=2)
    >>> task_grads = {"w": jnp.array([[1.0, 1.0], [-1.0, 0.0]])}
    >>> update, state = tx.update(task_grads, tx.init(None))
    >>> update["w"]
    Array([-0.5,  1.5], dtype=float32)
    >>> state.targets
    Array([[ 0.        , -0.35355338],
           [-0.35355338,  0.        ]], dtype=float32)

  References:
    Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine: Investigating and
    Improving Multi-task Optimization in Massively Multilingual Models",
    ICLR 2021 (Section 3.3, Algorithm 1).
  """
  hyperparams.in_range(beta, _METHOD, "beta", 0.0, 1.0)
  hyperparams.seed(seed, _METHOD)
  size = hyperparams.num_tasks(num_tasks, _METHOD)

  def init(size):
    return GradVacState(weighting.initial_weights(size),
                        jnp.zeros((size, size), jnp.float32),
                        jax.random.key_data(jax.random.key(seed)))

  def rule(inputs, state):
    num = inputs.num_tasks
    key, step_key = jax.random.split(jax.random.wrap_key_data(state.key))
    orders = jax.vmap(lambda k: jax.random.permutation(k, num))(
        jax.random.split(step_key, num))
    coeffs, targets = vaccine_coefficients(inputs.gramian.normalized,
                                           state.targets, orders, beta)
    return jnp.sum(coeffs, axis=0), state._replace(
        targets=targets, key=jax.random.key_data(key))

  return transform.aggregator(weighting.Weighting(
      name=_METHOD, rule=rule, init=init, reads={"gramian"}, num_tasks=size,
      claims={"homogeneous"}), shared=shared)
