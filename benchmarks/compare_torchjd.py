"""The same work in optax_mtl and TorchJD 0.18, timed in one run on one machine.

Three parts, every row run by both libraries on the same inputs (float32):

* **Aggregators alone**: the per-task gradients of d parameters in, the
  update out, at (T, d) = (10, 2M) and (40, 500k). optax_mtl gets a pytree of
  four leaves (as in ``benchmarks/aggregators.py``) and runs the jitted
  ``tx.update``; TorchJD gets the same numbers as one contiguous [T, d]
  matrix (a Jacobian) and its aggregator is called on it. Every aggregator
  both libraries have is a row, plus the Gramian pass alone (``J J^T``). The
  two updates are compared (relative L2 difference) where the definitions
  match; rows whose update is random (PCGrad's and GradVac's task orders,
  GradDrop's and RLW's draws) or whose definitions differ are timed but not
  compared, and the table says why.
* **T x T solves alone**: each Gramian method's rule on a given T x T
  Gramian, the [T] weights out (optax_mtl's jitted weighting; TorchJD's
  ``Weighting`` on a torch tensor), at T = 10 and 40 on a "mild" Gramian
  (gradients sharing a direction) and a "conflicting" one (about half of the
  pairs conflict), where the active-set and Frank-Wolfe solvers take the
  most steps. The updates the weights give are compared in the Gramian's
  norm.
* **Train steps**: an MLP trunk (512-512-512-512 on 512 inputs, batch 128)
  and the plain CNN of ``benchmarks/models.py`` at the CPU size of
  ``benchmarks/train_step.py`` (widths 16 to 128, batch 32 of 32x32 images),
  T linear regression heads, Adam (lr 1e-4), the update applied. Rows:

  - ``ls``: the summed loss, one backward pass (``jax.value_and_grad``;
    ``loss.sum().backward()``);
  - ``exact:<method>``: every task's gradient of the trunk, the method on
    them, the heads' own gradients (``mtl.value_and_jacobian`` + ``tx.update``
    with ``shared={trunk: True, heads: False}``; TorchJD's ``mtl_backward`` +
    ``jac_to_grad`` with its aggregator);
  - ``representation:<method>``: the method on the gradients of the shared
    features, one weighted backward through the trunk
    (``mtl.value_and_representation_grad``; TorchJD's ``mtl_backward`` with
    the features as the shared tensor, ``jac_to_grad`` on them, then
    ``features.backward``);
  - ``lean:<method>``: the exact Gramian without stacking the T gradients,
    then one weighted backward (``mtl.value_and_gramian_grad`` with
    ``chunk_size=None``: all tasks at once, dense layers' blocks factored,
    as autogram batches the losses; TorchJD's
    ``autogram.Engine`` on the trunk, its weighting, then
    ``autograd.backward`` with the weights on the trunk and ones on the
    heads);
  - two parts of a step, to show where its time goes: ``jacobian alone``,
    the trunk's per-task gradients (``mtl.value_and_jacobian``;
    ``mtl_backward``), and ``gramian alone``, the trunk's exact Gramian
    without the gradients (``mtl.value_and_gramian``;
    ``Engine.compute_gramian``), each with the forward pass.

  Both models start from the same parameters (the JAX ones copied into
  torch); what the first call computes is compared: the gradients before
  Adam, the Jacobian, the Gramian.

Timing: every call is warmed up, then the rows run in interleaved rounds, in
each round an untimed settle call and a timed call of the row's optax_mtl
version, then the same of its TorchJD version, so load drifting on a shared
machine reaches both alike (a train-step call over ``SLOW_CALL_S`` is timed
``SLOW_ROUNDS`` times, without settle calls). A row's time is the median
over rounds; its ratio is ``torchjd_ms / optax_mtl_ms`` (above 1: optax_mtl
is faster). torch runs with ``torch.set_num_threads(os.cpu_count())``; XLA
uses every core.

Needs the ``compare`` extra (torch and TorchJD with its solvers)::

  pip install -e ".[compare]"

Usage::

  python benchmarks/compare_torchjd.py            # full run, ~10 minutes on 2 cores
  python benchmarks/compare_torchjd.py --quick    # tiny sizes, seconds

Writes ``benchmarks/results/compare_torchjd_<platform>.{json,md,png}``
(``_quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import common  # makes ``import optax_mtl`` work from a checkout
import aggregators as aggregator_bench
import models
import train_step as train_step_bench
import optax_mtl as mtl

try:
  import torch
  import torchjd  # noqa: F401  (its version is read from the metadata)
  from torch import nn
  from torchjd import aggregation as tjd
  from torchjd import autogram
  from torchjd import autojac
  _TORCH_ERROR = None
except ImportError as _error:  # main() refuses to run and says how to install
  torch = None
  _TORCH_ERROR = f"{type(_error).__name__}: {_error}"

INSTALL_HINT = ('install the "compare" extra from the repository root: '
                'pip install -e ".[compare]" (torch 2.13 and torchjd 0.18 '
                'with its solvers cvxpy, ecos, quadprog, qpsolvers and scipy)')
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
SECTIONS = ("aggregators", "solves", "train")


# --------------------------------------------------------------------------
# Aggregators alone.


class Pair(NamedTuple):
  """One aggregator in both libraries.

  Attributes:
    name: the row's label.
    ours: ``T -> optax_mtl transformation``.
    theirs: ``T -> callable on a [T, d] torch matrix`` returning the update.
    rtol: largest relative L2 difference accepted between the two updates
      (from the first call, both states fresh), or None when not compared.
    note: what the row compares, or why it is not compared.
  """
  name: str
  ours: Callable[[int], Any]
  theirs: Callable[[int], Callable]
  rtol: float | None
  note: str


class _OnOneBatch:
  """TorchJD's two-batch weightings (MoDo, SDMGrad) on one batch read twice.

  They take the cross matrix ``J1 J2^T`` of two mini-batches; with one batch
  that is the Gramian, as ``mtl.same_batch`` feeds optax_mtl's methods.
  """

  def __init__(self, weighting):
    self.weighting = weighting

  def __call__(self, matrix):
    with torch.no_grad():
      return self.weighting(matrix @ matrix.T) @ matrix


def _dense(gram: mtl.Gramian) -> jax.Array:
  """The T x T matrix ``G`` of optax_mtl's in-range ``Gramian``."""
  return gram.normalized * gram.scale ** 2


