"""mtl.layerwise: any Gramian aggregator applied to each group of leaves."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl as mtl


def params_of(grads):
  return jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), grads)


def layered_grads(num_tasks=3, seed=0):
  """Two layers (kernel + bias each) and a head."""
  shapes = {"dense_0": {"kernel": (5, 4), "bias": (4,)},
            "dense_1": {"kernel": (4, 3), "bias": (3,)},
            "head": {"kernel": (3, 2)}}
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  # A shared direction makes some pairs agree and others conflict.
  return jax.tree.unflatten(treedef, [
      jax.random.normal(k, (num_tasks,) + s) + 0.4 * jax.random.normal(k, (1,) + s)
      for k, s in zip(keys, leaves)])


def close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                               rtol=rtol, atol=atol)


def run(tx, grads_per_step, params):
  state = tx.init(params)
  outs = []
  for grads in grads_per_step:
    out, state = tx.update(grads, state, params)
    outs.append(out)
  return outs, state


@pytest.mark.parametrize("factory", [
    lambda: mtl.mgda(num_tasks=3), lambda: mtl.upgrad(num_tasks=3),
    lambda: mtl.pcgrad(seed=2, num_tasks=3),
    lambda: mtl.gradvac(beta=0.3, seed=2, num_tasks=3)],
    ids=["mgda", "upgrad", "pcgrad", "gradvac"])
def test_each_layer_gets_the_method_applied_to_it_alone(factory):
  grads = [layered_grads(seed=s) for s in range(3)]
  params = params_of(grads[0])
  outs, state = run(mtl.layerwise(factory()), grads, params)
  assert state.group_weights.shape == (3, 3)  # dense_0, dense_1, head
  for k, layer in enumerate(["dense_0", "dense_1", "head"]):
    # The same method on this layer alone, with its own state (random
    # methods draw the same orders in every group).
    alone, alone_state = run(factory(), [g[layer] for g in grads], params[layer])
    for out, ref in zip(outs, alone):
      close(out[layer], ref)
    np.testing.assert_allclose(state.group_weights[k], alone_state.task_weights,
                               rtol=1e-5, atol=1e-6)
    inner = jax.tree.map(lambda x: x[k], state.group_states)
    close(inner, {f: v for f, v in alone_state._asdict().items()
                  if f != "task_weights"})


def test_task_weights_average_the_groups_over_their_parameters():
  grads = layered_grads()
  params = params_of(grads)
  _, state = mtl.layerwise(mtl.mgda(num_tasks=3)).update(
      grads, mtl.layerwise(mtl.mgda(num_tasks=3)).init(params), params)
  sizes = np.array([5 * 4 + 4, 4 * 3 + 3, 3 * 2], np.float64)
  expected = sizes @ np.asarray(state.group_weights, np.float64) / sizes.sum()
  np.testing.assert_allclose(optax.tree.get(state, "task_weights"), expected, rtol=1e-6)
  np.testing.assert_allclose(mtl.applied_weights(state), expected, rtol=1e-6)


def test_one_group_is_the_method_itself():
  grads = [layered_grads(seed=s) for s in range(3)]
  params = params_of(grads[0])
  labels = jax.tree.map(lambda _: "all", params)
  grouped, state = run(mtl.layerwise(mtl.gradvac(beta=0.5, seed=1, num_tasks=3),
                                     groups=labels), grads, params)
  plain, plain_state = run(mtl.gradvac(beta=0.5, seed=1, num_tasks=3), grads, params)
  for a, b in zip(grouped, plain):
    close(a, b)
  np.testing.assert_allclose(optax.tree.get(state, "targets")[0], plain_state.targets,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.task_weights, plain_state.task_weights, rtol=1e-5)


def test_groupings():
  grads = layered_grads()
  params = params_of(grads)
  count = lambda tx: tx.init(params).group_weights.shape[0]
  assert count(mtl.layerwise(mtl.mgda(num_tasks=3))) == 3
  assert count(mtl.layerwise(mtl.mgda(num_tasks=3), groups="leaf")) == 5
  # Labels on a prefix of the tree; heads (shared=False) belong to no group.
  labels = {"dense_0": "body", "dense_1": "body", "head": 7}
  assert count(mtl.layerwise(mtl.mgda(num_tasks=3), groups=labels)) == 2
  headless = mtl.layerwise(mtl.mgda(num_tasks=3, shared={
      "dense_0": True, "dense_1": True, "head": False}))
  assert count(headless) == 2
  out, _ = headless.update(grads, headless.init(params), params)
  close(out["head"], jax.tree.map(lambda g: g.sum(0), grads["head"]))
  by_callable = mtl.layerwise(mtl.mgda(num_tasks=3),
                              groups=lambda p: jax.tree.map(lambda _: 0, p))
  assert count(by_callable) == 1


def test_nnx_layers_group_kernel_and_bias():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.first = nnx.Linear(3, 4, rngs=rngs)
      self.second = nnx.Linear(4, 2, rngs=rngs)

  params = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
  tx = mtl.layerwise(mtl.upgrad(num_tasks=2))
  state = tx.init(params)
  assert state.group_weights.shape == (2, 2)
  grads = jax.tree.map(lambda p: jnp.stack([p, -0.5 * p + 1.0]), params)
  out, _ = tx.update(grads, state, params)
  assert jax.tree.structure(out) == jax.tree.structure(params)


def test_chained_after_a_scaling_matches_optax_chain_under_jit():
  grads = [layered_grads(seed=s) for s in range(3)]
  params = params_of(grads[0])
  losses = jnp.array([1.0, 2.0, 4.0])
  fused = mtl.chain(mtl.scale_by_realtime_loss(num_tasks=3),
                    mtl.layerwise(mtl.pcgrad(seed=3, num_tasks=3)))
  chained = optax.chain(mtl.scale_by_realtime_loss(num_tasks=3),
                        mtl.layerwise(mtl.pcgrad(seed=3, num_tasks=3)))
  step = jax.jit(lambda g, s: fused.update(g, s, params, losses=losses))
  s_fused, s_chained = fused.init(params), chained.init(params)
  for g in grads:
    out, s_fused = step(g, s_fused)
    ref, s_chained = chained.update(g, s_chained, params, losses=losses)
    close(out, ref, rtol=1e-4, atol=1e-5)
  close(s_fused, s_chained, rtol=1e-4, atol=1e-5)
  assert step._cache_size() == 1


def test_non_conflicting_group_by_group_and_overall():
  for seed in range(4):
    grads = layered_grads(num_tasks=4, seed=seed)
    params = params_of(grads)
    tx = mtl.layerwise(mtl.upgrad())
    out, _ = tx.update(grads, tx.init(params), params)
    for layer in grads:
      rows = np.concatenate([np.asarray(l).reshape(4, -1)
                             for l in jax.tree.leaves(grads[layer])], axis=1)
      update = np.concatenate([np.asarray(l).ravel()
                               for l in jax.tree.leaves(out[layer])])
      assert np.all(rows @ update >= -1e-5 * np.linalg.norm(rows, axis=1)
                    * np.linalg.norm(update))


def test_one_statistics_pass_and_one_combination_pass():
  # The same contractions as the method on the whole model: one Gramian
  # block per leaf (twice: the rare rescue branch) and one combination.
  grads = layered_grads()
  params = params_of(grads)

  def dots(tx):
    jaxpr = jax.make_jaxpr(lambda g, s: tx.update(g, s, params))(grads, tx.init(params))
    return str(jaxpr).count("dot_general")
  assert dots(mtl.layerwise(mtl.mgda())) == dots(mtl.mgda())


def test_non_finite_step_is_skipped():
  grads = layered_grads()
  params = params_of(grads)
  tx = mtl.layerwise(mtl.gradvac(num_tasks=3))
  _, state = tx.update(grads, tx.init(params), params)
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads)
  out, skipped = tx.update(bad, state, params)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(out))
  np.testing.assert_array_equal(skipped.task_weights, np.zeros(3))
  close(skipped.group_states, state.group_states)


def test_with_diagnostics():
  grads = layered_grads()
  params = params_of(grads)
  tx = mtl.with_diagnostics(mtl.layerwise(mtl.mgda(num_tasks=3)))
  _, state = tx.update(grads, tx.init(params), params)
  cosines = optax.tree.get(state, "task_cosines")
  assert cosines.shape == (3, 3)
  np.testing.assert_allclose(np.diagonal(cosines), np.ones(3), rtol=1e-5)


def test_errors():
  grads = layered_grads()
  params = params_of(grads)
  with pytest.raises(ValueError, match="tx.init\\(params\\)"):
    mtl.layerwise(mtl.mgda()).init(None)
  with pytest.raises(ValueError, match="reads no gradient statistics"):
    mtl.layerwise(mtl.mean())
  with pytest.raises(ValueError, match="coordinate by coordinate"):
    mtl.layerwise(mtl.graddrop())
  with pytest.raises(TypeError, match="one aggregator"):
    mtl.layerwise(optax.adam(1e-3))
  with pytest.raises(TypeError, match="one aggregator"):
    mtl.layerwise(mtl.normalize_gradients())
  with pytest.raises(ValueError, match="per-group already"):
    mtl.layerwise(mtl.layerwise(mtl.mgda()))
  with pytest.raises(ValueError, match="not a grouping"):
    mtl.layerwise(mtl.mgda(), groups="layers").init(params)
  with pytest.raises(ValueError, match="labels must be str or int"):
    mtl.layerwise(mtl.mgda(), groups=jax.tree.map(lambda _: 1.5, params)).init(params)
  with pytest.raises(ValueError, match="has no entry"):
    mtl.layerwise(mtl.mgda(), groups={"dense_0": 0}).init(params)
  tx = mtl.layerwise(mtl.mgda(num_tasks=3))
  other = {"dense_0": params["dense_0"]}
  with pytest.raises(ValueError, match="holds 3 groups"):
    tx.update({"dense_0": grads["dense_0"]}, tx.init(params), other)
  with pytest.raises(ValueError, match="own Gramian"):
    mtl.value_and_gramian_grad(
        lambda p, x: jnp.stack([jnp.sum(p["w"] * x), jnp.sum(p["w"] ** 2)]),
        tx)(tx.init({"w": jnp.ones(2)}), {"w": jnp.ones(2)}, jnp.ones(2))
