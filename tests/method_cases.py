"""Every public method, registered once for the shared property matrix.

A method joins the matrix by adding one ``Case`` line: ``make(T)`` builds the
transformation for T tasks; ``kind`` says whether it aggregates (stacked ->
one update) or scales (stacked -> stacked); ``needs`` names the keyword
arguments ``update`` requires.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp
import optax

import optax_mtl as mtl


class Case(NamedTuple):
  name: str
  make: Callable[[int], optax.GradientTransformationExtraArgs]
  kind: str = "aggregator"  # or "scaling"
  needs: frozenset = frozenset()


CASES = [
    Case("sum", lambda T: mtl.sum()),
    Case("mean", lambda T: mtl.mean()),
    Case("weighted", lambda T: mtl.weighted(jnp.linspace(0.5, 1.5, T))),
    Case("scale_by_initial_loss", lambda T: mtl.scale_by_initial_loss(num_tasks=T),
         kind="scaling", needs=frozenset({"losses"})),
    Case("scale_by_prior_loss", lambda T: mtl.scale_by_prior_loss(jnp.linspace(0.5, 2.0, T)),
         kind="scaling"),
    Case("scale_by_realtime_loss", lambda T: mtl.scale_by_realtime_loss(),
         kind="scaling", needs=frozenset({"losses"})),
    Case("scale_by_uncertainty", lambda T: mtl.scale_by_uncertainty(num_tasks=T),
         kind="scaling", needs=frozenset({"losses"})),
    Case("scale_by_dwa", lambda T: mtl.scale_by_dwa(num_tasks=T),
         kind="scaling", needs=frozenset({"losses"})),
    Case("scale_by_dtp", lambda T: mtl.scale_by_dtp(2.0, num_tasks=T, smoothing=0.5),
         kind="scaling", needs=frozenset({"kpis"})),
    Case("scale_by_random", lambda T: mtl.scale_by_random(0), kind="scaling"),
    Case("scale_by_geometric_loss", lambda T: mtl.scale_by_geometric_loss(),
         kind="scaling", needs=frozenset({"losses"})),
    Case("scale_by_imtl_l", lambda T: mtl.scale_by_imtl_l(num_tasks=T),
         kind="scaling", needs=frozenset({"losses"})),
    Case("scale_by_famo", lambda T: mtl.scale_by_famo(num_tasks=T),
         kind="scaling", needs=frozenset({"losses"})),
    Case("mgda", lambda T: mtl.mgda()),
    Case("pcgrad", lambda T: mtl.pcgrad(seed=1)),
    Case("cagrad", lambda T: mtl.cagrad(c=0.4)),
    Case("scale_by_gradnorm", lambda T: mtl.scale_by_gradnorm(num_tasks=T), kind="scaling",
         needs=frozenset({"losses"})),
    Case("normalize_gradients", lambda T: mtl.normalize_gradients(0.5, num_tasks=T),
         kind="scaling", needs=frozenset({"losses"})),
]
