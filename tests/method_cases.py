"""Every public method, registered once for the shared property matrix.

A method joins the matrix by adding one ``Case`` line: ``make(T)`` builds the
transformation for T tasks (with ``num_tasks=T`` where the factory takes it,
so the state logs its weights). What the tests check is driven by what the
method declares: its kind (aggregator or task scaling), what it reads (the
keyword arguments it requires) and the properties it claims.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp

import optax_mtl as mtl


class Case(NamedTuple):
  name: str
  make: Callable[..., mtl.Method]  # (T, **factory keyword arguments)
  min_tasks: int = 1  # fewer tasks are refused by the method (Krum: 2f + 3)

  @property
  def kind(self) -> str:
    return self.make(3).kind

  @property
  def needs(self) -> frozenset:
    return self.make(3).reads & {"losses", "kpis"}

  @property
  def claims(self) -> frozenset:
    return self.make(3).claims

  @property
  def weighted_sum(self) -> bool:
    """False for coordinate-wise aggregators (their update is no sum_t w_t g_t)."""
    tx = self.make(3)
    # A gradient-memory method (MoCo, DB-MTL) combines its memory of past
    # gradients, not the gradients it receives.
    if getattr(tx, "combines_memory", False):
      return False
    # A per-group method weights each group of leaves with its own weights.
    return all(m.weighting.per_coordinate is None and m.groups is None
               for p in tx.parts for m in p.members)


CASES = [
    Case("sum", lambda T, **kw: mtl.sum(num_tasks=T, **kw)),
    Case("mean", lambda T, **kw: mtl.mean(num_tasks=T, **kw)),
    Case("weighted", lambda T, **kw: mtl.weighted(jnp.linspace(0.5, 1.5, T), **kw)),
    Case("scale_by_initial_loss", lambda T, **kw: mtl.scale_by_initial_loss(num_tasks=T, **kw)),
    Case("scale_by_prior_loss", lambda T, **kw: mtl.scale_by_prior_loss(jnp.linspace(0.5, 2.0, T), **kw)),
    Case("scale_by_realtime_loss", lambda T, **kw: mtl.scale_by_realtime_loss(num_tasks=T, **kw)),
    Case("scale_by_uncertainty", lambda T, **kw: mtl.scale_by_uncertainty(num_tasks=T, **kw)),
    Case("scale_by_dwa", lambda T, **kw: mtl.scale_by_dwa(num_tasks=T, **kw)),
    Case("scale_by_dtp", lambda T, **kw: mtl.scale_by_dtp(2.0, num_tasks=T, smoothing=0.5, **kw)),
    Case("scale_by_random", lambda T, **kw: mtl.scale_by_random(0, num_tasks=T, **kw)),
    Case("scale_by_geometric_loss", lambda T, **kw: mtl.scale_by_geometric_loss(num_tasks=T, **kw)),
    Case("scale_by_imtl_l", lambda T, **kw: mtl.scale_by_imtl_l(num_tasks=T, **kw)),
    Case("scale_by_famo", lambda T, **kw: mtl.scale_by_famo(num_tasks=T, **kw)),
    Case("mgda", lambda T, **kw: mtl.mgda(num_tasks=T, **kw)),
    Case("mgda_l2", lambda T, **kw: mtl.mgda("l2", num_tasks=T, **kw)),
    Case("pcgrad", lambda T, **kw: mtl.pcgrad(seed=1, num_tasks=T, **kw)),
    Case("upgrad", lambda T, **kw: mtl.upgrad(num_tasks=T, **kw)),
    Case("dualproj", lambda T, **kw: mtl.dualproj(num_tasks=T, **kw)),
    Case("pcd", lambda T, **kw: mtl.pcd(num_tasks=T, **kw)),
    Case("trimmed_mean", lambda T, **kw: mtl.trimmed_mean((T - 1) // 2 if T else 1, num_tasks=T, **kw)),
    Case("cagrad", lambda T, **kw: mtl.cagrad(c=0.4, num_tasks=T, **kw)),
    # Two-batch methods: the matrix passes one batch, read twice (same_batch);
    # two distinct batches are tested in test_two_batch.py.
    Case("sdmgrad", lambda T, **kw: mtl.same_batch(mtl.sdmgrad(num_tasks=T, **kw))),
    Case("modo", lambda T, **kw: mtl.same_batch(mtl.modo(num_tasks=T, **kw))),
    Case("nash_mtl", lambda T, **kw: mtl.nash_mtl(num_tasks=T, **kw)),
    Case("fairgrad", lambda T, **kw: mtl.fairgrad(num_tasks=T, **kw)),
    Case("imtl_g", lambda T, **kw: mtl.imtl_g(num_tasks=T, **kw)),
    Case("aligned_mtl", lambda T, **kw: mtl.aligned_mtl(num_tasks=T, **kw)),
    Case("config", lambda T, **kw: mtl.config(num_tasks=T, **kw)),
    Case("gradvac", lambda T, **kw: mtl.gradvac(beta=0.5, seed=1, num_tasks=T, **kw)),
    Case("layerwise_gradvac", lambda T, **kw: mtl.layerwise(
        mtl.gradvac(beta=0.5, seed=1, num_tasks=T, **kw))),
    Case("krum", lambda T, **kw: mtl.krum(0, num_tasks=T, **kw), min_tasks=3),
    Case("cr_mogm", lambda T, **kw: mtl.cr_mogm(mtl.mgda(), alpha=0.5, num_tasks=T, **kw)),
    Case("auxiliary", lambda T, **kw: mtl.auxiliary(num_main=1, num_tasks=T, **kw)),
    Case("scale_by_gradnorm", lambda T, **kw: mtl.scale_by_gradnorm(num_tasks=T, **kw)),
    Case("normalize_gradients", lambda T, **kw: mtl.normalize_gradients(0.5, num_tasks=T, **kw)),
    Case("uncertainty_weighting", lambda T, **kw: mtl.uncertainty_weighting(
        num_tasks=T, priorities=jnp.linspace(1.0, 2.0, T), **kw)),
    Case("dwa", lambda T, **kw: mtl.dwa(num_tasks=T, **kw)),
    Case("gradnorm", lambda T, **kw: mtl.gradnorm(num_tasks=T, **kw)),
    Case("graddrop", lambda T, **kw: mtl.graddrop(leak=0.2, seed=1, num_tasks=T, **kw)),
    Case("scale_by_stch", lambda T, **kw: mtl.scale_by_stch(0.5, warmup_steps=1, num_tasks=T, **kw)),
    Case("stch", lambda T, **kw: mtl.stch(0.5, warmup_steps=1, num_tasks=T, **kw)),
    Case("scale_by_pbi", lambda T, **kw: mtl.scale_by_pbi(num_tasks=T, **kw)),
    Case("pbi", lambda T, **kw: mtl.pbi(num_tasks=T, **kw)),
    Case("scale_by_cosmos", lambda T, **kw: mtl.scale_by_cosmos(seed=1, num_tasks=T, **kw)),
    Case("cosmos", lambda T, **kw: mtl.cosmos(seed=1, num_tasks=T, **kw)),
    Case("moco", lambda T, **kw: mtl.moco(num_tasks=T, **kw)),
    Case("db_mtl", lambda T, **kw: mtl.db_mtl(num_tasks=T, **kw)),
    Case("db_mtl_no_memory", lambda T, **kw: mtl.db_mtl(beta=0.0, num_tasks=T, **kw)),
    Case("excess_mtl", lambda T, **kw: mtl.excess_mtl(robust_step_size=0.5, num_tasks=T, **kw)),
]
