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
from optax_mtl._src.engine.native import status as cpu_kernel_status
from optax_mtl._src.methods.gradient.aligned_mtl import aligned_mtl
from optax_mtl._src.methods.gradient.auxiliary import auxiliary
from optax_mtl._src.methods.gradient.cagrad import cagrad
from optax_mtl._src.methods.gradient.config import config
from optax_mtl._src.methods.gradient.fairgrad import FairGradState
from optax_mtl._src.methods.gradient.fairgrad import fairgrad
from optax_mtl._src.methods.gradient.cr_mogm import CRMOGMState
from optax_mtl._src.methods.gradient.cr_mogm import cr_mogm
from optax_mtl._src.methods.gradient.db_mtl import DBMTLState
from optax_mtl._src.methods.gradient.db_mtl import db_mtl
from optax_mtl._src.methods.gradient.excess_mtl import ExcessMTLState
from optax_mtl._src.methods.gradient.excess_mtl import excess_mtl
from optax_mtl._src.methods.gradient.gradnorm import GradNormState
from optax_mtl._src.methods.gradient.gradnorm import gradnorm
from optax_mtl._src.methods.gradient.gradnorm import scale_by_gradnorm
from optax_mtl._src.methods.gradient.graddrop import GradDropState
from optax_mtl._src.methods.gradient.graddrop import graddrop
from optax_mtl._src.methods.gradient.gradvac import GradVacState
from optax_mtl._src.methods.gradient.gradvac import gradvac
from optax_mtl._src.methods.gradient.imtl_g import imtl_g
from optax_mtl._src.methods.gradient.krum import krum
from optax_mtl._src.methods.gradient.mgda import mgda
from optax_mtl._src.methods.gradient.moco import MoCoState
from optax_mtl._src.methods.gradient.moco import moco
from optax_mtl._src.methods.gradient.modo import MoDoState
from optax_mtl._src.methods.gradient.modo import modo
from optax_mtl._src.methods.gradient.nash_mtl import NashMTLState
from optax_mtl._src.methods.gradient.nash_mtl import nash_mtl
from optax_mtl._src.methods.gradient.normalize import NormalizeGradientsState
from optax_mtl._src.methods.gradient.normalize import normalize_gradients
from optax_mtl._src.methods.gradient.pcd import PCDState
from optax_mtl._src.methods.gradient.pcd import pcd
from optax_mtl._src.methods.gradient.pcgrad import PCGradState
from optax_mtl._src.methods.gradient.pcgrad import pcgrad
from optax_mtl._src.methods.gradient.sdmgrad import SDMGradState
from optax_mtl._src.methods.gradient.sdmgrad import sdmgrad
from optax_mtl._src.methods.gradient.trimmed_mean import trimmed_mean
from optax_mtl._src.methods.gradient.upgrad import DualConeState
from optax_mtl._src.methods.gradient.upgrad import dualproj
from optax_mtl._src.methods.gradient.upgrad import upgrad
from optax_mtl._src.engine.statistics import Gramian
from optax_mtl._src.engine.statistics import gramian
from optax_mtl._src.paths.jacobian import value_and_jacobian
from optax_mtl._src.loss_priors import cross_entropy_initial_loss
from optax_mtl._src.loss_priors import cross_entropy_prior_loss
from optax_mtl._src.loss_priors import l2_initial_loss
from optax_mtl._src.loss_priors import l2_prior_loss
from optax_mtl._src.methods.loss.cosmos import COSMOSState
from optax_mtl._src.methods.loss.cosmos import cosmos
from optax_mtl._src.methods.loss.cosmos import scale_by_cosmos
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
from optax_mtl._src.paths.two_batch import same_batch
from optax_mtl._src.paths.two_batch import value_and_jacobians
from optax_mtl._src.methods.loss.pbi import pbi
from optax_mtl._src.methods.loss.pbi import scale_by_pbi
from optax_mtl._src.methods.loss.random import RandomWeightingState
from optax_mtl._src.methods.loss.random import random_weighting
from optax_mtl._src.methods.loss.random import scale_by_random
from optax_mtl._src.methods.loss.realtime import on_log_losses
from optax_mtl._src.methods.loss.realtime import realtime_loss_weighting
from optax_mtl._src.methods.loss.realtime import scale_by_realtime_loss
from optax_mtl._src.methods.loss.stch import STCHState
from optax_mtl._src.methods.loss.stch import scale_by_stch
from optax_mtl._src.methods.loss.stch import stch
from optax_mtl._src.methods.loss.uncertainty import UncertaintyState
from optax_mtl._src.methods.loss.uncertainty import scale_by_uncertainty
from optax_mtl._src.methods.loss.uncertainty import uncertainty_weighting
from optax_mtl._src.core.diagnostics import ConflictDiagnostics
from optax_mtl._src.core.diagnostics import conflict_diagnostics
from optax_mtl._src.core.transform import DiagnosedState
from optax_mtl._src.core.transform import Method
from optax_mtl._src.core.transform import aggregator
from optax_mtl._src.core.transform import chain
from optax_mtl._src.core.transform import layerwise
from optax_mtl._src.core.groups import LayerwiseState
from optax_mtl._src.core.transform import task_scaling
from optax_mtl._src.core.transform import with_diagnostics
from optax_mtl._src.core.weighting import TaskInputs
from optax_mtl._src.core.weighting import Weighting
from optax_mtl._src.core.weighting import WeightsState
from optax_mtl._src.core.weighting import applied_weights
from optax_mtl._src.core.weighting import initial_weights

