"""Aliases generated from task scalings: the scaling, then the sum over tasks.

``mtl.dwa(...)`` is ``mtl.scale_by_dwa(...)`` followed by ``mtl.sum()`` (or
by ``mtl.weighted(priorities)``) as one aggregator; its signature, docstring
and behaviour are derived from the scaling's factory here, so no alias is
written by hand.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import jax.numpy as jnp

from optax_mtl._src.core import transform
from optax_mtl._src.core import weighting as weighting_lib
from optax_mtl._src.engine import hyperparams

_DOC = """``{scaling}`` followed by the sum over tasks (or ``weighted(priorities)``).

One aggregator: task t's gradient is scaled by the weights of
:func:`{scaling}`, then the shared leaves are summed over tasks (weighted by
``priorities`` when given) and every head keeps its own task's scaled
gradient. It costs one statistics pass and one combination pass, like
``mtl.chain({scaling}(...), mtl.sum())``. Its state is the scaling's state;
``task_weights`` holds the weights applied to the shared leaves.

Args:
  *args: the positional arguments of :func:`{scaling}`.
  **kwargs: its keyword arguments.
  priorities: optional [T] task priorities multiplied on top of the weights.
  shared: optional mask of shared leaves (pytree of bools or callable on
    params); heads are summed. A scaling that reads gradient statistics reads
    them over these leaves unless it was given its own mask.

Returns:
  An ``optax.GradientTransformationExtraArgs`` aggregator.

Example:
  >>> import optax, optax_mtl as mtl
  >>> tx = optax.chain(mtl.{name}({example}), optax.adam(1e-3))
"""


def _tail(priorities: Any, num_tasks: int | None) -> weighting_lib.Weighting:
  if priorities is None:
    return weighting_lib.constant(
        "mtl.sum", lambda t: jnp.ones(t, jnp.float32), num_tasks,
        claims={"permutation_equivariant", "homogeneous"})
  vector = hyperparams.weight_vector(priorities, "mtl.weighted", "priorities")
  return weighting_lib.constant("mtl.weighted", lambda t: vector, vector.shape[0],
                                claims={"homogeneous"},
                                tasks_argument="len(priorities)")


def alias(scaling_factory: Callable[..., transform.Method], name: str,
          example: str = "") -> Callable[..., transform.Method]:
  """Generates the alias ``name`` of ``scaling_factory``.

  Args:
    scaling_factory: a public task-scaling factory (``scale_by_...``).
    name: the alias's public name.
    example: the arguments shown in the docstring example.

  Returns:
    The alias factory, with the scaling's parameters plus keyword-only
    ``priorities`` and ``shared``.
  """
  signature = inspect.signature(scaling_factory)

  def factory(*args, priorities: Any = None, shared: Any = None, **kwargs):
    scaling = scaling_factory(*args, **kwargs)
    (member,) = scaling.parts[0].members
    return transform.alias(scaling, _tail(priorities, member.weighting.num_tasks),
                           shared)

  extra = [inspect.Parameter("priorities", inspect.Parameter.KEYWORD_ONLY, default=None),
           inspect.Parameter("shared", inspect.Parameter.KEYWORD_ONLY, default=None)]
  factory.__signature__ = signature.replace(
      parameters=list(signature.parameters.values()) + extra,
      return_annotation=signature.return_annotation)
  factory.__name__ = factory.__qualname__ = name
  factory.__module__ = scaling_factory.__module__
  factory.__doc__ = _DOC.format(scaling=scaling_factory.__name__, name=name,
                                example=example)
  return factory
