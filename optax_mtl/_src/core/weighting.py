"""A method is a weighting: what it reads, its state, and its rule.

Almost every multi-task method returns ``sum_t w_t g_t`` (or scales task t by
``w_t``) with weights that depend only on small statistics: the T x T Gramian
of the task gradients or only their norms, the losses, the KPIs, and a small
state. A :class:`Weighting` declares which of these its rule reads; the
builders of :mod:`optax_mtl._src.core.transform` compute exactly that, call
the rule, and apply the weights, so a method's module holds its paper's math
and nothing else.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_mtl._src.engine import hyperparams
from optax_mtl._src.engine import statistics

#: What a rule may read. "gramian" and "norms" are statistics of the task
#: gradients computed by the engine; "losses" and "kpis" are keyword arguments
#: of ``update`` that then become required.
READABLE = frozenset({"gramian", "norms", "losses", "kpis"})

#: Properties a method may claim; the test suite checks each claim.
#:   permutation_equivariant: permuting the tasks (gradients, losses, KPIs)
#:     permutes the weights alike.
#:   homogeneous: multiplying every task gradient by c > 0 multiplies the
#:     output by c (the weights do not depend on the gradients' scale).
#:   task_scale_invariant: multiplying task t's gradient by its own c_t > 0
#:     leaves the update unchanged (the weights absorb each task's scale).
#:   non_conflicting: the update u satisfies <u, g_t> >= 0 for every task.
#:   stationary_zero: the update is 0 when 0 is in the convex hull of the
#:     task gradients (a Pareto-stationary point).
CLAIMS = frozenset({"permutation_equivariant", "homogeneous",
                    "task_scale_invariant", "non_conflicting",
                    "stationary_zero"})


class TaskInputs(NamedTuple):
  """What a weighting's rule reads at one update.

  Attributes:
    num_tasks: T, a static Python int.
    gramian: the :class:`~optax_mtl.Gramian` of the gradients the method
      receives, over its leaves, when it reads "gramian"; else None.
    norms: [T] task-gradient norms over the same leaves when it reads
      "gramian" or "norms"; else None.
    losses: [T] float32 losses when given (required if it reads "losses").
    kpis: [T] float32 KPIs when given (required if it reads "kpis").
    extra: the other keyword arguments passed to ``update``.
  """
  num_tasks: int
  gramian: statistics.Gramian | None
  norms: jax.Array | None
  losses: jax.Array | None
  kpis: jax.Array | None
  extra: Mapping[str, Any]


class WeightsState(NamedTuple):
  """State of a method that keeps nothing but the weights it applied.

  Attributes:
    task_weights: [T] weights of the last update (float32; float64 under
      ``jax_enable_x64``); None when the
      method was built without ``num_tasks`` (``init`` only sees the
      parameters, so T is unknown there).
  """
  task_weights: jax.Array


def initial_weights(num_tasks: int | None, value: Any = 1.0) -> jax.Array | None:
  """The ``task_weights`` a state starts with: [T], or None when T is unknown.

  None is an empty pytree: it checkpoints (a zero-size array would not, with
  Orbax), traces and stays None across updates.
  """
  if num_tasks is None:
    return None
  # float64 under jax_enable_x64: the weights of float64 gradients at 1e-150
  # (about 1e150) are not representable in float32.
  return jnp.broadcast_to(jnp.asarray(value, jnp.result_type(float)), (num_tasks,))


Rule = Callable[[TaskInputs, Any], "tuple[jax.Array, Any]"]


@dataclasses.dataclass(frozen=True)
class Weighting:
  """A multi-task method as a small declared object.

  Attributes:
    name: public name, used in error messages (e.g. ``"mtl.mgda"``).
    rule: ``(TaskInputs, state) -> ([T] weights, new_state)``. The core
      writes the returned weights into ``new_state.task_weights``.
    reads: subset of ``READABLE``: the statistics and keyword arguments the
      rule uses. Only these are computed or required.
    init: ``num_tasks -> state``, a NamedTuple of arrays with a
      ``task_weights`` field (see :func:`initial_weights`); None for
      :class:`WeightsState`. ``num_tasks`` is None when the method was built
      without it.
    num_tasks: T when the state is shaped by it, else None.
    claims: subset of ``CLAIMS``, the properties the method guarantees.
    tasks_argument: the argument T came from, for the message when an
      update has another T (``"len(weights)"`` for fixed weights).
    per_coordinate: for an aggregator whose update is not a weighted sum
      (robust means, sign-based dropping): ``(leaf, state, index) -> update
      leaf``, applied to each shared leaf, with ``leaf`` the [T, ...] stack
      of ``w_t g_t`` (the rule's weights times any scalings' before it),
      ``state`` the new state and ``index`` the leaf's position (to derive
      per-leaf randomness). It replaces ``sum_t`` in the combination pass;
      heads are still summed. None for every weighted-sum method.

  Example:
    >>> import jax.numpy as jnp, optax_mtl as mtl
    >>> inverse_norm = mtl.Weighting(
    ...     name="inverse_norm", reads={"norms"},
    ...     rule=lambda inputs, state: (1.0 / jnp.maximum(inputs.norms, 1e-12), state))
    >>> tx = mtl.aggregator(inverse_norm)
    >>> tx.update({"w": jnp.array([[3.0, 4.0], [0.0, 2.0]])}, tx.init(None))[0]["w"]
    Array([0.6, 1.8], dtype=float32)
  """
  name: str
  rule: Rule
  reads: frozenset = frozenset()
  init: Callable[[int | None], Any] | None = None
  num_tasks: int | None = None
  claims: frozenset = frozenset()
  tasks_argument: str = "num_tasks"
  per_coordinate: Callable[[jax.Array, Any, int], jax.Array] | None = None

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise TypeError(f"Weighting: name must be a non-empty string, got "
                      f"{self.name!r}.")
    if not callable(self.rule):
      raise TypeError(f"{self.name}: rule must be callable as "
                      f"rule(inputs, state) -> (weights, new_state).")
    object.__setattr__(self, "reads", frozenset(self.reads))
    object.__setattr__(self, "claims", frozenset(self.claims))
    unknown = self.reads - READABLE
    if unknown:
      raise ValueError(f"{self.name}: reads has unknown entries "
                       f"{sorted(unknown)}; choose among {sorted(READABLE)}.")
    unknown = self.claims - CLAIMS
    if unknown:
      raise ValueError(f"{self.name}: claims has unknown entries "
                       f"{sorted(unknown)}; choose among {sorted(CLAIMS)}.")
    hyperparams.num_tasks(self.num_tasks, self.name, required=False)
    if self.per_coordinate is not None and not callable(self.per_coordinate):
      raise TypeError(f"{self.name}: per_coordinate must be callable as "
                      f"per_coordinate(leaf, state, index) -> update leaf.")

  @property
  def statistics(self) -> str | None:
    """"gramian", "norms" or None: the gradient statistics the rule reads."""
    if "gramian" in self.reads:
      return "gramian"
    return "norms" if "norms" in self.reads else None

  def initial_state(self) -> Any:
    """The state before the first update."""
    if self.init is None:
      return WeightsState(initial_weights(self.num_tasks))
    state = self.init(self.num_tasks)
    fields = getattr(state, "_fields", ())
    if "task_weights" not in fields:
      raise TypeError(
          f"{self.name}: init must return a NamedTuple with a task_weights "
          f"field (initial_weights(num_tasks) to start it), got "
          f"{type(state).__name__}.")
    return state

  def apply(self, inputs: TaskInputs, state: Any) -> tuple[jax.Array, Any]:
    """Runs the rule and records the weights it applied in the state."""
    if "task_weights" not in getattr(state, "_fields", ()):
      raise TypeError(
          f"{self.name}: the state passed to update is a "
          f"{type(state).__name__}, not this method's state. Pass the state "
          f"returned by tx.init(params) (or by the previous update).")
    # A rule's T x T products (a solver's matrix-vector steps, projections)
    # are few and small; at the default precision GPUs would compute them in
    # TF32 and TPUs in one bfloat16 pass, below the accuracy the solvers
    # stop at.
    with jax.default_matmul_precision("highest"):
      weights, new_state = self.rule(inputs, state)
    weights = jnp.asarray(weights)
    if weights.shape != (inputs.num_tasks,):
      raise ValueError(
          f"{self.name}: the rule returned weights of shape {weights.shape}; "
          f"it must return one weight per task, shape ({inputs.num_tasks},).")
    recorded = new_state.task_weights
    if recorded is not None:
      new_state = new_state._replace(task_weights=weights.astype(recorded.dtype))
    return weights, new_state


def constant(name: str, weights_fn: Callable[[int], jax.Array],
             num_tasks: int | None = None, claims=frozenset(),
             tasks_argument: str = "num_tasks") -> Weighting:
  """A weighting whose weights depend on T alone (sum, mean, fixed weights)."""
  return Weighting(name=name, num_tasks=num_tasks, claims=claims,
                   tasks_argument=tasks_argument,
                   rule=lambda inputs, state: (weights_fn(inputs.num_tasks), state))


def applied_weights(state: Any) -> jax.Array | None:
  """The weights a chain applied to the shared leaves at its last update.

  Every method keeps the [T] weights it applied in its state's
  ``task_weights``, so ``optax.tree.get(state, "task_weights")`` reads them
  for one method. In a chain of task scalings and an aggregator (inside any
  optax chain) each member keeps its own; task t's gradient was multiplied
  by their product, which this returns. Members built without ``num_tasks``
  (their ``task_weights`` is None) count as 1.

  Args:
    state: any optimizer state holding methods of this library.

  Returns:
    [T] float32 weights, or None when no member logged any.

  Example:
    >>> import jax.numpy as jnp, optax, optax_mtl as mtl
    >>> tx = optax.chain(mtl.scale_by_realtime_loss(num_tasks=2),
    ...                  mtl.weighted(jnp.array([1.0, 3.0])), optax.sgd(0.1))
    >>> _, state = tx.update(jnp.ones((2, 1)), tx.init(None),
    ...                      losses=jnp.array([2.0, 4.0]))
    >>> mtl.applied_weights(state)
    Array([0.5 , 0.75], dtype=float32)
  """
  product = None
  for _, leaf in optax.tree.get_all_with_path(state, "task_weights"):
    if leaf is not None:
      leaf = jnp.asarray(leaf, jnp.float32)
      product = leaf if product is None else product * leaf
  return product
