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
]