__version__ = "0.1.0"

__all__ = (
    "COSMOSState",
    "CRMOGMState",
    "ConflictDiagnostics",
    "DBMTLState",
    "DTPState",
    "DiagnosedState",
    "DualConeState",
    "DWAState",
    "ExcessMTLState",
    "FAMOState",
    "FairGradState",
    "GradDropState",
    "GradNormState",
    "GradVacState",
    "Gramian",
    "IMTLLState",
    "LayerwiseState",
    "Method",
    "InitialLossState",
    "MoCoState",
    "MoDoState",
    "NashMTLState",
    "NormalizeGradientsState",
    "PCDState",
    "PCGradState",
    "PriorLossState",
    "RandomWeightingState",
    "SDMGradState",
    "STCHState",
    "TaskInputs",
    "UncertaintyState",
    "Weighting",
    "WeightsState",
    "aggregator",
    "aligned_mtl",
    "applied_weights",
    "auxiliary",
    "cagrad",
    "chain",
    "combine",
    "config",
    "conflict_diagnostics",
    "cosmos",
    "cpu_kernel_status",
    "cr_mogm",
    "cross_entropy_initial_loss",
    "cross_entropy_prior_loss",
    "db_mtl",
    "dtp",
    "dualproj",
    "dwa",
    "excess_mtl",
    "fairgrad",
    "famo",
    "geometric_loss_weighting",
    "graddrop",
    "gradnorm",
    "gradvac",
    "gramian",
    "imtl_g",
    "imtl_l",
    "initial_weights",
    "initial_loss_weighting",
    "krum",
    "l2_initial_loss",
    "l2_prior_loss",
    "layerwise",
    "loss_weights",
    "mean",
    "mgda",
    "moco",
    "modo",
    "nash_mtl",
    "normalize_gradients",
    "on_log_losses",
    "pbi",
    "pcd",
    "pcgrad",
    "prior_loss_weighting",
    "random_weighting",
    "realtime_loss_weighting",
    "same_batch",
    "scale_by_cosmos",
    "scale_by_dtp",
    "scale_by_dwa",
    "scale_by_famo",
    "scale_by_geometric_loss",
    "scale_by_gradnorm",
    "scale_by_imtl_l",
    "scale_by_initial_loss",
    "scale_by_pbi",
    "scale_by_prior_loss",
    "scale_by_random",
    "scale_by_realtime_loss",
    "scale_by_stch",
    "scale_by_uncertainty",
    "scale_tasks",
    "sdmgrad",
    "stch",
    "sum",
    "task_scaling",
    "trimmed_mean",
    "uncertainty_weighting",
    "upgrad",
    "value_and_gramian",
    "value_and_gramian_grad",
    "value_and_jacobian",
    "value_and_jacobians",
    "value_and_representation_grad",
    "value_and_weighted_grad",
    "weighted",
    "weighted_loss",
    "with_diagnostics",
)
