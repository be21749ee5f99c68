"""The weighting core: mtl.chain against optax.chain, one pass per kind, vmap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl as mtl

T = 3
MASK = {"trunk": True, "head": False}


def make_grads(num_tasks=T, seed=0, scale=1.0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {"trunk": {"w": scale * jax.random.normal(k1, (num_tasks, 40, 30)),
                    "b": scale * jax.random.normal(k2, (num_tasks, 30))},
          "head": scale * jax.random.normal(k3, (num_tasks, 30, 2))}


PARAMS = jax.tree.map(lambda g: jnp.zeros(g.shape[1:]), make_grads())

SCALINGS = {
    "normalize": lambda: mtl.normalize_gradients(),
    "realtime": lambda: mtl.scale_by_realtime_loss(num_tasks=T),
    "gradnorm_layer": lambda: mtl.scale_by_gradnorm(
        num_tasks=T, layer={"trunk": {"w": False, "b": True}, "head": False}),
    "uncertainty": lambda: mtl.scale_by_uncertainty(num_tasks=T),
}
AGGREGATORS = {
    "mgda": lambda: mtl.mgda(shared=MASK),
    "pcgrad": lambda: mtl.pcgrad(seed=3),
    "cagrad": lambda: mtl.cagrad(shared=MASK),
    "mean": lambda: mtl.mean(num_tasks=T, shared=MASK),
    "normalize_only": lambda: mtl.normalize_gradients(num_tasks=T),
}


def close(a, b, rtol=1e-5, atol=1e-6, relative_to_largest=False):
  """Leaf by leaf; ``relative_to_largest``: ``atol`` scaled by the leaf's largest entry.

  A solver's output (MGDA's weights to a duality gap of 1e-6) summed in
  another order moves every entry by a small fraction of the largest one
  (2e-7 of it seen), so entries that cancel to near zero are compared at
  that scale.
  """
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    tol = atol * np.max(np.abs(y), initial=0.0) if relative_to_largest else atol
    np.testing.assert_allclose(x, y, rtol=rtol, atol=tol)


@pytest.mark.parametrize("tail", list(AGGREGATORS))
@pytest.mark.parametrize("head", [("normalize",), ("realtime", "gradnorm_layer"),
                                  ("uncertainty", "normalize")], ids="+".join)
def test_mtl_chain_equals_optax_chain(head, tail):
  members = [SCALINGS[h]() for h in head] + [AGGREGATORS[tail]()]
  fused, reference = mtl.chain(*members), optax.chain(*members)
  state_f, state_r = fused.init(PARAMS), reference.init(PARAMS)
  update = jax.jit(lambda tx, g, s, l: tx.update(g, s, PARAMS, losses=l),
                   static_argnums=0)
  for step in range(3):
    grads = make_grads(seed=step)
    losses = jnp.array([1.0, 2.0, 0.5]) / (1.0 + step)
    out_f, state_f = update(fused, grads, state_f, losses)
    out_r, state_r = update(reference, grads, state_r, losses)
    close(out_f, out_r, rtol=1e-4, atol=1e-6, relative_to_largest=True)
    close(state_f, state_r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["uncertainty_weighting", "dwa", "gradnorm",
                                  "realtime_loss_weighting"])
def test_alias_equals_scaling_then_sum(name):
  factory = getattr(mtl, name)
  scaling = getattr(mtl, {"uncertainty_weighting": "scale_by_uncertainty",
                          "dwa": "scale_by_dwa", "gradnorm": "scale_by_gradnorm",
                          "realtime_loss_weighting": "scale_by_realtime_loss"}[name])
  priorities = jnp.array([2.0, 1.0, 0.5])
  kwargs = {} if name == "realtime_loss_weighting" else {"num_tasks": T}
  alias = factory(priorities=priorities, shared=MASK, **kwargs)
  reference = optax.chain(scaling(**kwargs, **({"layer": MASK} if name == "gradnorm" else {})),
                          mtl.weighted(priorities, shared=MASK))
  state_a, state_r = alias.init(PARAMS), reference.init(PARAMS)
  for step in range(3):
    grads, losses = make_grads(seed=step), jnp.array([1.0, 2.0, 0.5]) / (1 + step)
    out_a, state_a = alias.update(grads, state_a, PARAMS, losses=losses)
    out_r, state_r = reference.update(grads, state_r, PARAMS, losses=losses)
    close(out_a, out_r, rtol=1e-5)
    # The alias's state is the scaling's, with the weights applied to the
    # shared leaves: the scaling's times the priorities.
    if state_a.task_weights is not None:
      close(state_a._replace(task_weights=None), state_r[0]._replace(task_weights=None))
      np.testing.assert_allclose(state_a.task_weights,
                                 state_r[0].task_weights * priorities, rtol=1e-6)


def _passes_over_gradients(fn, grads):
  """Top-level equations that read a per-task gradient leaf ([T, ...] shape).

  Sub-jaxprs of jit calls are entered; the rescue branch of the statistics
  (a lax.cond taken only for out-of-range gradients) counts as one.
  """
  shapes = {leaf.shape for leaf in jax.tree.leaves(grads)}

  def count(jaxpr):
    total = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("pjit", "jit", "closed_call"):
        total += count(eqn.params["jaxpr"].jaxpr)
        continue
      if any(getattr(v.aval, "shape", None) in shapes for v in eqn.invars
             if hasattr(v, "aval")):
        total += 1
    return total
  return count(jax.make_jaxpr(fn)(grads).jaxpr)


def test_mtl_chain_reads_the_gradients_twice():
  grads, losses = make_grads(), jnp.ones(T)
  leaves = len(jax.tree.leaves(grads))
  members = [mtl.normalize_gradients(), mtl.scale_by_realtime_loss(), mtl.mgda()]
  fused, chained = mtl.chain(*members), optax.chain(*members)
  alone = mtl.mgda()
  passes = {name: _passes_over_gradients(
      lambda g, tx=tx: tx.update(g, tx.init(PARAMS), PARAMS, losses=losses)[0], grads)
            for name, tx in [("fused", fused), ("chained", chained), ("alone", alone)]}
  # One contraction per leaf for the Gramian, one for the combination, and
  # the (not taken) rescue branch.
  assert passes["alone"] == 2 * leaves + 1
  assert passes["fused"] == passes["alone"]
  assert passes["chained"] >= passes["alone"] + 2 * leaves  # norms pass, copies


def test_norms_only_methods_skip_the_gramian():
  grads = make_grads()
  tx = mtl.chain(mtl.normalize_gradients(), mtl.sum())
  jaxpr = jax.make_jaxpr(lambda g: tx.update(g, tx.init(PARAMS), PARAMS)[0])(grads)
  text = str(jaxpr)
  # The only contractions left are the combination's (one per leaf).
  assert text.count("dot_general") == len(jax.tree.leaves(grads))


def test_rescue_stays_a_cond_under_vmap_and_is_correct():
  tx = mtl.mgda()
  batch = [make_grads(seed=0), make_grads(seed=1, scale=1e25), make_grads(seed=2)]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *batch)
  update = lambda g: tx.update(g, tx.init(PARAMS), PARAMS)[0]
  jaxpr = jax.make_jaxpr(jax.vmap(update))(stacked)

  def equations(jaxpr, inside=False):  # those of the statistics' jit call
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("pjit", "jit", "closed_call"):
        yield from equations(eqn.params["jaxpr"].jaxpr, inside or
                             eqn.params.get("name") == "_task_statistics")
      elif inside:
        yield eqn
  eqns = list(equations(jaxpr.jaxpr))
  assert "cond" in [eqn.primitive.name for eqn in eqns]
  # No select between a rescued and a direct pass on the full gradients.
  big_selects = [eqn for eqn in eqns if eqn.primitive.name == "select_n"
                 and eqn.outvars[0].aval.size >= 500]
  assert not big_selects
  batched = jax.jit(jax.vmap(update))(stacked)
  for i, grads in enumerate(batch):
    close(jax.tree.map(lambda x: x[i], batched), update(grads), rtol=1e-5,
          atol=1e-6, relative_to_largest=True)


def test_float64_statistics_under_x64():
  with jax.enable_x64(True):
    grads = jax.tree.map(lambda x: x.astype(jnp.float64), make_grads())
    for scale in (1e150, 1e-150):
      scaled = jax.tree.map(lambda x: x * scale, grads)
      gram = mtl.gramian(scaled)
      assert gram.normalized.dtype == jnp.float64
      rows = np.concatenate([np.asarray(l).reshape(T, -1) / scale
                             for l in jax.tree.leaves(scaled)], axis=1)
      np.testing.assert_allclose(np.asarray(gram.norms()) / scale,
                                 np.linalg.norm(rows, axis=1), rtol=1e-12)
      tx = mtl.normalize_gradients()
      out, _ = tx.update(scaled, tx.init(None))
      norms = np.linalg.norm(np.concatenate(
          [np.asarray(l).reshape(T, -1) for l in jax.tree.leaves(out)], axis=1), axis=1)
      np.testing.assert_allclose(norms, 1.0, rtol=1e-12)


def test_custom_weighting_in_a_few_lines():
  # The user's own method: weights from the norms, a counter in the state.
  from typing import NamedTuple

  class CountState(NamedTuple):
    task_weights: jax.Array
    count: jax.Array

  def rule(inputs, state):
    weights = jnp.mean(inputs.norms) / jnp.maximum(inputs.norms, 1e-12)
    return weights, state._replace(count=state.count + 1)

  method = mtl.Weighting(
      name="equal_norms", rule=rule, reads={"norms"}, num_tasks=T,
      init=lambda t: CountState(mtl.initial_weights(t), jnp.zeros((), jnp.int32)))
  tx = mtl.aggregator(method)
  grads = make_grads()
  out, state = tx.update(grads, tx.init(PARAMS), PARAMS)
  norms = np.linalg.norm(np.concatenate(
      [np.asarray(l).reshape(T, -1) for l in jax.tree.leaves(grads)], axis=1), axis=1)
  np.testing.assert_allclose(state.task_weights, norms.mean() / norms, rtol=1e-5)
  assert int(state.count) == 1
  close(out, mtl.combine(state.task_weights, grads), rtol=1e-5)


def test_core_errors_say_how_to_fix():
  with pytest.raises(ValueError, match="reads has unknown entries.*gramian"):
    mtl.Weighting("bad", lambda i, s: (None, s), reads={"hessian"})
  with pytest.raises(TypeError, match="task_weights field"):
    mtl.aggregator(mtl.Weighting("bad", lambda i, s: (jnp.ones(2), s),
                                 init=lambda t: optax.EmptyState())).init(None)
  tx = mtl.aggregator(mtl.Weighting("short", lambda i, s: (jnp.ones(2), s)))
  with pytest.raises(ValueError, match=r"one weight per task, shape \(3,\)"):
    tx.update(make_grads(), tx.init(None))
  with pytest.raises(TypeError, match="tx.init"):
    mtl.mgda().update(make_grads(), optax.EmptyState())
  with pytest.raises(ValueError, match="must come last"):
    mtl.chain(mtl.mgda(), mtl.normalize_gradients())
  with pytest.raises(TypeError, match="optax.chain"):
    mtl.chain(mtl.normalize_gradients(), optax.adam(1e-3))
  with pytest.raises(ValueError, match="at least one method"):
    mtl.chain()
  with pytest.raises(ValueError, match=r"built for 3 tasks"):
    tx = mtl.mean(num_tasks=3)
    tx.update(make_grads(num_tasks=2), tx.init(None))
