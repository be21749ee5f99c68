"""COSMOS: a linear scalarisation plus a cosine pull toward the preference."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_mtl._src.core import aliases
from optax_mtl._src.core import loss_inputs
from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams

_METHOD = "mtl.scale_by_cosmos"
# Below this loss norm the cosine's derivative (of size 1 / ||L||) is taken
# as 0: the cosine is undefined at L = 0.
_TINY_NORM = 1e-30
# Bound on the weights: lam / ||L|| overflows float32 for a huge lam.
_MAX_WEIGHT = 1e30


class COSMOSState(NamedTuple):
  """State of :func:`scale_by_cosmos`.

  Attributes:
    task_weights: [T] weights of the last update.
    preference: [T] the preference ``r`` the *next* update applies (drawn
      ahead, so that a train step can condition the network on it before
      computing the losses); the fixed preference when one was given.
    key: uint32 raw PRNG key data, split at every update.
  """
  task_weights: jax.Array
  preference: jax.Array
  key: jax.Array


def cosmos_weights(losses: jax.Array, preference: jax.Array, lam) -> jax.Array:
  """The derivative of COSMOS's objective with respect to the losses.

  Args:
    losses: [T] losses.
    preference: [T] preference ``r``.
    lam: the weight of the cosine term.

  Returns:
    [T] float32 ``r - lam (r_hat - cos(r, L) L_hat) / ||L||`` (``r`` where
    ``||L|| <= 1e-30``), bounded by 1e30.
  """
  r_hat, _ = loss_inputs.unit_and_norm(preference)
  l_hat, norm = loss_inputs.unit_and_norm(losses)
  cosine = jnp.dot(r_hat, l_hat)
  large = norm > _TINY_NORM
  derivative = jnp.where(large, (r_hat - cosine * l_hat)
                         / jnp.where(large, norm, 1.0), 0.0)
  weights = preference - lam * derivative
  return jnp.clip(weights, -_MAX_WEIGHT, _MAX_WEIGHT)


def scale_by_cosmos(
    lam: Any = 1.0,
    preference: Any = None,
    alpha: Any = 1.0,
    seed: int = 0,
    *,
    num_tasks: int,
) -> optax.GradientTransformationExtraArgs:
  """Scales the tasks by the gradient of the COSMOS objective.

  With a preference ``r`` on the simplex:

  .. math::
     g(L) = \\sum_t r_t L_t - \\lambda \\cos(r, L), \\qquad
     \\cos(r, L) = \\frac{\\langle r, L\\rangle}{\\|r\\|\\, \\|L\\|},

  .. math::
     d_t = \\frac{\\partial g}{\\partial L_t}
       = r_t - \\frac{\\lambda}{\\|L\\|}
         \\Big(\\frac{r_t}{\\|r\\|} - \\cos(r, L)\\, \\frac{L_t}{\\|L\\|}\\Big),

  so ``sum_t d_t g_t`` is the gradient of ``g``. The cosine term pulls the
  loss vector toward the ray of ``r``: a task whose loss is high for its
  preference gets more weight. The cosine's derivative has size ``1 /
  ||L||`` and is taken as 0 where ``||L|| <= 1e-30`` (the cosine is
  undefined at ``L = 0``); weights are bounded by 1e30.

  **Preferences.** The paper samples ``r ~ Dirichlet(alpha)`` at every step
  and also feeds ``r`` to the network (concatenated to its input), so that
  one model learns the whole Pareto front. Without ``preference`` the
  preferences are drawn from the key in the state, one ahead: the state's
  ``preference`` is the ``r`` the next update applies, so a train step reads
  it first, conditions the network on it, and the update then uses the same
  ``r``::

    r = optax.tree.get(state, "preference")
    losses, task_grads = mtl.value_and_jacobian(loss_fn)(params, batch, r)
    updates, state = tx.update(task_grads, state, params, losses=losses)

  With ``preference`` given it is used at every step (one point of the
  front).

  Args:
    lam: ``lambda >= 0``, the weight of the cosine term (the paper tunes it
      per data set, from 0.01 to 8). May be traced.
    preference: optional fixed [T] nonnegative preference with a positive
      entry. May be traced.
    alpha: concentration ``alpha > 0`` of the Dirichlet distribution of the
      drawn preferences (1: uniform on the simplex). May be traced.
    seed: integer seed of the PRNG key kept in the state.
    num_tasks: T (the state holds the next preference).

  Returns:
    A task scaling whose state is a :class:`COSMOSState`; ``update``
    requires ``losses=``.

  Raises:
    TypeError: ``seed`` is not an integer.
    ValueError: ``lam`` negative, ``alpha`` not positive, or a bad
      ``preference``. (A step with a non-finite loss is skipped: zero
      update, state kept.)

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.scale_by_cosmos(lam=1.0, preference=jnp.array([0.5, 0.5]),
    ...                          num_tasks=2)
    >>> g = {"w": jnp.array([[1.0], [1.0]])}
    >>> _, state = tx.update(g, tx.init(None), losses=jnp.array([1.0, 3.0]))
    >>> [round(float(w), 4) for w in state.task_weights]
    [0.3658, 0.5447]

  References:
    Ruchte & Grabocka, "Scalable Pareto Front Approximation for Deep
    Multi-Objective Learning", IEEE ICDM 2021 (Eq. 5).
  """
  size = hyperparams.num_tasks(num_tasks, _METHOD)
  lam = jnp.asarray(hyperparams.nonnegative(lam, _METHOD, "lam"), jnp.float32)
  alpha = jnp.asarray(hyperparams.positive(alpha, _METHOD, "alpha"), jnp.float32)
  hyperparams.seed(seed, _METHOD)
  vector = (None if preference is None else
      loss_inputs.preference(preference, _METHOD, size))

  def draw(key, num):
    return jax.random.dirichlet(key, jnp.broadcast_to(alpha, (num,)),
                                dtype=jnp.float32)

  def init(num):
    key, sample = jax.random.split(jax.random.key(seed))
    first = draw(sample, num) if vector is None else vector
    return COSMOSState(weighting.initial_weights(num), first,
                       jax.random.key_data(key))

  def rule(inputs, state):
    losses = loss_inputs.finite_losses(inputs.losses)
    weights = cosmos_weights(losses, state.preference, lam)
    if vector is None:
      key, sample = jax.random.split(jax.random.wrap_key_data(state.key))
      state = state._replace(preference=draw(sample, inputs.num_tasks),
                             key=jax.random.key_data(key))
    return weights, state

  return transform.task_scaling(weighting.Weighting(
      name=_METHOD, rule=rule, init=init, reads={"losses"}, num_tasks=size,
      claims={"homogeneous"}))


cosmos = aliases.alias(scale_by_cosmos, "cosmos", "num_tasks=2")
