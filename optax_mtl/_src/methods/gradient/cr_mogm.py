"""CR-MOGM: an exponential moving average of any aggregator's weights."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams
from optax_mtl._src.engine import masking

_METHOD = "mtl.cr_mogm"
# Properties of the inner weights that survive averaging them over steps
# (weights that do not depend on the common scale, or that absorb each task's
# own scale, stay so when averaged; a past step's weights need not keep the
# current update conflict-free or zero at a stationary point).
_KEPT_CLAIMS = frozenset({"permutation_equivariant", "homogeneous",
                          "task_scale_invariant"})


class CRMOGMState(NamedTuple):
  """State of :func:`cr_mogm`.

  Attributes:
    task_weights: [T] float32 averaged weights ``lambda_k`` applied at the
      last update (the previous average at the next one).
    count: int32 number of updates so far (saturating); the first one starts
      the average.
    inner: the inner method's state, flattened to a tuple of its leaves, so
      that ``optax.tree.get(state, "task_weights")`` finds the averaged
      weights only.
  """
  task_weights: jax.Array
  count: jax.Array
  inner: tuple


def _inner_member(method: Any) -> transform.Member:
  """The single aggregator member of ``method``, or a clear error."""
  if not isinstance(method, transform.Method):
    raise TypeError(
        f"{_METHOD}: aggregator must be an aggregator of optax_mtl (e.g. "
        f"mtl.mgda(), mtl.pcgrad()), whose weights are averaged; got "
        f"{type(method).__name__}. Chain optax transformations after "
        f"mtl.cr_mogm with optax.chain.")
  members = [m for p in method.parts for m in p.members]
  if not method.single or len(members) != 1:
    raise ValueError(
        f"{_METHOD}: aggregator must be one aggregator, got a combination of "
        f"{len(members)} members ({', '.join(m.weighting.name for m in members)}"
        f"). Put task scalings around it instead: mtl.chain(scaling, "
        f"mtl.cr_mogm(aggregator, num_tasks=T)).")
  (member,) = members
  if member.kind != transform.AGGREGATOR:
    raise ValueError(
        f"{_METHOD}: {member.weighting.name} is a task scaling, not an "
        f"aggregator; pass an aggregator such as mtl.mgda().")
  if getattr(member.weighting, "per_coordinate", None) is not None:
    raise ValueError(
        f"{_METHOD}: {member.weighting.name} combines the gradients "
        f"coordinate by coordinate, not as sum_t w_t g_t, so it has no "
        f"weights to average; pass a weighted-sum aggregator such as "
        f"mtl.mgda().")
  return member


def cr_mogm(
    aggregator: transform.Method,
    alpha: float = 0.9,
    *,
    num_tasks: int,
    shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """CR-MOGM: smooths a gradient-manipulation method's weights over steps.

  With ``lamhat_k`` the weights the inner aggregator computes at step k (its
  update being ``sum_t lamhat_{k,t} g_t``), the update uses their exponential
  moving average:

  .. math::
     \\lambda_1 = \\hat\\lambda_1, \\qquad
     \\lambda_k = \\alpha\\, \\lambda_{k-1} + (1 - \\alpha)\\, \\hat\\lambda_k ,
     \\qquad \\text{update} = \\sum_t \\lambda_{k,t}\\, g_t .

  Zhou et al. show that stochastic MGDA, PCGrad and CAGrad may fail to
  converge because their weights follow the noise of each mini-batch, and
  that averaging the weights fixes it. The average starts from the first
  step's weights (no prior weight vector is assumed, and weights whose scale
  is not that of the simplex, such as PCGrad's or normalised MGDA's, are not
  mixed with a uniform start). ``alpha = 0`` gives the inner method; ``alpha
  = 1`` keeps the first step's weights.

  The method reads what the inner one reads and keeps the inner state. It
  claims what averaging keeps of the inner claims: permutation
  equivariance, homogeneity and task-scale invariance (weights that do not
  depend on the gradients' common scale, or that carry ``1 / c_t`` for task
  t's scale, stay so on average); not non-conflict nor a zero update at a
  Pareto-stationary point, which hold for the current weights only.

  Args:
    aggregator: an aggregator of this library (``mtl.mgda()``,
      ``mtl.pcgrad()``, ``mtl.cagrad()``, ...), built without ``shared=``
      (pass it here) and with no scalings or optimizers chained to it.
    alpha: weight of the past average, in [0, 1]. May be traced.
    num_tasks: T (the state holds the [T] average).
    shared: optional mask of shared leaves (pytree of bools or callable on
      params); other leaves are task-specific heads, summed over tasks.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` aggregator whose state is a
    :class:`CRMOGMState`.

  Raises:
    TypeError: ``aggregator`` is not a method of this library.
    ValueError: ``aggregator`` is a chain, an alias, a task scaling or a
      coordinate-wise aggregator, has its own ``shared=`` mask, or was built
      for another number of tasks; ``alpha`` is outside [0, 1].

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.cr_mogm(mtl.mgda(), alpha=0.5, num_tasks=2)
    >>> state = tx.init(None)
    >>> _, state = tx.update({"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}, state)
    >>> state.task_weights
    Array([0.5, 0.5], dtype=float32)
    >>> _, state = tx.update({"w": jnp.array([[1.0, 0.0], [0.0, 3.0]])}, state)
    >>> state.task_weights
    Array([0.7, 0.3], dtype=float32)

  References:
    Zhou, Zhang, Jiang, Zhong, Gu & Zhu, "On the Convergence of Stochastic
    Multi-Objective Gradient Manipulation and Beyond", NeurIPS 2022
    (CR-MOGM).
  """
  member = _inner_member(aggregator)
  inner = member.weighting
  if member.mask is not None:
    raise ValueError(
        f"{_METHOD}: {inner.name} was built with shared=; build it without "
        f"and pass shared= to mtl.cr_mogm, which combines the gradients.")
  hyperparams.in_range(alpha, _METHOD, "alpha", 0.0, 1.0)
  size = hyperparams.num_tasks(num_tasks, _METHOD)
  if inner.num_tasks is not None and inner.num_tasks != size:
    raise ValueError(
        f"{_METHOD}: the aggregator was built for num_tasks={inner.num_tasks}"
        f" but mtl.cr_mogm for num_tasks={size}; give both the same T.")
  treedef = jax.tree.structure(jax.eval_shape(inner.initial_state))

  def init(size):
    return CRMOGMState(weighting.initial_weights(size),
                       jnp.zeros((), jnp.int32),
                       tuple(jax.tree.leaves(inner.initial_state())))

  def rule(inputs, state):
    inner_state = jax.tree.unflatten(treedef, state.inner)
    current, inner_state = inner.apply(inputs, inner_state)
    current = current.astype(jnp.float32)
    a = jnp.asarray(alpha, jnp.float32)
    average = jnp.where(state.count > 0,
                        a * state.task_weights + (1.0 - a) * current, current)
    return average, state._replace(
        count=optax.safe_int32_increment(state.count),
        inner=tuple(jax.tree.leaves(inner_state)))

  return transform.aggregator(weighting.Weighting(
      name=_METHOD, rule=rule, init=init, reads=inner.reads, num_tasks=size,
      claims=inner.claims & _KEPT_CLAIMS), shared=shared)
