"""The methods every quality benchmark runs, one line each.

Each entry builds, for T tasks, the transformation chained *before* the
optimizer: it maps per-task gradients (every leaf with a leading task axis T)
to one update, so a task scaling must be followed by an aggregator
(``optax.chain(mtl.scale_by_x(...), mtl.sum())``, or its alias). The
benchmarks call, for every entry::

  tx = optax.chain(method.make(T), optax.adam(lr))
  losses, task_grads = mtl.value_and_jacobian(loss_fn)(params, batch)
  updates, state = tx.update(task_grads, state, params, losses=losses,
                             kpis=kpis)

``losses`` is always passed; ``kpis`` (per-task scores in (0, 1], higher is
better) only by benchmarks that have them -- a benchmark without KPIs skips the
entries whose method reads them (``needs_kpis``, from the method's own
declaration) and says so in its results. A method with
per-task state takes T from the factory's argument; a method with randomness
takes a fixed seed here (the benchmarks vmap over their own seeds).

Adding a method to every benchmark is one line in ``METHODS``, e.g.::

  Method("pcgrad", lambda T: mtl.pcgrad(seed=0)),
  Method("uncertainty", lambda T: mtl.uncertainty_weighting(num_tasks=T)),
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import optax

import optax_mtl as mtl


class Method(NamedTuple):
  """One benchmarked method.

  Attributes:
    label: short name used in tables, plots and ``--methods``.
    make: ``T -> optax.GradientTransformationExtraArgs`` mapping per-task
      gradients to one update (chained before the optimizer).
  """
  label: str
  make: Callable[[int], optax.GradientTransformationExtraArgs]

  @property
  def needs_kpis(self) -> bool:
    """Whether ``update`` requires ``kpis=`` (read from the method)."""
    # Three tasks: the fewest every method accepts (Krum needs 2 f + 3).
    return "kpis" in getattr(self.make(3), "reads", frozenset())


METHODS: tuple[Method, ...] = (
    Method("sum", lambda T: mtl.sum()),
    Method("mean", lambda T: mtl.mean()),
    Method("initial loss", lambda T: mtl.initial_loss_weighting(num_tasks=T)),
    Method("realtime loss", lambda T: mtl.realtime_loss_weighting()),
    Method("uncertainty", lambda T: mtl.uncertainty_weighting(num_tasks=T)),
    Method("uncertainty warm", lambda T: mtl.uncertainty_weighting(
        num_tasks=T, warm_start=True)),
    Method("dwa", lambda T: mtl.dwa(num_tasks=T, period=50)),
    Method("dtp", lambda T: mtl.dtp(num_tasks=T, smoothing=0.9)),
    Method("rlw", lambda T: mtl.random_weighting(seed=0)),
    Method("gls", lambda T: mtl.geometric_loss_weighting()),
    Method("imtl-l", lambda T: mtl.imtl_l(num_tasks=T)),
    Method("imtl-l warm", lambda T: mtl.imtl_l(num_tasks=T, warm_start=True)),
    Method("famo", lambda T: mtl.famo(num_tasks=T)),
    Method("gradnorm", lambda T: mtl.gradnorm(num_tasks=T)),
    Method("normalize", lambda T: mtl.chain(mtl.normalize_gradients(), mtl.sum())),
    Method("mgda", lambda T: mtl.mgda()),
    Method("mgda-l2", lambda T: mtl.mgda(normalization="l2")),
    Method("pcgrad", lambda T: mtl.pcgrad(seed=0)),
    Method("cagrad", lambda T: mtl.cagrad(c=0.4)),
    Method("upgrad", lambda T: mtl.upgrad()),
    Method("dualproj", lambda T: mtl.dualproj()),
    Method("imtl-g", lambda T: mtl.imtl_g()),
    Method("aligned-mtl", lambda T: mtl.aligned_mtl()),
    Method("config", lambda T: mtl.config()),
    Method("nash-mtl", lambda T: mtl.nash_mtl(num_tasks=T)),
    Method("fairgrad", lambda T: mtl.fairgrad()),
    Method("gradvac", lambda T: mtl.gradvac(num_tasks=T)),
    # Per layer, as in the GradVac paper: one Gramian (and state) per layer.
    Method("layerwise gradvac", lambda T: mtl.layerwise(mtl.gradvac(num_tasks=T))),
    Method("layerwise pcgrad", lambda T: mtl.layerwise(mtl.pcgrad(seed=0))),
    Method("krum", lambda T: mtl.krum(0, num_tasks=T)),
    Method("trimmed mean", lambda T: mtl.trimmed_mean((T - 1) // 2)),
    Method("pcd", lambda T: mtl.pcd(num_tasks=T)),
    Method("cr-mogm", lambda T: mtl.cr_mogm(mtl.mgda(), num_tasks=T)),
    Method("auxiliary", lambda T: mtl.auxiliary()),
    Method("log-mgda", lambda T: mtl.on_log_losses(mtl.mgda())),
    Method("graddrop", lambda T: mtl.graddrop(seed=0)),
    Method("moco", lambda T: mtl.moco(num_tasks=T)),
    Method("db-mtl", lambda T: mtl.db_mtl(num_tasks=T)),
    Method("excess-mtl", lambda T: mtl.excess_mtl(num_tasks=T)),
    # One batch read twice: the benchmarks feed one mini-batch per step.
    Method("sdmgrad", lambda T: mtl.same_batch(mtl.sdmgrad(num_tasks=T))),
    Method("modo", lambda T: mtl.same_batch(mtl.modo(num_tasks=T))),
    Method("stch", lambda T: mtl.stch(num_tasks=T)),
    Method("pbi", lambda T: mtl.pbi()),
    # The benchmark networks are not conditioned on a preference: fixed, uniform.
    Method("cosmos", lambda T: mtl.cosmos(preference=[1.0 / T] * T, num_tasks=T)),
)


def select(methods: tuple[Method, ...], spec: str | None) -> tuple[Method, ...]:
  """Picks the methods named in a comma-separated ``spec`` (None: all).

  Raises:
    ValueError: a name in ``spec`` is not a label of ``methods``, or a label
      is repeated.
  """
  labels = [m.label for m in methods]
  if len(set(labels)) != len(labels):
    raise ValueError(f"Method labels must be unique, got {labels}.")
  if spec is None or not spec.strip():
    return tuple(methods)
  wanted = [s.strip() for s in spec.split(",") if s.strip()]
  unknown = [w for w in wanted if w not in labels]
  if unknown:
    raise ValueError(
        f"Unknown method(s) {unknown} in --methods; choose among {labels}.")
  by_label = {m.label: m for m in methods}
  return tuple(by_label[w] for w in dict.fromkeys(wanted))
