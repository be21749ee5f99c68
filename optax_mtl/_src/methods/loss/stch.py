"""Smooth Tchebycheff scalarisation (STCH): a soft maximum of the shifted losses."""

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

_METHOD = "mtl.scale_by_stch"
# Bound on p_t (L_t - z_t), which overflows float32 for a huge preference;
# differences of bounded terms stay finite.
_MAX_TERM = 1e37


class STCHState(NamedTuple):
  """State of :func:`scale_by_stch`.

  Attributes:
    task_weights: [T] weights of the last update.
    ideal_point: [T] the ideal point ``z``: 0 without warm-up, else the
      smallest loss of each task seen during the warm-up (frozen after it).
    count: int32 number of warm-up updates done (stops at ``warmup_steps``).
  """
  task_weights: jax.Array
  ideal_point: jax.Array
  count: jax.Array


def scale_by_stch(
    mu: Any = 1.0,
    preference: Any = None,
    warmup_steps: Any = 0,
    *,
    num_tasks: int,
) -> optax.GradientTransformationExtraArgs:
  """Scales the tasks by the gradient of the smooth Tchebycheff scalarisation.

  With preference ``p`` and ideal point ``z``:

  .. math::
     g_\\mu(L) = \\mu \\log \\sum_t \\exp\\Big(\\frac{p_t (L_t - z_t)}{\\mu}\\Big),
     \\qquad
     d_t = \\frac{\\partial g_\\mu}{\\partial L_t}
         = p_t\\, \\operatorname{softmax}\\Big(\\frac{p (L - z)}{\\mu}\\Big)_t ,

  so ``sum_t d_t g_t`` is the gradient of ``g_mu``. It is a smooth
  ``max_t p_t (L_t - z_t)`` (the Tchebycheff scalarisation, reached as
  ``mu -> 0``; ``g_mu`` exceeds it by at most ``mu log T``): the task
  furthest from its ideal value, relative to its preference, gets most of
  the weight. The softmax is formed with its largest logit subtracted, so
  it is finite for losses of any scale.

  **Ideal point and warm-up.** The paper's ``z`` is the ideal point (each
  loss's minimum); with ``warmup_steps=0`` it is 0, the ideal point of
  nonnegative losses that can reach 0. With ``warmup_steps=k > 0`` the first
  k updates apply the plain preference-weighted sum (``d = p``) while ``z``
  records the smallest loss of each task seen, then ``z`` is frozen: an
  estimate of the ideal point reachable by this model. (The authors'
  multi-task code instead warms up on ``sum_t log L_t`` and then applies
  STCH to the log-losses ``log(L_t / Lbar_t)``, ``Lbar`` the mean loss of
  the warm-up's last epoch; this scaling follows the paper's definition on
  the losses themselves.) After the warm-up the weights sum to at
  most ``max_t p_t``, not to ``sum_t p_t``: the scale of the update drops
  at the switch (Adam and other normalising optimizers absorb it).

  Args:
    mu: smoothing ``mu > 0``, in the units of the losses. May be traced.
    preference: optional [T] nonnegative preference ``p`` with a positive
      entry; ones by default. May be traced.
    warmup_steps: number of warm-up updates (an int >= 0). May be traced.
    num_tasks: T (the state holds the ideal point).

  Returns:
    A task scaling whose state is a :class:`STCHState`; ``update`` requires
    ``losses=``.

  Raises:
    ValueError: ``mu`` not positive and finite, ``warmup_steps`` not an
      integer >= 0, or a bad ``preference``. (A step with a non-finite loss
      is skipped: zero update, state kept.)

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> tx = mtl.scale_by_stch(mu=1.0, num_tasks=2)
    >>> g = {"w": jnp.array([[1.0], [1.0]])}
    >>> _, state = tx.update(g, tx.init(None), losses=jnp.array([1.0, 1.0]))
    >>> state.task_weights
    Array([0.5, 0.5], dtype=float32)

  References:
    Lin, Zhang, Yang, Liu, Wang & Zhang, "Smooth Tchebycheff Scalarization
    for Multi-Objective Optimization", ICML 2024.
  """
  size = hyperparams.num_tasks(num_tasks, _METHOD)
  mu = jnp.asarray(hyperparams.positive(mu, _METHOD, "mu"), jnp.float32)
  hyperparams.integer(warmup_steps, _METHOD, "warmup_steps", low=0)
  warmup = jnp.asarray(warmup_steps, jnp.int32)
  vector = (None if preference is None else
      loss_inputs.preference(preference, _METHOD, size))

  def init(num):
    return STCHState(weighting.initial_weights(num),
                     jnp.zeros((num,), jnp.float32), jnp.zeros((), jnp.int32))

  def rule(inputs, state):
    losses = loss_inputs.finite_losses(inputs.losses)
    p = jnp.ones_like(losses) if vector is None else vector
    warming = state.count < warmup
    seen = jnp.where(state.count == 0, losses,
                     jnp.minimum(state.ideal_point, losses))
    ideal = jnp.where(warming, seen, state.ideal_point)
    # The largest term is subtracted before dividing by mu: the logits are
    # then <= 0 with a 0 among them, so a tiny mu sends the others to -inf
    # (weight 0) instead of overflowing them all to +inf.
    spread = jnp.clip(p * (losses - ideal), -_MAX_TERM, _MAX_TERM)
    logits = (spread - jnp.max(spread)) / mu
    weights = jnp.where(warming, p, p * jax.nn.softmax(logits))
    return weights, state._replace(
        ideal_point=ideal,
        count=jnp.where(warming, state.count + 1, state.count))

  claims = {"homogeneous"}
  if preference is None:
    claims.add("permutation_equivariant")
  return transform.task_scaling(weighting.Weighting(
      name=_METHOD, rule=rule, init=init, reads={"losses"}, num_tasks=size,
      claims=claims))


stch = aliases.alias(scale_by_stch, "stch", "num_tasks=2")
