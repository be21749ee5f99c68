"""The Gramian and combination passes against dense references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import optax_mtl as mtl


def grads_tree(num_tasks, seed=0, dtype=jnp.float32, scale=1.0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {
      "conv": scale * jax.random.normal(k1, (num_tasks, 3, 3, 2, 4)).astype(dtype),
      "bias": scale * jax.random.normal(k2, (num_tasks, 4)).astype(dtype),
      "head": scale * jax.random.normal(k3, (num_tasks, 4, 2)).astype(dtype),
  }


def flat(tree, keys=None):
  leaves = [tree[k] for k in (keys or sorted(tree))]
  return np.concatenate([np.asarray(l, np.float64).reshape(l.shape[0], -1)
                         for l in leaves], axis=1)


def full_gramian(g: mtl.Gramian):
  return np.asarray(g.normalized, np.float64) * np.float64(g.scale) ** 2


def test_gramian_equals_dense_product():
  tree = grads_tree(5)
  dense = flat(tree)
  np.testing.assert_allclose(full_gramian(mtl.gramian(tree)), dense @ dense.T,
                             rtol=1e-5)


def test_gramian_normalization_and_norms():
  tree = grads_tree(4)
  g = mtl.gramian(tree)
  assert float(jnp.max(jnp.diagonal(g.normalized))) == pytest.approx(1.0)
  np.testing.assert_allclose(g.norms(), np.linalg.norm(flat(tree), axis=1),
                             rtol=1e-5)


def test_gramian_mask_selects_shared_leaves():
  tree = grads_tree(3)
  mask = {"conv": True, "bias": True, "head": False}
  dense = flat(tree, ["conv", "bias"])
  np.testing.assert_allclose(full_gramian(mtl.gramian(tree, mask)),
                             dense @ dense.T, rtol=1e-5)


@pytest.mark.parametrize("scale", [1e-25, 1e-20, 1e20, 1e25])
def test_gramian_out_of_float32_range_scales(scale):
  # G itself would overflow or underflow in float32; the normalized matrix and
  # the scale are exact up to rounding.
  tree = grads_tree(3)
  reference = mtl.gramian(tree)
  scaled = mtl.gramian(jax.tree.map(lambda x: x * scale, tree))
  np.testing.assert_allclose(scaled.normalized, reference.normalized, rtol=1e-5,
                             atol=1e-6)
  assert float(scaled.scale) == pytest.approx(float(reference.scale) * scale,
                                              rel=1e-5)


def test_gramian_of_zero_gradients_is_zero():
  g = mtl.gramian(jax.tree.map(jnp.zeros_like, grads_tree(3)))
  assert np.all(np.asarray(g.normalized) == 0) and float(g.scale) == 0.0


def test_gramian_accumulates_bfloat16_in_float32():
  tree = grads_tree(3, dtype=jnp.bfloat16)
  g = mtl.gramian(tree)
  assert g.normalized.dtype == jnp.float32
  dense = flat(tree)  # the bf16 values, exactly, in float64
  np.testing.assert_allclose(full_gramian(g), dense @ dense.T, rtol=1e-4)


def test_combine_weights_shared_and_sums_heads():
  tree = grads_tree(3)
  w = jnp.array([0.2, -1.0, 3.0])
  mask = {"conv": True, "bias": True, "head": False}
  out = mtl.combine(w, tree, mask)
  np.testing.assert_allclose(out["conv"], jnp.tensordot(w, tree["conv"], 1),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["head"], tree["head"].sum(0), rtol=1e-6)


def test_combine_keeps_dtype():
  tree = grads_tree(2, dtype=jnp.bfloat16)
  out = mtl.combine(jnp.array([0.5, 0.5]), tree)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))


def test_scale_tasks_scales_rows():
  tree = grads_tree(3)
  s = jnp.array([1.0, 0.0, -2.0])
  out = mtl.scale_tasks(s, tree)
  for k in tree:
    np.testing.assert_allclose(out[k], tree[k] * s.reshape((3,) + (1,) * (tree[k].ndim - 1)))


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto],
                         ids=["explicit", "auto"])
@pytest.mark.parametrize("sharded_axis", [0, 1], ids=["task_axis", "param_axis"])
def test_engine_under_jit_with_sharded_leaves(axis_type, sharded_axis):
  num_tasks = 4
  tree = {"w": jax.random.normal(jax.random.key(1), (num_tasks, 8, 3)),
          "v": jax.random.normal(jax.random.key(2), (num_tasks, 4))}
  reference_g = mtl.gramian(tree)
  w = jnp.array([0.1, 0.2, 0.3, 0.4])
  reference_u = mtl.combine(w, tree)
  mesh = jax.make_mesh((4,), ("d",), axis_types=(axis_type,))
  def put(x):
    spec = [None] * x.ndim
    spec[sharded_axis] = "d"
    return jax.device_put(x, NamedSharding(mesh, P(*spec)))
  with jax.set_mesh(mesh):
    sharded = jax.tree.map(put, tree)
    g, u = jax.jit(lambda t: (mtl.gramian(t), mtl.combine(w, t)))(sharded)
  np.testing.assert_allclose(g.normalized, reference_g.normalized, rtol=1e-5)
  np.testing.assert_allclose(g.scale, reference_g.scale, rtol=1e-5)
  for k in tree:
    np.testing.assert_allclose(u[k], reference_u[k], rtol=1e-5, atol=1e-6)
  if sharded_axis == 1:
    # The update is laid out like the parameter: still sharded, never gathered.
    assert u["w"].sharding.spec[0] == "d"


from hypothesis import example, given, settings, strategies as st


@settings(max_examples=10, deadline=None)
# Squared norms near 1e38: their float32 reciprocal is subnormal.
@example(num_tasks=2, shapes=[[2]], log_scale=18.5, seed=0)
@given(num_tasks=st.integers(1, 5),
       shapes=st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3),
                       min_size=1, max_size=4),
       log_scale=st.floats(-25, 25),
       seed=st.integers(0, 2**16))
def test_gramian_and_combine_on_random_trees(num_tasks, shapes, log_scale, seed):
  keys = jax.random.split(jax.random.key(seed), len(shapes) + 1)
  scale = 10.0 ** log_scale
  tree = {f"leaf{i}": scale * jax.random.normal(k, (num_tasks, *shape))
          for i, (k, shape) in enumerate(zip(keys[1:], shapes))}
  dense = flat(tree) / scale
  g = mtl.gramian(tree)
  expected = dense @ dense.T
  top = np.max(np.diag(expected))
  np.testing.assert_allclose(g.normalized, expected / top, rtol=1e-4, atol=1e-5)
  assert float(g.scale) == pytest.approx(np.sqrt(top) * scale, rel=1e-4)
  w = jax.random.uniform(keys[0], (num_tasks,))
  out = mtl.combine(w, tree)
  np.testing.assert_allclose(flat({k: v[None] for k, v in out.items()})[0] / scale,
                             np.asarray(w, np.float64) @ dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,scale,rtol", [(jnp.float32, 1.0, 1e-5),
                                              (jnp.bfloat16, 1.0, 1e-5),
                                              (jnp.float32, 1e20, 1e-5)])
def test_large_leaves_take_the_blocked_cpu_gramian(dtype, scale, rtol):
  # 3 x 70,001 entries: above the blocked path's threshold, with a remainder
  # after the 8,192-column blocks; the rescue pass (1e20) goes through it too.
  keys = jax.random.split(jax.random.key(5), 2)
  tree = {"big": (scale * jax.random.normal(keys[0], (3, 70_001))).astype(dtype),
          "matrix": (scale * jax.random.normal(keys[1], (3, 130, 300))).astype(dtype)}
  hlo = jax.jit(mtl.gramian).lower(tree).as_text()
  assert "while" in hlo  # the blocked loop, not one long dot
  dense = flat(tree) / scale
  for compute in (mtl.gramian, jax.jit(mtl.gramian)):
    g = compute(tree)
    np.testing.assert_allclose(full_gramian(g) / scale ** 2, dense @ dense.T,
                               rtol=rtol, atol=rtol * np.max(dense @ dense.T))


@pytest.mark.parametrize("num_tasks", [17, 21])
def test_blocked_cpu_gramian_with_grouped_transposes(num_tasks):
  # Above 16 tasks the blocks are transposed 4 rows at a time (21: a last
  # group of 1); rows 2**15 entries apart, as a [T, 256, 128] weight's are.
  leaf = jax.random.normal(jax.random.key(7), (num_tasks, 256, 128))
  hlo = jax.jit(mtl.gramian).lower({"w": leaf}).compile().as_text()
  assert "f32[8192,4]" in hlo  # a group of 4 rows of an 8,192-column block
  rows = np.asarray(leaf, np.float64).reshape(num_tasks, -1)
  exact = rows @ rows.T
  got = full_gramian_jnp(jax.jit(mtl.gramian)({"w": leaf}))
  np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-6 * np.max(exact))


def test_blocked_cpu_gramian_under_vmap():
  stacked = jax.random.normal(jax.random.key(6), (2, 3, 40_000))
  batched = jax.vmap(lambda g: full_gramian_jnp(mtl.gramian(g)))(stacked)
  for i in range(2):
    rows = np.asarray(stacked[i], np.float64)
    exact = rows @ rows.T
    # float32 sums of 40,000 products: errors scale with the largest entry.
    np.testing.assert_allclose(batched[i], exact, rtol=1e-5, atol=1e-6 * np.max(exact))


def full_gramian_jnp(g):
  return g.normalized * g.scale ** 2
