"""FairGrad: alpha-fair allocation of the update among the tasks."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams
from optax_mtl._src.engine import masking
from optax_mtl._src.solvers import positive_system

_METHOD = "mtl.fairgrad"
# Largest relative residual |(G w)_t w_t^(1/alpha) - 1| accepted as converged.
_TOL = 1e-5
# Newton steps per solve at most; well-conditioned solves take 2 to 8.
_MAX_ITERS = 50


class FairGradState(NamedTuple):
  """State of :func:`fairgrad`.

  Attributes:
    task_weights: [T] float32 weights of the last update, ``update = sum_t
      w_t g_t`` (None without ``num_tasks``).
    residual: float32, ``max_t |(G w)_t w_t^(1/alpha) - 1|`` of the last
      solve (scale free; at least 1 when no solution exists).
    converged: bool, whether the last solve converged. When it did not, the
      weights are the last Newton iterate if it conflicts with no task, else
      zeros.
  """
  task_weights: jax.Array
  residual: jax.Array
  converged: jax.Array


def fairgrad(
    alpha: float = 1.0,
    *,
    num_tasks: int | None = None,
    shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """FairGrad: the update maximising an alpha-fair utility of the tasks' gains.

  Task t's utility is its first-order gain ``<u, g_t>``; the update
  maximises the alpha-fair sum ``sum_t <u, g_t>^(1 - alpha) / (1 - alpha)``
  (``sum_t log <u, g_t>`` at ``alpha = 1``) within a ball. Its optimality
  conditions give ``u = sum_t w_t g_t`` with

  .. math::
     G w = w^{-1/\\alpha} \\quad (w > 0,\\ \\text{elementwise power}), \\qquad
     G_{ts} = \\langle g_t, g_s\\rangle,

  so every task improves, ``<u, g_t> = w_t^(-1/alpha) > 0``. ``alpha = 1``
  is Nash-MTL without its norm cap (the update is then independent of each
  task's gradient scale); ``alpha -> 0`` approaches the largest total gain
  and larger ``alpha`` moves towards max-min fairness, favouring the tasks
  that gain least. Multiplying every gradient by ``c`` multiplies the update
  by ``c^((1 - alpha) / (1 + alpha))``. The system is solved on the device by
  damped Newton on a convex potential
  (:mod:`optax_mtl._src.solvers.positive_system`); the authors' code calls
  scipy's ``least_squares`` on the host. Tasks with a zero gradient get
  weight 0 and the others are solved for; when 0 is in the convex hull of
  the nonzero gradients no solution exists and the weights are zero, with
  ``converged = False`` in the state.

  For ``alpha`` far from 1 and gradient norms orders of magnitude apart the
  equation's right-hand side spans more than float32 resolves: the solver
  then minimises the potential to float32's precision (``converged``) while
  ``residual`` can stay large, and for large ``alpha`` weights below
  float32's range become 0.

  Args:
    alpha: fairness degree (> 0). May be traced (``optax.inject_hyperparams``).
    num_tasks: optional T; when given, the state keeps the weights of the
      last update in ``task_weights``.
    shared: optional mask of shared leaves (pytree of bools or callable on
      params); other leaves are task-specific heads, summed over tasks.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` aggregator whose state is a
    :class:`FairGradState`.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.fairgrad(alpha=2.0)
    >>> task_grads = {"w": jnp.array([[1.0, 0.0], [0.0, 8.0]])}
    >>> jnp.round(tx.update(task_grads, tx.init(None))[0]["w"], 4)
    Array([1. , 0.5], dtype=float32)

  References:
    Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024.
  """
  if jnp.ndim(alpha) != 0:
    raise ValueError(f"{_METHOD}: alpha must be a scalar (one fairness degree "
                     f"for all tasks), got shape {jnp.shape(alpha)}.")
  hyperparams.positive(alpha, _METHOD, "alpha")

  def init(num):
    return FairGradState(weighting.initial_weights(num),
                         jnp.zeros((), jnp.float32), jnp.array(False))

  def rule(inputs, state):
    gram = inputs.gramian
    solution = positive_system.solve(gram.normalized, gram.scale, alpha,
                                     _MAX_ITERS, _TOL)
    return solution.weights, state._replace(residual=solution.residual,
                                            converged=solution.converged)

  claims = {"permutation_equivariant", "non_conflicting"}
  value = hyperparams.concrete(alpha)
  # Only alpha = 1 makes w_t scale as 1 / c_t when g_t scales by c_t.
  if value is not None and value.shape == () and value == 1.0:
    claims.add("task_scale_invariant")
  return transform.aggregator(weighting.Weighting(
      name=_METHOD, rule=rule, init=init, reads={"gramian"},
      num_tasks=hyperparams.num_tasks(num_tasks, _METHOD, required=False),
      claims=claims), shared=shared)
