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

  @property
  def kind(self) -> str:
    return self.make(3).kind

  @property
  def needs(self) -> frozenset:
    return self.make(3).reads & {"losses", "kpis"}

  @property
  def claims(self) -> frozenset:
    return self.make(3).claims


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
    Case("cagrad", lambda T, **kw: mtl.cagrad(c=0.4, num_tasks=T, **kw)),
    Case("scale_by_gradnorm", lambda T, **kw: mtl.scale_by_gradnorm(num_tasks=T, **kw)),
    Case("normalize_gradients", lambda T, **kw: mtl.normalize_gradients(0.5, num_tasks=T, **kw)),
    Case("uncertainty_weighting", lambda T, **kw: mtl.uncertainty_weighting(
        num_tasks=T, priorities=jnp.linspace(1.0, 2.0, T), **kw)),
    Case("dwa", lambda T, **kw: mtl.dwa(num_tasks=T, **kw)),
    Case("gradnorm", lambda T, **kw: mtl.gradnorm(num_tasks=T, **kw)),
]