def _pair_rows(num_tasks: int) -> list[Pair]:
  """Every aggregator both libraries have, with matching hyperparameters."""
  num_byzantine = min(1, (num_tasks - 3) // 2)  # Krum needs T >= 2 f + 3
  trim = min(1, (num_tasks - 1) // 2)           # trimmed mean needs T > 2 trim
  weights = np.linspace(0.5, 1.5, num_tasks, dtype=np.float32)
  random = "random: not compared"
  rows = [
      Pair("sum (one read)", lambda t: mtl.sum(), lambda t: tjd.Sum(), 1e-5,
           "same definition"),
      Pair("mean", lambda t: mtl.mean(), lambda t: tjd.Mean(), 1e-5, "same definition"),
      Pair("weighted (Constant)", lambda t: mtl.weighted(jnp.asarray(weights)),
           lambda t: tjd.Constant(torch.from_numpy(weights)), 1e-5,
           "same definition"),
      Pair("mgda", lambda t: mtl.mgda(), lambda t: tjd.MGDA(), 3e-2,
           "same min-norm problem; TorchJD's Frank-Wolfe stops at a step of "
           "1e-3, optax_mtl solves to a duality gap of 1e-6"),
      Pair("pcgrad", lambda t: mtl.pcgrad(), lambda t: tjd.PCGrad(), None,
           random + " (task orders drawn independently)"),
      Pair("upgrad", lambda t: mtl.upgrad(), lambda t: tjd.UPGrad(), 1e-3,
           "same QP; TorchJD adds 1e-4 to the normalised Gramian's diagonal"),
      Pair("dualproj", lambda t: mtl.dualproj(), lambda t: tjd.DualProj(), 1e-3,
           "same QP; TorchJD adds 1e-4 to the normalised Gramian's diagonal"),
      Pair("imtl_g", lambda t: mtl.imtl_g(), lambda t: tjd.IMTLG(), 1e-3,
           "same definition"),
      Pair("aligned_mtl", lambda t: mtl.aligned_mtl(),
           lambda t: tjd.AlignedMTL(pref_vector=torch.ones(t)), 1e-3,
           "scale 'min'; TorchJD with pref_vector = ones (its default, the "
           "mean, gives 1/T of the authors' sum)"),
      Pair("config", lambda t: mtl.config(), lambda t: tjd.ConFIG(), 1e-3,
           "same definition"),
      Pair("nash_mtl", lambda t: mtl.nash_mtl(num_tasks=t),
           lambda t: tjd.NashMTL(n_tasks=t), 1e-2,
           "same direction; both capped at norm 1 here (TorchJD: ECOS on "
           "G / ||G||_F, optax_mtl: Newton on G)"),
      Pair("cagrad", lambda t: mtl.cagrad(c=0.4, rescale=0),
           lambda t: tjd.CAGrad(c=0.4), 1e-2,
           "c = 0.4, no rescaling (TorchJD's form); TorchJD: Clarabel, "
           "optax_mtl: Frank-Wolfe"),
      Pair("fairgrad", lambda t: mtl.fairgrad(alpha=1.0),
           lambda t: tjd.FairGrad(alpha=1.0), 1e-2,
           "alpha = 1; TorchJD: scipy least squares, optax_mtl: Newton"),
      Pair("gradvac", lambda t: mtl.gradvac(num_tasks=t), lambda t: tjd.GradVac(),
           None, random + " (task orders drawn independently)"),
      Pair("trimmed_mean", lambda t: mtl.trimmed_mean(trim),
           lambda t: tjd.TrimmedMean(trim), 1e-5, f"trim {trim}"),
      Pair("graddrop", lambda t: mtl.graddrop(), lambda t: tjd.GradDrop(), None,
           random + " (per-coordinate uniforms)"),
      Pair("random (RLW)", lambda t: mtl.random_weighting(), lambda t: tjd.Random(),
           None, random + " (random weights)"),
      Pair("pcd", lambda t: mtl.pcd(num_tasks=t), lambda t: tjd.PCD(), 1e-3,
           "tau 0.02, beta 0.999"),
      Pair("cr_mogm(mgda)", lambda t: mtl.cr_mogm(mtl.mgda(), num_tasks=t),
           lambda t: tjd.GramianWeightedAggregator(
               tjd.CRMOGMWeighting(tjd.MGDAWeighting())), 3e-2,
           "alpha 0.9 (first call: MGDA's weights, see mgda)"),
      Pair("excess_mtl", lambda t: mtl.excess_mtl(robust_step_size=1e-2,
                                                   warmup_steps=1, num_tasks=t),
           lambda t: tjd.ExcessMTL(robust_step_size=1e-2, n_warmup_steps=1), 1e-5,
           "step 1e-2, one warm-up update (first call: the mean)"),
      Pair("modo (one batch)", lambda t: mtl.same_batch(mtl.modo(num_tasks=t)),
           lambda t: _OnOneBatch(tjd.MoDoWeighting()), None,
           "gamma 0.1, rho 0.1, J1 = J2 = J3; definitions differ: optax_mtl's "
           "gamma and rho are relative to s1 s2 (largest norms), TorchJD's to "
           "the raw J1 J2^T: not compared"),
      Pair("sdmgrad (one batch)", lambda t: mtl.same_batch(mtl.sdmgrad(num_tasks=t)),
           lambda t: _OnOneBatch(tjd.SDMGradWeighting()), None,
           "definitions differ: TorchJD steps 10 with momentum 0.5 on J J^T "
           "over the squared mean norm, optax_mtl 0.5 over the squared "
           "largest norm: not compared"),
  ]
  if num_tasks >= 3:
    rows.append(Pair("krum", lambda t: mtl.krum(num_byzantine),
                     lambda t: tjd.Krum(num_byzantine), 1e-5,
                     f"f = {num_byzantine}, one selected"))
  return rows


def _flat_update(update) -> np.ndarray:
  return np.concatenate([np.asarray(leaf, np.float64).reshape(-1)
                         for leaf in jax.tree.leaves(update)])


def _relative_difference(ours: np.ndarray, theirs: np.ndarray) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  scale = max(float(np.linalg.norm(theirs)), float(np.finfo(np.float32).tiny))
  return float(np.linalg.norm(ours - theirs) / scale)


def _time_rows(rows, calls, repeats) -> None:
  """Times each row's ``[optax_mtl]`` and ``[torchjd]`` calls, interleaved,
  and adds the times, their ratio and whether the results agree."""
  times = aggregator_bench.time_interleaved(calls, repeats)
  for name, row in rows.items():
    row["optax_mtl_ms"] = 1e3 * times[f"{name} [optax_mtl]"]
    row["torchjd_ms"] = 1e3 * times[f"{name} [torchjd]"]
    row["ratio"] = row["torchjd_ms"] / row["optax_mtl_ms"]
    row["agree"] = None if row["rtol"] is None else bool(row["rel_diff"] <= row["rtol"])


def aggregator_case(num_tasks: int, dim: int, repeats: int, compiler_options):
  """Times every pair (and the Gramian pass) at one (T, d); one results entry."""
  grads = aggregator_bench.make_grads(num_tasks, dim)
  params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), grads)
  losses = jnp.linspace(1.0, 2.0, num_tasks)
  # The torch matrix holds the leaves in jax.tree.leaves order, each
  # flattened: the same numbers, laid out as TorchJD expects a Jacobian.
  matrix = torch.from_numpy(np.ascontiguousarray(np.concatenate(
      [np.asarray(leaf).reshape(num_tasks, -1) for leaf in jax.tree.leaves(grads)],
      axis=1)))
  calls, rows = {}, {}
  gram_fn = jax.jit(lambda g: _dense(mtl.gramian(g))).lower(grads).compile(
      compiler_options)
  calls["gramian pass (J J^T) [optax_mtl]"] = (gram_fn, (grads,))
  calls["gramian pass (J J^T) [torchjd]"] = (lambda m: m @ m.T, (matrix,))
  ours, theirs = np.asarray(gram_fn(grads)), (matrix @ matrix.T).numpy()
  dense = matrix.numpy().astype(np.float64)
  exact = dense @ dense.T
  del dense
  # Float32 sums of d products: the two differ by the rounding of either,
  # so each is also measured against the float64 Gramian.
  rows["gramian pass (J J^T)"] = {
      "rel_diff": _relative_difference(ours, theirs), "rtol": 1e-3,
      "optax_mtl_vs_float64": _relative_difference(ours, exact),
      "torchjd_vs_float64": _relative_difference(theirs, exact),
      "note": (f"the T x T matrix alone; against the float64 Gramian: optax_mtl "
               f"{_relative_difference(ours, exact):.1e}, TorchJD "
               f"{_relative_difference(theirs, exact):.1e}")}
  for pair in _pair_rows(num_tasks):
    tx = pair.ours(num_tasks)
    state = tx.init(params)
    update = jax.jit(lambda g, s, p, l, tx=tx: tx.update(g, s, p, losses=l)).lower(
        grads, state, params, losses).compile(compiler_options)
    # First calls, both states fresh: the updates compared.
    torch.manual_seed(0)
    ours = _flat_update(update(grads, state, params, losses)[0])
    theirs = pair.theirs(num_tasks)(matrix).numpy()
    rows[pair.name] = {
        "rel_diff": None if pair.rtol is None else _relative_difference(ours, theirs),
        "rtol": pair.rtol, "note": pair.note}
    calls[f"{pair.name} [optax_mtl]"] = (update, (grads, state, params, losses))
    calls[f"{pair.name} [torchjd]"] = (pair.theirs(num_tasks), (matrix,))
  _time_rows(rows, calls, repeats)
  return {"T": num_tasks, "d": dim, "rows": rows}


