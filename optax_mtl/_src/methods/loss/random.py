"""Random loss weighting (RLW): weights drawn afresh at every step."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src.core import aliases
from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting
from optax_mtl._src.engine import hyperparams

_METHOD = "mtl.scale_by_random"


class RandomWeightingState(NamedTuple):
  """State of :func:`scale_by_random`.

  Attributes:
    task_weights: [T] weights of the last update (None without ``num_tasks``).
    key: raw uint32 PRNG key data, split at every update.
  """
  task_weights: jax.Array
  key: jax.Array


def scale_by_random(seed: int = 0, *, num_tasks: int | None = None
                    ) -> optax.GradientTransformationExtraArgs:
  """Scales the tasks by random weights, the softmax of normal samples.

  .. math::
     \\lambda \\sim \\mathcal{N}(0, I_T), \\qquad w = \\operatorname{softmax}(\\lambda)

  New weights are drawn at every update from a key kept in the state (split
  per step), so runs are reproducible from ``seed`` and ``vmap`` over seeds
  works. The weights sum to 1 (the sum of the tasks is scaled by about 1/T
  compared with ``sum()``).

  Args:
    seed: integer seed of the PRNG key.
    num_tasks: optional T; when given, the state keeps the weights of the
      last update in ``task_weights``.

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
  hyperparams.seed(seed, _METHOD)

  def init(size):
    key = jax.random.key_data(jax.random.key(seed))
    return RandomWeightingState(weighting.initial_weights(size, 0.0), key)

  def rule(inputs, state):
    key = jax.random.wrap_key_data(state.key)
    key, sample_key = jax.random.split(key)
    logits = jax.random.normal(sample_key, (inputs.num_tasks,), jnp.float32)
    return jax.nn.softmax(logits), state._replace(key=jax.random.key_data(key))

  return transform.task_scaling(weighting.Weighting(
      name=_METHOD, rule=rule, init=init,
      num_tasks=hyperparams.num_tasks(num_tasks, _METHOD, required=False),
      claims={"homogeneous"}))


random_weighting = aliases.alias(scale_by_random, "random_weighting", "seed=0")
