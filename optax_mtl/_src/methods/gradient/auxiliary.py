"""Main and auxiliary tasks: auxiliary gradients only where they help the main ones."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams
from optax_mtl._src.engine import masking

_METHOD = "mtl.auxiliary"
MODES = ("project", "cosine", "drop")
# The main gradients are taken as cancelling (g_M = 0) when ||g_M||^2 is below
# this fraction of sum_m ||g_m||^2: float32 rounding of the Gramian leaves
# about that much of a true zero, and dividing by it would be noise.
_CANCELLED = 1e-6


# Compiled once per shape and mode, so eager updates do not retrace.
@functools.partial(jax.jit, static_argnames="mode")
def auxiliary_weights(gram_matrix: jax.Array, num_main, mode: str) -> jax.Array:
  """Weights of the main and auxiliary gradients from the Gramian.

  With ``d_a = <g_a, g_M> = sum_m G_am`` and ``||g_M||^2 = sum_{m, m'}
  G_mm'`` (m, m' main):

  * ``"project"``: auxiliary weights 1, and each main weight gains
    ``sum_a max(0, -d_a) / ||g_M||^2`` (``g_a`` minus its negative component
    along ``g_M``);
  * ``"cosine"``: auxiliary weights ``max(0, d_a / (||g_a|| ||g_M||))``;
  * ``"drop"``: auxiliary weights 1 where ``d_a >= 0``, else 0.

  Main weights are 1 (plus the projection terms). When ``g_M`` is zero (or
  the main gradients cancel) every auxiliary weight is 1.

  Args:
    gram_matrix: [T, T] Gramian (any global scale).
    num_main: the number of main tasks (the first ones); may be traced.
    mode: ``"project"``, ``"cosine"`` or ``"drop"``.

  Returns:
    [T] float32 weights.
  """
  gram = jnp.asarray(gram_matrix, jnp.float32)
  num = gram.shape[0]
  is_main = jnp.arange(num) < jnp.asarray(num_main, jnp.int32)
  main = is_main.astype(jnp.float32)
  dots = gram @ main                               # <g_t, g_M>
  main_sq = jnp.dot(main, dots)                    # ||g_M||^2
  diag = jnp.maximum(jnp.diagonal(gram), 0.0)
  cancelled = main_sq <= _CANCELLED * jnp.dot(main, diag)
  safe_sq = jnp.where(cancelled, 1.0, main_sq)
  if mode == "project":
    shift = jnp.where(is_main, 0.0, jnp.maximum(-dots, 0.0)) / safe_sq
    shift = jnp.where(cancelled, 0.0, jnp.sum(shift))
    return 1.0 + main * shift
  if mode == "cosine":
    denom = jnp.sqrt(diag) * jnp.sqrt(safe_sq)
    cosine = dots / jnp.where(denom > 0, denom, 1.0)
    aux = jnp.clip(cosine, 0.0, 1.0)
  else:
    aux = (dots >= 0).astype(jnp.float32)
  aux = jnp.where(cancelled, 1.0, aux)
  return jnp.where(is_main, 1.0, aux)


def auxiliary(
    num_main: int = 1,
    mode: str = "project",
    *,
    num_tasks: int | None = None,
    shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """Main tasks and auxiliary tasks used only where they do not hurt them.

  The first ``num_main`` tasks are the main ones; their summed gradient
  ``g_M`` is kept. Each auxiliary gradient ``g_a`` enters only where it does
  not conflict with ``g_M``:

  .. math::
     \\text{project:}\\ \\ g_a - \\frac{\\min(0, \\langle g_a, g_M\\rangle)}
       {\\|g_M\\|^2} g_M, \\qquad
     \\text{cosine:}\\ \\ \\max(0, \\cos(g_a, g_M))\\, g_a, \\qquad
     \\text{drop:}\\ \\ \\mathbb{1}[\\cos(g_a, g_M) \\ge 0]\\, g_a ,

  and the update is ``g_M`` plus these. In every mode

  .. math::
     \\langle \\text{update}, g_M \\rangle \\ \\ge\\ \\|g_M\\|^2 ,

  so, to first order, no auxiliary task slows the (summed) main objective:
  a step along ``-update`` decreases it at least as fast as a step along
  ``-g_M``. With one main task this holds for that task; with several it
  holds for their sum, not for each (use a conflict-free aggregator among
  the main tasks for that). ``"cosine"`` and ``"drop"`` are Du et al.'s
  weighted and unweighted variants; ``"project"`` removes only the harmful
  component instead of the whole gradient (the projection of PCGrad, applied
  toward the main direction alone). When ``g_M = 0`` (or the main gradients
  cancel to float32 rounding), the main objective is stationary to first
  order and no direction is protected: the auxiliary gradients are kept
  unchanged. All weights are computed from the Gramian and applied to the
  raw gradients; they are scale-free.

  Args:
    num_main: number of main tasks, the first ones (``1 <= num_main <= T``).
      May be traced (then checked only against T when concrete).
    mode: ``"project"``, ``"cosine"`` or ``"drop"``.
    num_tasks: optional T; when given, the state keeps the weights of the
      last update in ``task_weights`` and ``num_main`` is checked against it
      at construction.
    shared: optional mask of shared leaves (pytree of bools or callable on
      params); other leaves are task-specific heads, summed over tasks.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` aggregator.

  Raises:
    ValueError: ``num_main`` is not an integer >= 1 or exceeds T, or
      ``mode`` is unknown.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.auxiliary(num_main=1, mode="project")
    >>> task_grads = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}
    >>> tx.update(task_grads, tx.init(None))[0]["w"]
    Array([1., 1.], dtype=float32)

  References:
    Du, Czarnecki, Jayakumar, Farajtabar, Pascanu & Lakshminarayanan,
    "Adapting Auxiliary Losses Using Gradient Similarity", arXiv:1812.02224,
    2018. Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for
    Multi-Task Learning", NeurIPS 2020 (the projection).
  """
  hyperparams.integer(num_main, _METHOD, "num_main", low=1)
  hyperparams.choice(mode, MODES, _METHOD, "mode")
  size = hyperparams.num_tasks(num_tasks, _METHOD, required=False)

  def check(num):
    values = hyperparams.concrete(num_main)
    if values is not None and int(values) > num:
      raise ValueError(
          f"{_METHOD}: num_main={int(values)} exceeds the number of tasks "
          f"{num}; the first num_main tasks are the main ones, so use "
          f"1 <= num_main <= {num}.")

  if size is not None:
    check(size)

  def rule(inputs, state):
    check(inputs.num_tasks)
    return auxiliary_weights(inputs.gramian.normalized, num_main, mode), state

  return transform.aggregator(weighting.Weighting(
      name=_METHOD, rule=rule, reads={"gramian"}, num_tasks=size,
      claims={"homogeneous"}), shared=shared)
