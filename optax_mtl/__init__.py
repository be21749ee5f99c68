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
from optax_mtl._src.loss_priors import cross_entropy_initial_loss
from optax_mtl._src.loss_priors import cross_entropy_prior_loss
from optax_mtl._src.loss_priors import l2_initial_loss
from optax_mtl._src.loss_priors import l2_prior_loss
from optax_mtl._src.loss_weighting.dtp import DTPState
from optax_mtl._src.loss_weighting.dtp import dtp
from optax_mtl._src.loss_weighting.dtp import scale_by_dtp
from optax_mtl._src.loss_weighting.dwa import DWAState
from optax_mtl._src.loss_weighting.dwa import dwa
from optax_mtl._src.loss_weighting.dwa import scale_by_dwa
from optax_mtl._src.loss_weighting.famo import FAMOState
from optax_mtl._src.loss_weighting.famo import famo
from optax_mtl._src.loss_weighting.famo import scale_by_famo
from optax_mtl._src.loss_weighting.geometric import geometric_loss_weighting
from optax_mtl._src.loss_weighting.geometric import scale_by_geometric_loss
from optax_mtl._src.loss_weighting.imtl_l import IMTLLState
from optax_mtl._src.loss_weighting.imtl_l import imtl_l
from optax_mtl._src.loss_weighting.imtl_l import scale_by_imtl_l
from optax_mtl._src.loss_weighting.initial import InitialLossState
from optax_mtl._src.loss_weighting.initial import PriorLossState
from optax_mtl._src.loss_weighting.initial import initial_loss_weighting
from optax_mtl._src.loss_weighting.initial import prior_loss_weighting
from optax_mtl._src.loss_weighting.initial import scale_by_initial_loss
from optax_mtl._src.loss_weighting.initial import scale_by_prior_loss
from optax_mtl._src.loss_weighting.one_backward import loss_weights
from optax_mtl._src.loss_weighting.one_backward import value_and_weighted_grad
from optax_mtl._src.loss_weighting.one_backward import weighted_loss
from optax_mtl._src.loss_weighting.random import RandomWeightingState
from optax_mtl._src.loss_weighting.random import random_weighting
from optax_mtl._src.loss_weighting.random import scale_by_random
from optax_mtl._src.loss_weighting.realtime import realtime_loss_weighting
from optax_mtl._src.loss_weighting.realtime import scale_by_realtime_loss
from optax_mtl._src.loss_weighting.uncertainty import UncertaintyState
from optax_mtl._src.loss_weighting.uncertainty import scale_by_uncertainty
from optax_mtl._src.loss_weighting.uncertainty import uncertainty_weighting
from optax_mtl._src.transform import TaskInputs
from optax_mtl._src.transform import aggregator
from optax_mtl._src.transform import task_scaling

__version__ = "0.1.0"

__all__ = (
    "DTPState",
    "DWAState",
    "FAMOState",
    "GradNormState",
    "Gramian",
    "IMTLLState",
    "InitialLossState",
    "NormalizeGradientsState",
    "PCGradState",
    "PriorLossState",
    "RandomWeightingState",
    "TaskInputs",
    "UncertaintyState",
    "aggregator",
    "cagrad",
    "combine",
    "cross_entropy_initial_loss",
    "cross_entropy_prior_loss",
    "dtp",
    "dwa",
    "famo",
    "geometric_loss_weighting",
    "gradnorm",
    "gramian",
    "imtl_l",
    "initial_loss_weighting",
    "l2_initial_loss",
    "l2_prior_loss",
    "loss_weights",
    "mean",
    "mgda",
    "normalize_gradients",
    "pcgrad",
    "prior_loss_weighting",
    "random_weighting",
    "realtime_loss_weighting",
    "scale_by_dtp",
    "scale_by_dwa",
    "scale_by_famo",
    "scale_by_geometric_loss",
    "scale_by_gradnorm",
    "scale_by_imtl_l",
    "scale_by_initial_loss",
    "scale_by_prior_loss",
    "scale_by_random",
    "scale_by_realtime_loss",
    "scale_by_uncertainty",
    "scale_tasks",
    "sum",
    "task_scaling",
    "uncertainty_weighting",
    "value_and_jacobian",
    "value_and_weighted_grad",
    "weighted",
    "weighted_loss",
)
