"""Random loss weighting (RLW): weights drawn afresh at every step."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src import masking
from optax_mtl._src import transform
from optax_mtl._src.loss_weighting import _common


class RandomWeightingState(NamedTuple):
  """State of :func:`scale_by_random`.

  Attributes:
    key: raw uint32 PRNG key data, split at every update.
  """
  key: jax.Array


def scale_by_random(seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """Scales the tasks by random weights, the softmax of normal samples.

  .. math::
     \\lambda \\sim \\mathcal{N}(0, I_T), \\qquad w = \\operatorname{softmax}(\\lambda)

  New weights are drawn at every update from a key kept in the state (split
  per step), so runs are reproducible from ``seed`` and ``vmap`` over seeds
  works. The weights sum to 1 (the sum of the tasks is scaled by about 1/T
  compared with ``sum()``).

  Args:
    seed: integer seed of the PRNG key.

  Returns:
    A task scaling whose state is a :class:`RandomWeightingState`; losses are
    not needed.

  Example:
    >>> import jax.numpy as jnp, optax, optax_mtl as mtl
    >>> tx = optax.chain(mtl.random_weighting(seed=0), optax.sgd(0.1))
    >>> state = tx.init({"w": jnp.zeros(3)})

  References:
    Lin, Ye, Xu, Shi, Zhang, "Reasonable Effectiveness of Random Weighting: A
    Litmus Test for Multi-Task Learning", TMLR 2022 (arXiv 2111.10603, 2021).
  """
  def init_fn(params):
    del params
    return RandomWeightingState(jax.random.key_data(jax.random.key(seed)))

  def weights_fn(inputs, state):
    key = jax.random.wrap_key_data(state.key)
    key, sample_key = jax.random.split(key)
    logits = jax.random.normal(sample_key, (inputs.num_tasks,), jnp.float32)
    return jax.nn.softmax(logits), RandomWeightingState(jax.random.key_data(key))

  return transform.task_scaling("mtl.scale_by_random", weights_fn, init_fn,
                                needs_losses=False)


def random_weighting(
    seed: int = 0, *, priorities: Any = None, shared: masking.SharedMask = None,
) -> optax.GradientTransformationExtraArgs:
  """``scale_by_random`` chained with ``sum()`` (or ``weighted``): RLW.

  Args:
    seed: integer seed of the PRNG key.
    priorities: optional [T] task priorities multiplied on top.
    shared: ``shared=`` mask passed to the aggregator.

  Returns:
    An aggregator: ``sum_t p_t softmax(lambda)_t g_t`` with fresh ``lambda``.
  """
  return _common.alias(scale_by_random(seed), priorities, shared)

