"""optax_mtl: multi-task loss and gradient balancing as optax transformations.

Per-task gradients (every leaf with a leading task axis T) flow through task
scalings, then one aggregator, then any optax optimizer::

  tx = optax.chain(mtl.mean(), optax.adam(1e-3))
  losses, task_grads = mtl.value_and_jacobian(loss_fn)(params, batch)
  updates, state = tx.update(task_grads, state, params, losses=losses)
"""

from optax_mtl._src.basic import mean
from optax_mtl._src.basic import sum_ as sum  # pylint: disable=redefined-builtin
from optax_mtl._src.basic import weighted
from optax_mtl._src.combine import combine
from optax_mtl._src.combine import scale_tasks
from optax_mtl._src.gramian import Gramian
from optax_mtl._src.gramian import gramian
from optax_mtl._src.jacobian import value_and_jacobian
from optax_mtl._src.transform import TaskInputs
from optax_mtl._src.transform import aggregator
from optax_mtl._src.transform import task_scaling

__version__ = "0.1.0"

__all__ = (
    "Gramian",
    "TaskInputs",
    "aggregator",
    "combine",
    "gramian",
    "mean",
    "scale_tasks",
    "sum",
    "task_scaling",
    "value_and_jacobian",
    "weighted",
)
