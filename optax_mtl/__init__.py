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
from optax_mtl._src.gradient_methods.cagrad import cagrad
from optax_mtl._src.gradient_methods.gradnorm import GradNormState
from optax_mtl._src.gradient_methods.gradnorm import gradnorm
from optax_mtl._src.gradient_methods.gradnorm import scale_by_gradnorm
from optax_mtl._src.gradient_methods.mgda import mgda
from optax_mtl._src.gradient_methods.normalize import NormalizeGradientsState
from optax_mtl._src.gradient_methods.normalize import normalize_gradients
from optax_mtl._src.gradient_methods.pcgrad import PCGradState
from optax_mtl._src.gradient_methods.pcgrad import pcgrad
from optax_mtl._src.gramian import Gramian
from optax_mtl._src.gramian import gramian
from optax_mtl._src.jacobian import value_and_jacobian
from optax_mtl._src.transform import TaskInputs
from optax_mtl._src.transform import aggregator
from optax_mtl._src.transform import task_scaling

__version__ = "0.1.0"

__all__ = (
    "GradNormState",
    "Gramian",
    "NormalizeGradientsState",
    "PCGradState",
    "TaskInputs",
    "aggregator",
    "cagrad",
    "combine",
    "gradnorm",
    "gramian",
    "mean",
    "mgda",
    "normalize_gradients",
    "pcgrad",
    "scale_by_gradnorm",
    "scale_tasks",
    "sum",
    "task_scaling",
    "value_and_jacobian",
    "weighted",
)
