"""optax_mtl: multi-task loss and gradient balancing as optax transformations.

Per-task gradients (every leaf with a leading task axis T) flow through task
scalings, then one aggregator, then any optax optimizer::

  tx = optax.chain(mtl.chain(mtl.scale_by_realtime_loss(), mtl.mgda()),
                   optax.adam(1e-3))
  losses, task_grads = mtl.value_and_jacobian(loss_fn)(params, batch)
  updates, state = tx.update(task_grads, state, params, losses=losses)
"""

from optax_mtl._src.methods.fixed import mean
from optax_mtl._src.methods.fixed import sum_ as sum  # pylint: disable=redefined-builtin
from optax_mtl._src.methods.fixed import weighted
from optax_mtl._src.engine.combine import combine
from optax_mtl._src.engine.combine import scale_tasks
from optax_mtl._src.methods.gradient.cagrad import cagrad
from optax_mtl._src.methods.gradient.gradnorm import GradNormState
from optax_mtl._src.methods.gradient.gradnorm import gradnorm
from optax_mtl._src.methods.gradient.gradnorm import scale_by_gradnorm
from optax_mtl._src.methods.gradient.mgda import mgda
from optax_mtl._src.methods.gradient.normalize import NormalizeGradientsState
from optax_mtl._src.methods.gradient.normalize import normalize_gradients
from optax_mtl._src.methods.gradient.pcgrad import PCGradState
from optax_mtl._src.methods.gradient.pcgrad import pcgrad
from optax_mtl._src.engine.statistics import Gramian
from optax_mtl._src.engine.statistics import gramian
from optax_mtl._src.paths.jacobian import value_and_jacobian
from optax_mtl._src.loss_priors import cross_entropy_initial_loss
from optax_mtl._src.loss_priors import cross_entropy_prior_loss
from optax_mtl._src.loss_priors import l2_initial_loss
from optax_mtl._src.loss_priors import l2_prior_loss
from optax_mtl._src.methods.loss.dtp import DTPState
from optax_mtl._src.methods.loss.dtp import dtp
from optax_mtl._src.methods.loss.dtp import scale_by_dtp
from optax_mtl._src.methods.loss.dwa import DWAState
from optax_mtl._src.methods.loss.dwa import dwa
from optax_mtl._src.methods.loss.dwa import scale_by_dwa
from optax_mtl._src.methods.loss.famo import FAMOState
from optax_mtl._src.methods.loss.famo import famo
from optax_mtl._src.methods.loss.famo import scale_by_famo
from optax_mtl._src.methods.loss.geometric import geometric_loss_weighting
from optax_mtl._src.methods.loss.geometric import scale_by_geometric_loss
from optax_mtl._src.methods.loss.imtl_l import IMTLLState
from optax_mtl._src.methods.loss.imtl_l import imtl_l
from optax_mtl._src.methods.loss.imtl_l import scale_by_imtl_l
from optax_mtl._src.methods.loss.initial import InitialLossState
from optax_mtl._src.methods.loss.initial import PriorLossState
from optax_mtl._src.methods.loss.initial import initial_loss_weighting
from optax_mtl._src.methods.loss.initial import prior_loss_weighting
from optax_mtl._src.methods.loss.initial import scale_by_initial_loss
from optax_mtl._src.methods.loss.initial import scale_by_prior_loss
from optax_mtl._src.paths.lean_gramian import value_and_gramian
from optax_mtl._src.paths.lean_gramian import value_and_gramian_grad
from optax_mtl._src.paths.one_backward import loss_weights
from optax_mtl._src.paths.one_backward import value_and_weighted_grad
from optax_mtl._src.paths.one_backward import weighted_loss
from optax_mtl._src.paths.representation import value_and_representation_grad
from optax_mtl._src.methods.loss.random import RandomWeightingState
from optax_mtl._src.methods.loss.random import random_weighting
from optax_mtl._src.methods.loss.random import scale_by_random
from optax_mtl._src.methods.loss.realtime import realtime_loss_weighting
from optax_mtl._src.methods.loss.realtime import scale_by_realtime_loss
from optax_mtl._src.methods.loss.uncertainty import UncertaintyState
from optax_mtl._src.methods.loss.uncertainty import scale_by_uncertainty
from optax_mtl._src.methods.loss.uncertainty import uncertainty_weighting
from optax_mtl._src.core.transform import Method
from optax_mtl._src.core.transform import aggregator
from optax_mtl._src.core.transform import chain
from optax_mtl._src.core.transform import task_scaling
from optax_mtl._src.core.weighting import TaskInputs
from optax_mtl._src.core.weighting import Weighting
from optax_mtl._src.core.weighting import WeightsState
from optax_mtl._src.core.weighting import applied_weights
from optax_mtl._src.core.weighting import initial_weights

__version__ = "0.1.0"

__all__ = (
    "DTPState",
    "DWAState",
    "FAMOState",
    "GradNormState",
    "Gramian",
    "IMTLLState",
    "Method",
    "InitialLossState",
    "NormalizeGradientsState",
    "PCGradState",
    "PriorLossState",
    "RandomWeightingState",
    "TaskInputs",
    "UncertaintyState",
    "Weighting",
    "WeightsState",
    "aggregator",
    "applied_weights",
    "cagrad",
    "chain",
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
    "initial_weights",
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
    "value_and_gramian",
    "value_and_gramian_grad",
    "value_and_jacobian",
    "value_and_representation_grad",
    "value_and_weighted_grad",
    "weighted",
    "weighted_loss",
)