# --------------------------------------------------------------------------
# T x T solves alone.


class SolvePair(NamedTuple):
  """One Gramian weighting in both libraries: [T] weights from a T x T matrix.

  Attributes:
    name: the row's label (the aggregator row of the same method).
    theirs: ``T -> TorchJD Weighting`` called on the torch Gramian.
    note: None to take the aggregator row's tolerance and note; else why
      the weights are not compared.
  """
  name: str
  theirs: Callable[[int], Callable]
  note: str | None = None


def _solve_pairs(num_tasks: int) -> list[SolvePair]:
  """Every Gramian weighting both libraries have (hyperparameters as in
  :func:`_pair_rows`, whose optax_mtl methods, tolerances and notes serve)."""
  num_byzantine = min(1, (num_tasks - 3) // 2)
  pairs = [
      SolvePair("mgda", lambda t: tjd.MGDAWeighting()),
      SolvePair("pcgrad", lambda t: tjd.PCGradWeighting()),
      SolvePair("upgrad", lambda t: tjd.UPGradWeighting()),
      SolvePair("dualproj", lambda t: tjd.DualProjWeighting()),
      SolvePair("imtl_g", lambda t: tjd.IMTLGWeighting()),
      SolvePair("aligned_mtl", lambda t: tjd.AlignedMTLWeighting(pref_vector=torch.ones(t))),
      SolvePair("cagrad", lambda t: tjd.CAGradWeighting(c=0.4)),
      SolvePair("fairgrad", lambda t: tjd.FairGradWeighting(alpha=1.0)),
      SolvePair("gradvac", lambda t: tjd.GradVacWeighting()),
      SolvePair("pcd", lambda t: tjd.PCDWeighting()),
      SolvePair("cr_mogm(mgda)", lambda t: tjd.CRMOGMWeighting(tjd.MGDAWeighting())),
  ]
  if num_tasks >= 3:
    pairs.append(SolvePair(
        "krum", lambda t: tjd.KrumWeighting(num_byzantine),
        f"f = {num_byzantine}, one selected; definitions differ: TorchJD's "
        "score sums distances, optax_mtl's (Blanchard et al.) squared "
        "distances, so near ties may select differently: not compared"))
  return pairs


def _update_difference(gram, ours, theirs) -> float:
  """Relative difference of the updates ``sum_t w_t g_t`` the weights give,
  ``||a - b||_G / ||b||_G`` with ``||w||_G^2 = w^T G w``, read from the
  Gramian: weights may differ along a null direction of G and give the same
  update (as the aggregator rows compare updates)."""
  gram = np.asarray(gram, np.float64)
  diff = np.asarray(ours, np.float64) - np.asarray(theirs, np.float64)
  theirs = np.asarray(theirs, np.float64)
  scale = max(float(theirs @ gram @ theirs), float(np.finfo(np.float32).tiny))
  return float(np.sqrt(max(float(diff @ gram @ diff), 0.0) / scale))


def exact_weights(name: str, gram: np.ndarray) -> np.ndarray | None:
  """A float64 reference solution of the rows whose weights are a QP on G
  (quadprog, an active-set solver, with a ridge of 1e-12 of the largest
  diagonal entry so the matrix it needs positive definite exists); None for
  the others."""
  import quadprog  # installed with torchjd[full] (the "compare" extra)
  num = gram.shape[0]
  matrix = np.asarray(gram, np.float64)
  ridged = matrix + 1e-12 * matrix.diagonal().max() * np.eye(num)
  if name in ("mgda", "cr_mogm(mgda)"):  # CR-MOGM's first call: MGDA's weights
    # min 1/2 w'Gw subject to sum(w) = 1, w >= 0.
    constraints = np.concatenate([np.ones((num, 1)), np.eye(num)], axis=1)
    bounds = np.concatenate([[1.0], np.zeros(num)])
    return quadprog.solve_qp(ridged, np.zeros(num), constraints, bounds, meq=1)[0]

  def project(u):
    # The projection of sum_t u_t g_t onto {y : <g_j, y> >= 0 for all j}:
    # min 1/2 (v - u)'G(v - u) subject to G v >= 0.
    return quadprog.solve_qp(ridged, matrix @ u, matrix, np.zeros(num))[0]
  if name == "upgrad":
    return np.mean([project(e) for e in np.eye(num)], axis=0)
  if name == "dualproj":
    return project(np.full(num, 1.0 / num))
  return None


def solve_case(num_tasks: int, kind: str, repeats: int, compiler_options):
  """Times every weighting pair on one T x T Gramian; one results entry."""
  gram = aggregator_bench.solve_gramian(num_tasks, kind)
  cosines = gram / np.sqrt(np.outer(gram.diagonal(), gram.diagonal()))
  conflicts = int((np.triu(cosines, 1) < 0).sum())
  matrix, torch_matrix = jnp.asarray(gram), torch.from_numpy(gram)
  by_name = {pair.name: pair for pair in _pair_rows(num_tasks)}
  calls, rows = {}, {}
  for solve in _solve_pairs(num_tasks):
    pair = by_name[solve.name]
    ours = aggregator_bench._solve(pair.ours(num_tasks), num_tasks)  # pylint: disable=protected-access
    ours = ours.lower(matrix).compile(compiler_options)
    torch.manual_seed(0)
    # First calls, both states fresh: the weights compared.
    ours_w = np.asarray(ours(matrix))
    theirs_w = solve.theirs(num_tasks)(torch_matrix).numpy()
    rtol = pair.rtol if solve.note is None else None
    rows[solve.name] = {
        "rel_diff": None if rtol is None else _update_difference(gram, ours_w, theirs_w),
        "rtol": rtol, "note": pair.note if solve.note is None else solve.note}
    exact = exact_weights(solve.name, gram)
    if exact is not None:
      rows[solve.name]["vs_float64"] = {
          "optax_mtl": _update_difference(gram, ours_w, exact),
          "torchjd": _update_difference(gram, theirs_w, exact)}
    calls[f"{solve.name} [optax_mtl]"] = (ours, (matrix,))
    calls[f"{solve.name} [torchjd]"] = (solve.theirs(num_tasks), (torch_matrix,))
  _time_rows(rows, calls, repeats)
  return {"T": num_tasks, "kind": kind, "conflicting_pairs": conflicts,
          "pairs": num_tasks * (num_tasks - 1) // 2,
          "min_cosine": float(cosines.min()), "rows": rows}


# --------------------------------------------------------------------------
# Train steps.


class Setting(NamedTuple):
  """One model of the train-step part, at every T of ``tasks``."""
  kind: str          # "mlp" or "cnn"
  in_dim: int        # MLP inputs (unused by the CNN)
  width: int         # MLP width (unused by the CNN)
  depth: int         # MLP depth (unused by the CNN)
  widths: tuple[int, ...]  # CNN widths (unused by the MLP)
  image: int         # CNN image side (unused by the MLP)
  batch: int
  tasks: tuple[int, ...]
  rounds: int


FULL_SETTINGS = (
    Setting("mlp", 512, 512, 4, (), 0, 128, (10, 40), 11),
    Setting("cnn", 0, 0, 0, tuple(w // 4 for w in models.CNN_WIDTHS), 32, 32, (10, 40), 7),
)
QUICK_SETTINGS = (
    Setting("mlp", 16, 16, 2, (), 0, 8, (3,), 2),
    Setting("cnn", 0, 0, 0, (4, 8), 8, 4, (3,), 2),
)
TRAIN_ROWS = ("ls", "exact:mean", "exact:mgda", "exact:pcgrad", "exact:upgrad",
              "representation:mgda", "representation:upgrad", "lean:mgda",
              "lean:upgrad", "jacobian alone", "gramian alone")
# Parts of a step, timed to show what an exact or lean step spends its time
# on; not in the summaries of whole steps.
COMPONENT_ROWS = ("jacobian alone", "gramian alone")
# All tasks at once, as autogram runs them: dense layers' Gramian blocks from
# their inputs and the T output cotangents, the other leaves' T gradients held.
LEAN_CHUNK_SIZE = None
# Relative L2 difference accepted between what the two libraries compute at
# the first call (same parameters and batch): the gradients before Adam, the
# trunk's Jacobian, the Gramian. PCGrad draws its task orders: not compared;
# MGDA: TorchJD's Frank-Wolfe stops early (see the aggregator rows).
CHECK_RTOL = {"ls": 1e-4, "exact:mean": 1e-4, "exact:mgda": 3e-2,
              "exact:upgrad": 1e-3, "representation:mgda": 3e-2,
              "representation:upgrad": 1e-3, "lean:mgda": 3e-2, "lean:upgrad": 1e-3,
              "jacobian alone": 1e-4, "gramian alone": 1e-4}
TORCH_AGGREGATORS = {"mean": lambda: tjd.Mean(), "mgda": lambda: tjd.MGDA(),
                     "pcgrad": lambda: tjd.PCGrad(), "upgrad": lambda: tjd.UPGrad()}
TORCH_WEIGHTINGS = {"mean": lambda: tjd.MeanWeighting(), "mgda": lambda: tjd.MGDAWeighting(),
                    "pcgrad": lambda: tjd.PCGradWeighting(),
                    "upgrad": lambda: tjd.UPGradWeighting()}


class TorchNet(NamedTuple):
  """A torch copy of a JAX model: trunk, heads and the layers holding weights."""
  trunk: Any
  heads: Any
  layers: list   # the trunk's weighted layers, in the JAX trunk's order
  conv: bool


def torch_net(setting: Setting, params) -> TorchNet:
  """The JAX parameters copied into torch modules (Linear: w.T; conv: OIHW)."""
  modules, layers = [], []
  if setting.kind == "mlp":
    for layer in params["trunk"]:
      w = np.asarray(layer["w"])
      linear = nn.Linear(w.shape[0], w.shape[1])
      with torch.no_grad():
        linear.weight.copy_(torch.tensor(w.T))
        linear.bias.copy_(torch.tensor(np.asarray(layer["b"])))
      modules += [linear, nn.ReLU()]
      layers.append(linear)
  else:
    size = setting.image
    widths = [layer["w"].shape[3] for layer in params["trunk"]]
    for layer, stride in zip(params["trunk"], models.cnn_strides(widths)):
      w = np.asarray(layer["w"])
      c_in, c_out = w.shape[2], w.shape[3]
      # XLA's 'SAME' padding, which models.cnn_features uses.
      ((low, high),) = jax.lax.padtype_to_pads((size,), (3,), (stride,), "SAME")
      size = -(-size // stride)
      conv = nn.Conv2d(c_in, c_out, 3, stride=stride)
      with torch.no_grad():
        conv.weight.copy_(torch.tensor(w.transpose(3, 2, 0, 1)))
        conv.bias.copy_(torch.tensor(np.asarray(layer["b"])))
      modules += [nn.ZeroPad2d((low, high, low, high)), conv, nn.ReLU()]
      layers.append(conv)
    modules += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]  # global average pooling
  heads_w = np.asarray(params["heads"]["w"])
  heads = nn.Linear(heads_w.shape[0], heads_w.shape[1])
  with torch.no_grad():
    heads.weight.copy_(torch.tensor(heads_w.T))
    heads.bias.copy_(torch.tensor(np.asarray(params["heads"]["b"])))
  return TorchNet(nn.Sequential(*modules), heads, layers, setting.kind == "cnn")


def _jax_layout(net: TorchNet, weight, batched: bool) -> np.ndarray:
  """A torch weight (or its Jacobian, with a leading task axis) in JAX's layout."""
  w = weight.numpy()
  lead = (0,) if batched else ()
  k = len(lead)
  # Linear [out, in] -> [in, out]; conv [out, in, h, w] -> [h, w, in, out].
  axes = (k + 2, k + 3, k + 1, k) if net.conv else (k + 1, k)
  return w.transpose(lead + axes)


def torch_grads_as_jax(net: TorchNet):
  """The torch gradients in the JAX parameters' layout and tree."""
  return {"trunk": [{"w": _jax_layout(net, m.weight.grad, False), "b": m.bias.grad.numpy()}
                    for m in net.layers],
          "heads": {"w": net.heads.weight.grad.numpy().T,
                    "b": net.heads.bias.grad.numpy()}}


def torch_jacobian_as_jax(net: TorchNet):
  """The trunk's per-task gradients (``.jac`` fields) in the JAX layout, [T, ...]."""
  return [{"w": _jax_layout(net, m.weight.jac, True), "b": m.bias.jac.numpy()}
          for m in net.layers]


def torch_gradient_fn(label: str, net: TorchNet):
  """``grads(x, y)``: the row's gradients into the ``.grad`` fields (zeroed first).

  ``jacobian alone`` fills the trunk's ``.jac`` fields instead, and
  ``gramian alone`` returns the Gramian; the other rows return None.
  """
  trunk_params = list(net.trunk.parameters())
  head_params = list(net.heads.parameters())
  every = trunk_params + head_params

  def losses_of(features, y):
    return ((net.heads(features) - y) ** 2).mean(dim=0)

  def zero():
    for p in every:
      p.grad = None
      if hasattr(p, "jac"):
        del p.jac

  path, _, method = label.partition(":")
  if label == "ls":
    def grads(x, y):
      zero()
      losses_of(net.trunk(x), y).sum().backward()
    return grads
  # The T losses share the heads' matrix product: without retain_graph,
  # mtl_backward would free it after the first task's backward pass.
  def jacobian(x, y):
    zero()
    features = net.trunk(x)
    autojac.mtl_backward(list(losses_of(features, y)), features=features,
                         retain_graph=True)

  if label == "jacobian alone":
    return jacobian
  if path == "exact":
    aggregator = TORCH_AGGREGATORS[method]()

    def grads(x, y):
      jacobian(x, y)
      autojac.jac_to_grad(trunk_params, aggregator)
    return grads
  if path == "representation":
    aggregator = TORCH_AGGREGATORS[method]()

    def grads(x, y):
      zero()
      features = net.trunk(x)
      leaf = features.detach().requires_grad_()
      losses = losses_of(leaf, y)
      autojac.mtl_backward(list(losses), features=leaf, shared_params=[leaf],
                           tasks_params=[head_params] * losses.shape[0],
                           retain_graph=True)
      autojac.jac_to_grad([leaf], aggregator)
      features.backward(leaf.grad)
    return grads
  engine = autogram.Engine(net.trunk, batch_dim=None)
  if label == "gramian alone":
    def grads(x, y):
      zero()
      return engine.compute_gramian(losses_of(net.trunk(x), y))
    return grads
  weighting = TORCH_WEIGHTINGS[method]()

  def grads(x, y):
    zero()
    losses = losses_of(net.trunk(x), y)
    weights = weighting(engine.compute_gramian(losses))
    # Weights on the trunk, ones on the heads (each head its own task's
    # gradient), as optax_mtl's shared={trunk: True, heads: False}.
    torch.autograd.backward(losses, grad_tensors=weights, inputs=trunk_params,
                            retain_graph=True)
    torch.autograd.backward(losses.sum(), inputs=head_params)
  return grads


def _jax_model(setting: Setting, num_tasks: int, key) -> train_step_bench.Model:
  if setting.kind == "mlp":
    params = models.mlp_init(key, num_tasks, setting.in_dim, setting.width, setting.depth)
    name = (f"MLP {setting.in_dim}-" + "-".join([str(setting.width)] * setting.depth)
            + f", batch {setting.batch}")
    return train_step_bench.Model(name, params, models.mlp_features)
  params = models.cnn_init(key, num_tasks, 3, setting.widths)
  name = ("CNN " + "-".join(map(str, setting.widths))
          + f", batch {setting.batch} of {setting.image}x{setting.image}x3")
  return train_step_bench.Model(name, params, models.cnn_features)


def _batches(setting: Setting, num_tasks: int, key, count: int = 2):
  """``count`` batches as JAX arrays and as torch tensors (images: NCHW)."""
  shape = ((setting.batch, setting.in_dim) if setting.kind == "mlp" else
           (setting.batch, setting.image, setting.image, 3))
  ours, theirs = [], []
  for i in range(count):
    kx, ky = jax.random.split(jax.random.fold_in(key, i + 1))
    x = jax.random.normal(kx, shape)
    y = jax.random.normal(ky, (setting.batch, num_tasks))
    ours.append((x, y))
    x_np = np.asarray(x)
    if setting.kind == "cnn":
      x_np = x_np.transpose(0, 3, 1, 2)
    # Copies: torch wants writable memory, JAX's host views are read-only.
    theirs.append((torch.from_numpy(np.array(x_np, order="C")),
                   torch.from_numpy(np.array(y))))
  return ours, theirs


def _torch_stepper(grads, optimizer):
  def call(x, y):
    grads(x, y)
    if optimizer is not None:
      optimizer.step()
  return call


# A call longer than this is timed without settle calls and at most
# SLOW_ROUNDS times: at seconds per call, the memory a previous call released
# does not show, and full rounds would take most of an hour.
SLOW_CALL_S = 2.0
SLOW_ROUNDS = 3


def _jax_row(label: str, model, num_tasks: int, opt, batch, compiler_options):
  """One row's optax_mtl side: ``(call(x, y), what its first call computes)``.

  The second item is what is compared with TorchJD: the step's gradients
  before the optimizer, the trunk's per-task gradients (``jacobian
  alone``) or the Gramian (``gramian alone``).
  """
  params = jax.tree.map(jnp.copy, model.params)

  def compile_fn(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options)

  if label in COMPONENT_ROWS:
    if label == "jacobian alone":
      fn = lambda p, x, y: mtl.value_and_jacobian(model.losses)(p, x, y)[1]["trunk"]
    else:
      fn = lambda p, x, y: _dense(
          mtl.value_and_gramian(model.losses, shared=train_step_bench.SHARED,
                                chunk_size=LEAN_CHUNK_SIZE)(p, x, y)[1])
    compiled = compile_fn(fn, params, *batch)

    def call(x, y):
      jax.block_until_ready(compiled(params, x, y))
    return call, compiled(params, *batch)
  grads_fn, init = train_step_bench.gradient_fn(label, model, num_tasks,
                                                LEAN_CHUNK_SIZE)
  grads = compile_fn(grads_fn, init(params), params, *batch)(init(params), params, *batch)[1]
  # Fresh buffers: the step donates them, and a state may hold one array twice.
  carry = jax.tree.map(jnp.copy, (params, (init(params), opt.init(params))))
  compiled = jax.jit(train_step_bench.train_step(grads_fn, opt),
                     donate_argnums=(0, 1)).lower(*carry, *batch).compile(compiler_options)
  return train_step_bench.stepper(compiled, carry), grads


def train_case(setting: Setting, num_tasks: int, rounds: int, compiler_options):
  """Both libraries' steps for one model and T; one results entry."""
  key = jax.random.key(0)
  model = _jax_model(setting, num_tasks, key)
  ours_batches, theirs_batches = _batches(setting, num_tasks, key)
  opt = optax.adam(1e-4)
  calls, rows = {}, {}
  for label in TRAIN_ROWS:
    ours_call, ours_result = _jax_row(label, model, num_tasks, opt, ours_batches[0],
                                      compiler_options)
    torch.manual_seed(0)
    net = torch_net(setting, model.params)
    grads = torch_gradient_fn(label, net)
    rtol = CHECK_RTOL.get(label)
    rel_diff = None
    if rtol is not None:
      output = grads(*theirs_batches[0])
      theirs_result = (output.numpy() if label == "gramian alone" else
                       torch_jacobian_as_jax(net) if label == "jacobian alone" else
                       torch_grads_as_jax(net))
      rel_diff = _relative_difference(_flat_update(ours_result),
                                      _flat_update(theirs_result))
    optimizer = (None if label in COMPONENT_ROWS else
                 torch.optim.Adam(list(net.trunk.parameters()) + list(net.heads.parameters()),
                                  lr=1e-4))
    calls[f"{label} [optax_mtl]"] = (ours_call, ours_batches)
    calls[f"{label} [torchjd]"] = (_torch_stepper(grads, optimizer), theirs_batches)
    rows[label] = {"check_rel_diff": rel_diff, "check_rtol": rtol,
                   "agree": None if rtol is None else bool(rel_diff <= rtol)}
  # The first call of a torch step sets it up; the JAX steps are compiled.
  times = train_step_bench.time_calls(calls, rounds, SLOW_CALL_S, SLOW_ROUNDS)
  for label, row in rows.items():
    ours, theirs = times[f"{label} [optax_mtl]"], times[f"{label} [torchjd]"]
    row["optax_mtl_ms"] = 1e3 * statistics.median(ours)
    row["torchjd_ms"] = 1e3 * statistics.median(theirs)
    row["ratio"] = row["torchjd_ms"] / row["optax_mtl_ms"]
    row["rounds"] = {"optax_mtl": len(ours), "torchjd": len(theirs)}
  return {"model": model.name, "kind": setting.kind, "tasks": num_tasks,
          "params": models.num_params(model.params), "rows": rows}


# --------------------------------------------------------------------------
# Report.


def _versions() -> dict[str, str]:
  from importlib import metadata
  out = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "optax", "optax_mtl", "torch", "torchjd", "numpy",
               "cvxpy", "qpsolvers", "quadprog", "scipy"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = "absent"
  return out


def _check_cell(row, key="rel_diff", rtol_key="rtol") -> str:
  if row[rtol_key] is None:
    return "not compared"
  mark = "yes" if row["agree"] else "**NO**"
  return f"{mark} ({row[key]:.1e})"


def _summary(rows) -> str:
  ratios = [r["ratio"] for r in rows]
  faster = sum(r > 1 for r in ratios)
  geo = float(np.exp(np.mean(np.log(ratios))))
  return (f"optax_mtl faster in {faster} of {len(ratios)} rows; geometric mean "
          f"of TorchJD / optax_mtl {geo:.2f}x, range {min(ratios):.2f}x to "
          f"{max(ratios):.2f}x.")


def _dates(report) -> str:
  """The run's date, or each section's when they were run on different days."""
  dates = {s: report.get(f"{s}_date", report["date"]) for s in SECTIONS}
  if len(set(dates.values())) == 1:
    return dates["aggregators"]
  return ", ".join(f"{d} ({s})" for s, d in dates.items())


def _kernels(report) -> str:
  """How optax_mtl computed its Gramians on the CPU, per section."""
  kernels = {s: report.get(f"{s}_cpu_kernel") for s in SECTIONS}
  if not any(kernels.values()):
    return ""
  if len(set(kernels.values())) == 1:
    return f" optax_mtl's Gramian on the CPU: {kernels[SECTIONS[0]]}."
  return " optax_mtl's Gramian on the CPU: " + ", ".join(
      f"{k or 'not recorded'} ({s})" for s, k in kernels.items()) + "."


def markdown(report, figure: str | None = None) -> str:
  """The results page; ``figure``, the bar chart's file name, is shown first."""
  v = report["versions"]
  lines = [
      "# optax_mtl against TorchJD: the same work, one run",
      "",
      f"Measured {_dates(report)} on {report['device']} ({report['cpu_count']} "
      f"cores; JAX backend `{report['backend']}`, torch on the CPU with "
      f"{report['torch_threads']} threads), float32. Versions: optax_mtl "
      f"{v['optax_mtl']}, jax {v['jax']}, jaxlib {v['jaxlib']}, optax "
      f"{v['optax']}; torch {v['torch']}, torchjd {v['torchjd']} (cvxpy "
      f"{v['cvxpy']}, qpsolvers {v['qpsolvers']}, scipy {v['scipy']}); numpy "
      f"{v['numpy']}, Python {v['python']}. `benchmarks/compare_torchjd.py"
      + (" --quick" if report["quick"] else "") + "`." + _kernels(report),
      "",
      "Ratio: TorchJD ms / optax_mtl ms (above 1: optax_mtl is faster). "
      "Times: median of interleaved rounds (each timed call after an untimed "
      "one of the same row; the two libraries' calls alternate).",
  ]
  if figure:
    lines += ["", f"![TorchJD ms / optax_mtl ms of every row]({figure})"]
  lines += [
      "",
      "## Aggregators alone",
      "",
      "optax_mtl: the jitted `tx.update` on a pytree of four leaves; TorchJD: "
      "the aggregator called on the same numbers as one [T, d] matrix. "
      "Same update: relative L2 difference of the two updates (first call, "
      "fresh states) within the row's tolerance.",
  ]
  for case in report["aggregators"]:
    lines += ["", f"### T = {case['T']}, d = {case['d']:,}", "",
              "| aggregator | optax_mtl ms | TorchJD ms | ratio | same update (rel. diff.) | note |",
              "|---|---|---|---|---|---|"]
    for name, row in case["rows"].items():
      lines.append(f"| {name} | {row['optax_mtl_ms']:.2f} | {row['torchjd_ms']:.2f} | "
                   f"{row['ratio']:.2f} | {_check_cell(row)} | {row['note']} |")
    lines += ["", _summary([r for n, r in case["rows"].items()
                            if not n.startswith("gramian pass")])]
  lines += [
      "", "## T x T solves alone", "",
      "Each Gramian method's rule on a given T x T Gramian (largest diagonal "
      "entry 1): optax_mtl's jitted weighting, TorchJD's `Weighting` called "
      "on the same matrix as a torch tensor. \"mild\": task gradients "
      "sharing a common direction (64 dimensions); \"conflicting\": "
      "independent gradients in 3 T dimensions. Same update: "
      "`||w - w'||_G / ||w'||_G`, the relative difference of the updates "
      "the two weight vectors give (first call, fresh states), within the "
      "aggregator row's tolerance. Where the weights solve a QP on G (MGDA, "
      "UPGrad, DualProj), both are also measured against a float64 "
      "solution of it.",
  ]
  for case in report["solves"]:
    lines += ["", f"### T = {case['T']}, {case['kind']} ({case['conflicting_pairs']} "
                  f"of {case['pairs']} pairs conflict, smallest cosine "
                  f"{case['min_cosine']:.2f})", "",
              "| weighting | optax_mtl ms | TorchJD ms | ratio | same update (rel. diff.) | note |",
              "|---|---|---|---|---|---|"]
    for name, row in case["rows"].items():
      note = row["note"]
      if "vs_float64" in row:
        exact = row["vs_float64"]
        note += (f"; against the float64 solution (quadprog): optax_mtl "
                 f"{exact['optax_mtl']:.1e}, TorchJD {exact['torchjd']:.1e}")
      lines.append(f"| {name} | {row['optax_mtl_ms']:.3f} | {row['torchjd_ms']:.3f} | "
                   f"{row['ratio']:.2f} | {_check_cell(row)} | {note} |")
    lines += ["", _summary(list(case["rows"].values()))]
  lines += [
      "", "## Train steps", "",
      "T linear regression heads, Adam (lr 1e-4), the update applied. "
      "optax_mtl: one jitted step (parameters and optimizer state donated); "
      "TorchJD: `mtl_backward` + `jac_to_grad` (exact), `mtl_backward` on the "
      "detached features + `features.backward` (representation), "
      "`autogram.Engine(trunk, batch_dim=None)` + the weighting + "
      "`autograd.backward` (lean; optax_mtl's `value_and_gramian_grad` with "
      "`chunk_size=None`: all tasks at once, dense-layer blocks factored), "
      "then `torch.optim.Adam`. Parts of a step "
      "(not in the summary): `jacobian alone`, the trunk's per-task gradients "
      "(`mtl.value_and_jacobian`; `mtl_backward`); `gramian alone`, the trunk's "
      "exact Gramian (`mtl.value_and_gramian`; `Engine.compute_gramian`), each "
      "with its forward pass. Same result: relative L2 difference of what the "
      "first call computes from the same parameters and batch (the gradients "
      "before Adam, the Jacobian, the Gramian). The MGDA and UPGrad rows "
      "compare what each library's solver returns: TorchJD's MGDA stops its "
      "Frank-Wolfe at a step of 1e-3 and its UPGrad adds 1e-4 to the "
      "normalised Gramian's diagonal, which moves its update further where "
      "the trunk's Gramian is ill-conditioned; the Jacobian, the Gramian and "
      "the mean agree in every case. Calls: timed calls of each "
      f"library (a call over {SLOW_CALL_S:g} s is timed {SLOW_ROUNDS} times, "
      "without settle calls).",
  ]
  for case in report["train"]:
    lines += ["", f"### {case['model']}, T = {case['tasks']} "
                  f"({case['params']:,} parameters)", "",
              "| row | optax_mtl ms | TorchJD ms | ratio | same result (rel. diff.) | calls |",
              "|---|---|---|---|---|---|"]
    for label, row in case["rows"].items():
      lines.append(f"| {label} | {row['optax_mtl_ms']:.2f} | {row['torchjd_ms']:.2f} | "
                   f"{row['ratio']:.2f} | "
                   f"{_check_cell(row, 'check_rel_diff', 'check_rtol')} | "
                   f"{row['rounds']['optax_mtl']} / {row['rounds']['torchjd']} |")
    lines += ["", _summary([r for n, r in case["rows"].items() if n not in COMPONENT_ROWS])]
  return "\n".join(lines) + "\n"


def plot(report, path: pathlib.Path) -> None:
  """Horizontal bars of the ratios, log scale, lines at 1 and 1.5."""
  import matplotlib.pyplot as plt
  panels = [("Aggregators alone", [(f"T={c['T']}, d={c['d']:,}", c["rows"])
                                   for c in report["aggregators"]]),
            ("T x T solves alone", [(f"T={c['T']}, {c['kind']}", c["rows"])
                                    for c in report["solves"]]),
            ("Train steps", [(f"{c['kind'].upper()}, T={c['tasks']}", c["rows"])
                             for c in report["train"]])]
  heights = [max(len(groups) * len(groups[0][1]), 1) for _, groups in panels]
  fig, axes = plt.subplots(1, len(panels), figsize=(20, 0.16 * max(heights) + 2.5))
  for ax, (title, groups) in zip(axes, panels):
    names = list(dict.fromkeys(n for _, rows in groups for n in rows))
    bar = 0.8 / len(groups)
    for i, (label, rows) in enumerate(groups):
      ys = [k + i * bar for k, n in enumerate(names) if n in rows]
      ax.barh(ys, [rows[n]["ratio"] for n in names if n in rows], height=bar, label=label)
    ax.set_yticks([k + 0.4 - bar / 2 for k in range(len(names))], names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.axvline(1.5, color="gray", linewidth=1, linestyle="--")
    ax.set_xlabel("TorchJD ms / optax_mtl ms (> 1: optax_mtl faster)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
  fig.suptitle(f"optax_mtl vs TorchJD {report['versions']['torchjd']}, "
               f"{report['device']} ({report['cpu_count']} cores), {report['date']}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes: seconds")
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed rounds of the aggregators (default 11; 2 "
                           "with --quick), three times as many for the "
                           "solves; the train steps use their setting's")
  parser.add_argument("--out", default=str(RESULTS), help="results directory")
  parser.add_argument("--sections", default=",".join(SECTIONS),
                      help="comma-separated: aggregators, solves, train; a "
                           "section not run is kept from the results file "
                           "already in --out")
  args = parser.parse_args(argv)
  sections = set(filter(None, args.sections.split(",")))
  if not sections or sections - set(SECTIONS):
    parser.error(f"--sections takes some of {', '.join(SECTIONS)}, got "
                 f"{args.sections!r}.")
  if torch is None:
    parser.exit(2, f"compare_torchjd.py needs torch and torchjd ({_TORCH_ERROR}); "
                   f"{INSTALL_HINT}.\n")
  repeats = args.repeats if args.repeats is not None else (2 if args.quick else 11)
  if repeats < 1:
    parser.error(f"--repeats must be a positive integer, got {repeats}.")
  torch.set_num_threads(os.cpu_count())
  options = {"xla_backend_optimization_level": 0} if args.quick else None
  agg_cases = [(4, 20_000)] if args.quick else [(10, 2_000_000), (40, 500_000)]
  solve_cases = ([(4, "conflicting")] if args.quick else
                 [(t, kind) for t in aggregator_bench.SOLVE_TASKS
                  for kind in aggregator_bench.SOLVE_KINDS])
  solve_repeats = repeats if args.quick else 3 * repeats
  settings = QUICK_SETTINGS if args.quick else FULL_SETTINGS
  backend = jax.default_backend()
  device = common.cpu_name() if backend == "cpu" else str(jax.devices()[0].device_kind)
  print(f"{device} ({backend}), {os.cpu_count()} cores; torch threads "
        f"{torch.get_num_threads()}", flush=True)

  report = {"benchmark": "compare_torchjd", "date": datetime.date.today().isoformat(),
            "quick": args.quick, "backend": backend, "device": device,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "versions": _versions(), **{section: [] for section in SECTIONS}}
  stem = f"compare_torchjd_{backend}" + ("_quick" if args.quick else "")
  out = pathlib.Path(args.out)
  previous = out / f"{stem}.json"
  for section in set(SECTIONS) - sections:
    if not previous.exists() or section not in json.loads(previous.read_text()):
      parser.error(f"--sections {args.sections}: {previous} holds no {section} "
                   f"section to keep; run both sections once.")
    kept = json.loads(previous.read_text())
    report[section] = kept[section]
    report[f"{section}_date"] = kept.get(f"{section}_date", kept["date"])
    report[f"{section}_cpu_kernel"] = kept.get(f"{section}_cpu_kernel")
  for section in sections:
    report[f"{section}_date"] = report["date"]
    report[f"{section}_cpu_kernel"] = common.cpu_kernel()
  for num_tasks, dim in (agg_cases if "aggregators" in sections else []):
    case = aggregator_case(num_tasks, dim, repeats, options)
    report["aggregators"].append(case)
    print(f"aggregators T={num_tasks} d={dim}: " + ", ".join(
        f"{n} {r['optax_mtl_ms']:.2f}/{r['torchjd_ms']:.2f} ms ({r['ratio']:.2f}x)"
        for n, r in case["rows"].items()), flush=True)
  for num_tasks, kind in (solve_cases if "solves" in sections else []):
    case = solve_case(num_tasks, kind, solve_repeats, options)
    report["solves"].append(case)
    print(f"solves T={num_tasks} {kind}: " + ", ".join(
        f"{n} {r['optax_mtl_ms']:.3f}/{r['torchjd_ms']:.3f} ms ({r['ratio']:.2f}x)"
        for n, r in case["rows"].items()), flush=True)
  for setting in (settings if "train" in sections else []):
    for num_tasks in setting.tasks:
      case = train_case(setting, num_tasks, setting.rounds, options)
      report["train"].append(case)
      print(f"{case['model']}, T={num_tasks}: " + ", ".join(
          f"{n} {r['optax_mtl_ms']:.1f}/{r['torchjd_ms']:.1f} ms ({r['ratio']:.2f}x)"
          for n, r in case["rows"].items()), flush=True)

  common.write_report(str(out), stem, report, markdown(report, f"{stem}.png"))
  plot(report, out / f"{stem}.png")
  print(f"wrote {out / stem}.png")
  return report


if __name__ == "__main__":
  main()
