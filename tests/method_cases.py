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
    Case("mgda", lambda T: mtl.mgda()),
    Case("pcgrad", lambda T: mtl.pcgrad(seed=1)),
    Case("cagrad", lambda T: mtl.cagrad(c=0.4)),
    Case("scale_by_gradnorm", lambda T: mtl.scale_by_gradnorm(T), kind="scaling",
         needs=frozenset({"losses"})),
    Case("gradnorm", lambda T: mtl.gradnorm(T), needs=frozenset({"losses"})),
    Case("normalize_gradients", lambda T: mtl.normalize_gradients(0.5, T),
         kind="scaling", needs=frozenset({"losses"})),
]
