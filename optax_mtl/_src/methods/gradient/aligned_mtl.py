"""Aligned-MTL: align the task gradients into an orthogonal, equal-norm system."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams
from optax_mtl._src.engine import masking
from optax_mtl._src.solvers import spectral

_METHOD = "mtl.aligned_mtl"
SCALES = ("min", "median", "rmse")


def _sigma_squared(spectrum: spectral.Spectrum, scale: str) -> jax.Array:
  """The squared norm the aligned gradients get, from the kept eigenvalues."""
  values, kept = spectrum.values, spectrum.kept
  num = values.shape[0]
  rank = jnp.sum(kept.astype(jnp.int32))
  # The kept eigenvalues are the last ``rank`` ones (ascending order).
  first = num - rank
  if scale == "min":
    return values[jnp.clip(first, 0, num - 1)]
  if scale == "median":
    # The lower median, as torch.median in the authors' code.
    return values[jnp.clip(first + (rank - 1) // 2, 0, num - 1)]
  total = jnp.sum(jnp.where(kept, values, 0.0))
  return total / jnp.maximum(rank, 1).astype(values.dtype)


# Compiled once per shape and scale, so eager updates do not re-trace.
@functools.partial(jax.jit, static_argnames="scale")
def balance_matrix(gram_matrix: jax.Array, scale: str = "min") -> jax.Array:
  """Aligned-MTL's ``B = sigma V diag(lam^{-1/2}) V^T`` from the Gramian.

  Only the eigenvalues kept by
  :func:`~optax_mtl._src.solvers.spectral.psd_spectrum` enter, and ``sigma``
  is taken among them. ``B`` does not depend on the Gramian's global scale,
  so the normalised Gramian serves.

  Args:
    gram_matrix: [T, T] Gramian divided by any positive constant.
    scale: ``"min"``, ``"median"`` or ``"rmse"`` (static).

  Returns:
    [T, T] float32 symmetric matrix; zeros for a zero Gramian.
  """
  spectrum = spectral.psd_spectrum(jnp.asarray(gram_matrix, jnp.float32))
  sigma = jnp.sqrt(jnp.maximum(_sigma_squared(spectrum, scale), 0.0))
  vectors = spectrum.vectors
  balance = sigma * (vectors * spectrum.inverse_power(0.5)[None, :]) @ vectors.T
  return jnp.where(jnp.isfinite(balance), balance, 0.0)


def aligned_mtl(
    scale: str = "min",
    *,
    num_tasks: int | None = None,
    shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """Aligned-MTL: sums the task gradients after aligning their principal components.

  With the Gramian ``G = V diag(lam) V^T``, the balance matrix

  .. math::
     B = \\sigma\\, V \\operatorname{diag}(\\lambda^{-1/2}) V^\\top, \\qquad
     \\hat g_t = \\sum_s B_{st}\\, g_s ,

  makes the aligned gradients ``g_hat_t`` orthogonal with equal norms
  ``sigma``: their Gramian ``B G B = sigma^2 I`` has condition number 1. If
  ``J = U S W^T`` is the SVD of the stacked gradients, ``B J = sigma U W^T``
  is the closest orthogonal system to ``J`` (a Procrustes problem), scaled.
  The update sums the aligned gradients as in the authors' code,

  .. math::
     \\text{update} = \\sum_t \\hat g_t = \\sum_t w_t g_t, \\quad w = B \\mathbf 1 .

  ``scale`` picks ``sigma^2`` among the kept eigenvalues: ``"min"`` the
  smallest (the paper's choice), ``"median"`` the lower median (as
  ``torch.median`` in the authors' code), ``"rmse"`` their mean. Eigenvalues
  at or below ``16 T eps lam_max`` are dropped (the authors' code drops those
  below ``T eps lam_max``), so for linearly dependent gradients ``B`` acts on
  their span and ``B G B = sigma^2 P`` with ``P`` the projection onto it;
  identical gradients give ``w = 1``. A task whose gradient is far smaller
  than the others (below about ``sqrt(16 T eps)``, ~1e-3, of the largest
  norm when orthogonal to them) falls under the cut-off, and ``sigma`` comes
  from the other tasks. A zero Gramian gives zero weights.
  ``B`` does not change when every gradient is multiplied by the same
  factor, so the update is homogeneous; it is not invariant to each task's
  scale, and it may conflict with a task.

  Args:
    scale: ``"min"``, ``"median"`` or ``"rmse"``.
    num_tasks: optional T; when given, the state keeps the weights of the
      last update in ``task_weights``.
    shared: optional mask of shared leaves (pytree of bools or callable on
      params); other leaves are task-specific heads, summed over tasks.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` aggregator.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.aligned_mtl()
    >>> task_grads = {"w": jnp.array([[2.0, 0.0], [0.0, 1.0]])}
    >>> tx.update(task_grads, tx.init(None))[0]["w"]
    Array([1., 1.], dtype=float32)

  References:
    Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component
    Alignment for Multi-Task Learning", CVPR 2023.
  """
  if not isinstance(scale, str):
    raise TypeError(f"{_METHOD}: scale must be a string, one of {SCALES}, got "
                    f"{scale!r}.")
  hyperparams.choice(scale, SCALES, _METHOD, "scale")

  def rule(inputs, state):
    balance = balance_matrix(inputs.gramian.normalized, scale)
    # The update sums the aligned gradients: w = B 1.
    return jnp.sum(balance, axis=1), state

  return transform.aggregator(weighting.Weighting(
      name=_METHOD, rule=rule, reads={"gramian"},
      num_tasks=hyperparams.num_tasks(num_tasks, _METHOD, required=False),
      claims={"permutation_equivariant", "homogeneous"}), shared=shared)
