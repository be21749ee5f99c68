"""Symmetric eigen-solves of the T x T Gramian: pseudo-inverses, equal cosines.

IMTL-G, ConFIG and Aligned-MTL are closed forms in the eigendecomposition of a
small positive semi-definite matrix (the Gramian, or its cosine version). One
``jnp.linalg.eigh`` of the float32 T x T matrix replaces any iterative solver:
no loop trips, the same program on CPU, GPU and TPU.

Eigenvalues at or below ``16 T eps lam_max`` (``eps`` the float32 resolution)
are taken as zero. Below that level they carry the rounding of the Gramian
and of the eigensolver rather than information about the gradients (linearly
dependent tasks leave eigenvalues of a few ``eps lam_max``), and inverting
them would turn rounding noise into the update's direction.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Relative cut-off on the eigenvalues, in units of T * eps * lam_max.
_CUTOFF_ULPS = 16.0
# A task whose squared norm is below this fraction of the largest one cannot
# be normalised reliably (its Gramian entries are rounding noise or have
# underflowed): it is left out of the cosine matrix.
_DEAD_SQUARED_NORM = 1e-30


class Spectrum(NamedTuple):
  """Eigendecomposition of a PSD matrix with its numerical rank.

  Attributes:
    values: [T] eigenvalues in ascending order, negatives (rounding) set to 0.
    vectors: [T, T] orthonormal eigenvectors, one per column.
    kept: [T] bool, the eigenvalues above the relative cut-off; they are the
      last ``sum(kept)`` entries since the values are sorted.
  """
  values: jax.Array
  vectors: jax.Array
  kept: jax.Array

  def inverse_power(self, power: float) -> jax.Array:
    """``values ** -power`` on the kept eigenvalues, 0 on the others."""
    safe = jnp.where(self.kept, self.values, 1.0)
    return jnp.where(self.kept, safe ** (-power), 0.0)

  def apply_pinv(self, vector: jax.Array) -> jax.Array:
    """``M^+ vector``, the pseudo-inverse restricted to the kept eigenvalues."""
    return self.vectors @ (self.inverse_power(1.0) * (self.vectors.T @ vector))


def psd_spectrum(matrix: jax.Array) -> Spectrum:
  """Eigendecomposition of a symmetric PSD matrix, with the cut-off applied.

  Args:
    matrix: [T, T] symmetric positive semi-definite (any global scale; the
      cut-off is relative to its largest eigenvalue). Symmetrised first, so
      rounding that makes it slightly asymmetric does not matter.

  Returns:
    A :class:`Spectrum` in float32 (float64 for a float64 matrix).
  """
  matrix = 0.5 * (matrix + matrix.T)
  num = matrix.shape[0]
  values, vectors = jnp.linalg.eigh(matrix)
  values = jnp.maximum(values, 0.0)
  eps = jnp.finfo(jnp.float32).eps
  cutoff = _CUTOFF_ULPS * num * eps * values[-1]
  # The strict comparison with a cut-off of 0 leaves nothing kept for a zero
  # matrix.
  kept = values > cutoff
  return Spectrum(values, vectors, kept)


class EqualCosine(NamedTuple):
  """The direction with equal projections onto every unit task gradient.

  With ``u_t = g_t / ||g_t||`` and the cosine matrix ``C = [<u_t, u_s>]``,
  ``d = sum_t c_t u_t`` with ``c = C^+ 1`` is the least-norm direction whose
  projections ``<u_t, d> = (C c)_t`` are all 1 when such a direction exists,
  and the least-squares fit of them otherwise (linearly dependent gradients).

  Attributes:
    coeffs: [T] ``c``, 0 for the tasks left out.
    projections: [T] ``C c = [<u_t, d>]``, 0 for the tasks left out.
    unit_norms: [T] ``||g_t|| / max_s ||g_s||``.
    alive: [T] bool, the tasks whose gradient could be normalised.
  """
  coeffs: jax.Array
  projections: jax.Array
  unit_norms: jax.Array
  alive: jax.Array

  def helps_every_task(self, threshold) -> jax.Array:
    """Whether some task is alive and ``<u_t, d> > threshold`` for all alive t."""
    positive = jnp.where(self.alive, self.projections > threshold, True)
    return jnp.all(positive) & jnp.any(self.alive)


# Compiled once per shape, so eager updates do not re-trace the eigensolve.
@jax.jit
def equal_cosine(normalized_gramian: jax.Array) -> EqualCosine:
  """Solves ``C c = 1`` in the least-squares, least-norm sense.

  Tasks whose gradient is zero (or below ``1e-15`` of the largest norm) are
  left out: their row and column of ``C`` and their entry of the right-hand
  side are 0, so they get ``c_t = 0`` and the others keep the property among
  themselves. One step of iterative refinement with the same pseudo-inverse
  brings ``C c`` to the float32 resolution also when ``C`` is ill-conditioned
  (nearly colinear gradients).

  Args:
    normalized_gramian: [T, T] Gramian divided by any positive constant
      (e.g. ``Gramian.normalized``).

  Returns:
    An :class:`EqualCosine` in float32.
  """
  matrix = jnp.asarray(normalized_gramian, jnp.float32)
  num = matrix.shape[0]
  diagonal = jnp.maximum(jnp.diagonal(matrix), 0.0)
  top = jnp.max(diagonal)
  alive = diagonal > _DEAD_SQUARED_NORM * top
  relative = diagonal / jnp.where(top > 0, top, 1.0)
  unit_norms = jnp.sqrt(relative)
  inv = jnp.where(alive, jax.lax.rsqrt(jnp.where(alive, diagonal, 1.0)), 0.0)
  cosines = matrix * inv[:, None] * inv[None, :]
  # The diagonal is 1 by definition; rounding of the division would leave it
  # a few ulps off.
  eye = jnp.eye(num, dtype=bool)
  cosines = jnp.where(eye, alive.astype(jnp.float32)[:, None], cosines)
  spectrum = psd_spectrum(cosines)
  target = alive.astype(jnp.float32)
  coeffs = spectrum.apply_pinv(target)
  coeffs = coeffs + spectrum.apply_pinv(target - cosines @ coeffs)
  coeffs = jnp.where(alive, coeffs, 0.0)
  projections = cosines @ coeffs
  return EqualCosine(coeffs, projections, unit_norms, alive)
