"""The two-batch path and its methods: the cross matrix, SDMGrad and MoDo.

* the cross matrix ``J1 J2^T`` equals the product of the flattened Jacobians
  (several leaves, float32 and bfloat16, the CPU blocked pass, extreme scales,
  vmap);
* SDMGrad and MoDo on hand-worked two-task examples over two steps; their
  fixed points (closed forms, KKT conditions) and MoDo with one batch read
  twice as projected gradient descent on the Gramian;
* jit == eager, finite outputs on degenerate and extreme inputs with two
  distinct batches, optax chains, ``inject_hyperparams``;
* the errors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl as mtl
from optax_mtl._src.engine import cross as cross_lib
from optax_mtl._src.methods.gradient import modo as modo_lib
from optax_mtl._src.methods.gradient import sdmgrad as sdmgrad_lib
from optax_mtl._src.solvers import simplex


def _tree(num_tasks, seed, scale=1.0, dtypes=(jnp.float32, jnp.float32, jnp.float32)):
  keys = jax.random.split(jax.random.key(seed), 3)
  shapes = [(num_tasks, 5, 3), (num_tasks, 4), (num_tasks, 2, 2, 2)]
  leaves = [scale * jax.random.normal(k, s) for k, s in zip(keys, shapes)]
  return {"a": leaves[0].astype(dtypes[0]), "b": leaves[1].astype(dtypes[1]),
          "c": {"d": leaves[2].astype(dtypes[2])}}


def _rows(tree, mask=None):
  leaves = jax.tree.leaves(tree)
  keep = [True] * len(leaves) if mask is None else jax.tree.leaves(mask)
  return np.concatenate([np.asarray(l, np.float64).reshape(l.shape[0], -1)
                         for l, k in zip(leaves, keep) if k], axis=1)


def _np_project(v):
  u = np.sort(v)[::-1]
  css = np.cumsum(u)
  k = np.arange(1, len(v) + 1)
  rho = np.nonzero(u - (css - 1) / k > 0)[0][-1]
  return np.maximum(v - (css[rho] - 1) / (rho + 1), 0.0)


# --- the cross matrix ---------------------------------------------------------


# Compiled inside, once per signature.
_cross = cross_lib.cross_gramian


@pytest.mark.parametrize("dtypes", [(jnp.float32,) * 3,
                                    (jnp.bfloat16, jnp.float32, jnp.bfloat16)])
def test_cross_matrix_is_the_product_of_the_flat_jacobians(dtypes):
  first, second = _tree(3, 0, dtypes=dtypes), _tree(3, 1, scale=4.0, dtypes=dtypes)
  j1, j2 = _rows(first), _rows(second)
  s1 = np.linalg.norm(j1, axis=1).max()
  s2 = np.linalg.norm(j2, axis=1).max()
  got = _cross(first, second)
  assert got.normalized.dtype == jnp.float32
  np.testing.assert_allclose(got.normalized, j1 @ j2.T / (s1 * s2), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose([got.first_scale, got.second_scale], [s1, s2], rtol=1e-5)
  # Only the masked leaves enter; the same batch twice is the Gramian.
  mask = {"a": True, "b": False, "c": {"d": True}}
  masked = cross_lib.cross_gramian(first, second, mask)
  m1, m2 = _rows(first, mask), _rows(second, mask)
  scale = np.linalg.norm(m1, axis=1).max() * np.linalg.norm(m2, axis=1).max()
  np.testing.assert_allclose(masked.normalized, m1 @ m2.T / scale, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_cross(first, first).normalized, j1 @ j1.T / s1 ** 2,
                             rtol=1e-5, atol=1e-6)


def test_cross_matrix_blocked_cpu_pass():
  # Leaves of >= 4 * 8192 * T entries take the blocked CPU loop; 39000
  # columns leave a remainder block.
  keys = jax.random.split(jax.random.key(3), 4)
  first = {"w": jax.random.normal(keys[0], (2, 130, 300)),
           "b": jax.random.normal(keys[1], (2, 7))}
  second = {"w": jax.random.normal(keys[2], (2, 130, 300)),
            "b": jax.random.normal(keys[3], (2, 7))}
  j1, j2 = _rows(first), _rows(second)
  expected = j1 @ j2.T / (np.linalg.norm(j1, axis=1).max() * np.linalg.norm(j2, axis=1).max())
  np.testing.assert_allclose(_cross(first, second).normalized, expected,
                             rtol=1e-4, atol=1e-6)
  # The same arrays twice take the Gramian; a copy, the [2T, 2T] pass.
  once, twice = _cross(first, first), _cross(first, jax.tree.map(jnp.copy, first))
  for a, b in zip(once, twice):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scales", [(1e20, 1e20), (1e-20, 1e-20), (1e-20, 1e20)])
def test_cross_matrix_in_range_at_extreme_scales(scales):
  first, second = _tree(3, 0), _tree(3, 1)
  reference = _cross(first, second)
  got = _cross(jax.tree.map(lambda x: scales[0] * x, first),
               jax.tree.map(lambda x: scales[1] * x, second))
  np.testing.assert_allclose(got.normalized, reference.normalized, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.first_scale / scales[0], reference.first_scale, rtol=1e-5)
  np.testing.assert_allclose(got.second_scale / scales[1], reference.second_scale, rtol=1e-5)


def test_cross_matrix_under_vmap_rescues_only_where_needed():
  first, second = _tree(2, 0), _tree(2, 1)
  stack = lambda *trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)
  big = jax.tree.map(lambda x: 1e20 * x, first)
  got = jax.jit(jax.vmap(cross_lib.cross_gramian))(stack(first, big), stack(second, second))
  reference = _cross(first, second)
  for member in range(2):
    np.testing.assert_allclose(got.normalized[member], reference.normalized,
                               rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.first_scale / np.array([1.0, 1e20]),
                             [reference.first_scale] * 2, rtol=1e-5)


def test_zero_batch_gives_zero_matrix():
  first = jax.tree.map(jnp.zeros_like, _tree(3, 0))
  got = _cross(first, _tree(3, 1))
  np.testing.assert_array_equal(got.normalized, np.zeros((3, 3)))
  assert float(got.first_scale) == 0.0 and float(got.second_scale) > 0.0


# --- the simplex projection ------------------------------------------------------


def test_projection_matches_the_sorting_algorithm():
  rng = np.random.default_rng(0)
  vectors = np.concatenate([rng.normal(size=(40, 5)) * 3.0,
                            np.array([[0.3, 0.3, 0.3, -1.0, 2.0],      # ties
                                      [0.2, 0.2, 0.2, 0.2, 0.2],       # on the simplex
                                      [5.0, 5.0, 5.0, 5.0, 5.0],
                                      [1e-3, 0.0, 0.0, 0.0, 0.0]])])
  got = np.asarray(jax.jit(jax.vmap(simplex.project))(jnp.asarray(vectors, jnp.float32)))
  expected = np.stack([_np_project(v) for v in vectors])
  np.testing.assert_allclose(got, expected, atol=2e-6)
  np.testing.assert_allclose(got.sum(1), 1.0, atol=2e-6)
  assert np.all(got >= 0)


# --- the path -----------------------------------------------------------------


def _loss_fn(params, x, y):
  pred = jnp.tanh(x @ params["w"]) @ params["v"]
  return jnp.stack([jnp.mean((pred[:, 0] - y) ** 2), jnp.mean((pred[:, 1] + y) ** 2)])


def _problem():
  keys = jax.random.split(jax.random.key(0), 5)
  params = {"w": jax.random.normal(keys[0], (3, 4)), "v": jax.random.normal(keys[1], (4, 2))}
  xs = [jax.random.normal(k, (6, 3)) for k in keys[2:]]
  ys = [jnp.sum(x, axis=1) for x in xs]
  return params, xs, ys


def test_path_gives_each_batch_its_jacobian():
  params, xs, ys = _problem()
  # The batches as one argument (a tuple of (x, y)) or as two (x's, y's).
  per_batch = lambda p, batch: _loss_fn(p, *batch)
  losses, grads = mtl.value_and_jacobians(per_batch)(params, tuple(zip(xs, ys)))
  losses2, grads2 = mtl.value_and_jacobians(_loss_fn, batch_argnums=(1, 2))(
      params, tuple(xs), tuple(ys))
  assert len(grads) == len(losses) == 3
  for k in range(3):
    ref_losses, ref_grads = mtl.value_and_jacobian(_loss_fn)(params, xs[k], ys[k])
    for got_l, got_g in ((losses[k], grads[k]), (losses2[k], grads2[k])):
      np.testing.assert_allclose(got_l, ref_losses, rtol=1e-6)
      for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  (values, auxes), grads3 = mtl.value_and_jacobians(
      lambda p, x, y: (_loss_fn(p, x, y), jnp.mean(x)), has_aux=True,
      batch_argnums=(1, 2))(params, tuple(xs[:2]), tuple(ys[:2]))
  np.testing.assert_allclose(auxes[1], jnp.mean(xs[1]), rtol=1e-6)
  np.testing.assert_allclose(values[0], losses[0], rtol=1e-6)


def test_path_feeds_a_jitted_train_step():
  params, xs, ys = _problem()
  tx = optax.chain(mtl.sdmgrad(num_tasks=2), optax.adam(1e-2))

  @jax.jit
  def step(params, state, xs, ys):
    _, (g1, g2, g3) = mtl.value_and_jacobians(_loss_fn, batch_argnums=(1, 2))(
        params, xs, ys)
    updates, state = tx.update(g1, state, params, second_grads=g2, third_grads=g3)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  moved = params
  for _ in range(3):
    moved, state = step(moved, state, tuple(xs), tuple(ys))
  weights = optax.tree.get(state, "task_weights")
  assert weights.shape == (2,) and np.isclose(float(jnp.sum(weights)), 1.0, atol=1e-6)
  assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(moved))
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(params)))


def test_path_errors():
  params, xs, ys = _problem()
  path = mtl.value_and_jacobians(_loss_fn, batch_argnums=(1, 2))
  with pytest.raises(ValueError, match="got 1 mini-batch.*value_and_jacobian"):
    path(params, (xs[0],), (ys[0],))
  with pytest.raises(ValueError, match="different numbers of batches"):
    path(params, tuple(xs), tuple(ys[:2]))
  with pytest.raises(ValueError, match="must be a tuple or list of mini-batches"):
    path(params, xs[0], ys[0])
  with pytest.raises(ValueError, match="both differentiated"):
    mtl.value_and_jacobians(_loss_fn, argnums=(0, 1), batch_argnums=1)(
        params, tuple(xs), ys[0])
  with pytest.raises(TypeError, match="batch_argnums must be an int"):
    mtl.value_and_jacobians(_loss_fn, batch_argnums="x")
  uneven = lambda p, x: _loss_fn(p, x, jnp.sum(x, 1))[: x.shape[0]]
  with pytest.raises(ValueError, match="batch 2 gives 2 losses but batch 1 gives 1"):
    mtl.value_and_jacobians(uneven)(params, (xs[0][:1], xs[1][:2]))


# --- SDMGrad and MoDo: hand-worked steps ----------------------------------------

# J1 J2^T = [[4, 2], [0, 1]], s1 = s2 = 2: the normalised cross matrix is
# C = [[1, 0.5], [0, 0.25]].
_G1 = {"w": jnp.array([[2.0, 0.0], [0.0, 1.0]])}
_G2 = {"w": jnp.array([[2.0, 0.0], [1.0, 1.0]])}
_G3 = {"w": jnp.array([[1.0, 1.0], [0.0, 3.0]])}


def _two_steps(tx, third=None):
  state = tx.init(None)
  out = []
  for _ in range(2):
    update, state = tx.update(_G1, state, second_grads=_G2, third_grads=third)
    out.append((np.asarray(update["w"]), np.asarray(state.task_weights),
                np.asarray(state.simplex_weights)))
  return out


def test_sdmgrad_two_steps_by_hand():
  # lam = 1, gamma = 0.5, w0 = (1/2, 1/2), so w + lam w0 = w + 1/2:
  # step 1: C (1, 1) = (1.5, 0.25); w - 0.5 (1.5, 0.25) = (-0.25, 0.375),
  #   projected (theta = -0.4375): w = (0.1875, 0.8125); applied (w + 0.5) / 2.
  # step 2: C (0.6875, 1.3125) = (1.34375, 0.328125); (-0.484375, 0.6484375)
  #   projects (theta = -0.3515625) onto the vertex (0, 1).
  (u1, tw1, w1), (u2, tw2, w2) = _two_steps(
      mtl.sdmgrad(lam=1.0, gamma=0.5, iters=1, num_tasks=2))
  np.testing.assert_allclose(w1, [0.1875, 0.8125], atol=1e-7)
  np.testing.assert_allclose(tw1, [0.34375, 0.65625], atol=1e-7)
  np.testing.assert_allclose(u1, [0.6875, 0.65625], atol=1e-7)  # J1^T applied
  np.testing.assert_allclose(w2, [0.0, 1.0], atol=1e-7)
  np.testing.assert_allclose(tw2, [0.25, 0.75], atol=1e-7)
  # Two projected steps in one update are the two updates' steps.
  (_, tw, w), _ = _two_steps(mtl.sdmgrad(lam=1.0, gamma=0.5, iters=2, num_tasks=2))
  np.testing.assert_allclose(w, [0.0, 1.0], atol=1e-7)
  np.testing.assert_allclose(tw, [0.25, 0.75], atol=1e-7)
  # A third batch is what the weights combine: J3^T (0.34375, 0.65625).
  (u, tw, _), _ = _two_steps(mtl.sdmgrad(lam=1.0, gamma=0.5, iters=1, num_tasks=2), _G3)
  np.testing.assert_allclose(tw, [0.34375, 0.65625], atol=1e-7)
  np.testing.assert_allclose(u, [0.34375, 0.34375 + 3 * 0.65625], atol=1e-6)


def test_modo_two_steps_by_hand():
  # gamma = 0.5, rho = 0.5, lambda_0 = (1/2, 1/2):
  # step 1: (C + rho I) lambda = (0.75, 0.125) + (0.25, 0.25) = (1, 0.375);
  #   (0, 0.3125) projects (theta = -0.34375) to (0.34375, 0.65625).
  # step 2: (0.671875, 0.1640625) + (0.171875, 0.328125) = (0.84375, 0.4921875);
  #   (-0.078125, 0.41015625) projects (theta = -0.333984375) to
  #   (0.255859375, 0.744140625).
  (u1, tw1, l1), (u2, tw2, l2) = _two_steps(mtl.modo(gamma=0.5, rho=0.5, num_tasks=2))
  np.testing.assert_allclose(l1, [0.34375, 0.65625], atol=1e-7)
  np.testing.assert_allclose(tw1, l1)
  np.testing.assert_allclose(u1, [0.6875, 0.65625], atol=1e-7)
  np.testing.assert_allclose(l2, [0.255859375, 0.744140625], atol=1e-7)
  np.testing.assert_allclose(u2, [0.51171875, 0.744140625], atol=1e-7)
  (u, _, _), _ = _two_steps(mtl.modo(gamma=0.5, rho=0.5, num_tasks=2), _G3)
  np.testing.assert_allclose(u, [0.34375, 0.34375 + 3 * 0.65625], atol=1e-6)


def test_gamma_zero_is_the_mean_of_the_update_batch():
  for tx in (mtl.modo(gamma=0.0, num_tasks=2),
             mtl.sdmgrad(gamma=0.0, lam=0.7, num_tasks=2)):
    (u, tw, _), _ = _two_steps(tx, _G3)
    np.testing.assert_allclose(tw, [0.5, 0.5], atol=1e-7)
    np.testing.assert_allclose(u, np.asarray(_G3["w"]).mean(0), atol=1e-7)


# --- fixed points: closed forms and optimality --------------------------------------


_modo_run = jax.jit(lambda c, gamma, rho: jax.lax.fori_loop(
    0, 400, lambda _, l: modo_lib.weight_step(c, l, gamma, rho),
    jnp.full((c.shape[0],), 1.0 / c.shape[0])))


@pytest.mark.parametrize("seed", range(3))
def test_modo_with_one_batch_is_projected_gradient_descent(seed):
  rng = np.random.default_rng(seed)
  rows = rng.normal(size=(3, 6)) * np.array([[1.0], [0.5], [2.0]])
  grads = {"w": jnp.asarray(rows, jnp.float32)}
  gram = rows @ rows.T / np.max(np.sum(rows ** 2, axis=1))
  gamma, rho = 0.3, 0.2
  tx = mtl.same_batch(mtl.modo(gamma=gamma, rho=rho, num_tasks=3))
  state, lam = tx.init(None), np.full(3, 1 / 3)
  for _ in range(4):
    update, state = tx.update(grads, state)
    lam = _np_project(lam - gamma * (gram + rho * np.eye(3)) @ lam)
    np.testing.assert_allclose(state.task_weights, lam, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(update["w"], lam @ rows, rtol=1e-5, atol=1e-5)


def test_modo_converges_to_the_two_task_closed_form():
  # min over the simplex of 1/2 l^T (G + rho I) l: l_1 = (G22 + rho - G12) /
  # (G11 + G22 + 2 rho - 2 G12), clipped to [0, 1]; rho = 0 is MGDA's point.
  for gram, rho in (([[1.0, 0.2], [0.2, 0.3]], 0.0), ([[1.0, -0.6], [-0.6, 0.8]], 0.3),
                    ([[1.0, 0.9], [0.9, 0.85]], 0.0)):
    g = np.asarray(gram)
    a = (g[1, 1] + rho - g[0, 1]) / (g[0, 0] + g[1, 1] + 2 * rho - 2 * g[0, 1])
    a = np.clip(a, 0.0, 1.0)
    got = _modo_run(jnp.asarray(g, jnp.float32), 0.5, rho)
    np.testing.assert_allclose(got, [a, 1 - a], atol=1e-5)
  # rho = 0 on four tasks: MGDA's min-norm point, whose KKT conditions are
  # (G l)_t equal to its minimum on the support and above it elsewhere.
  rows = np.random.default_rng(4).normal(size=(4, 5)) + 0.5
  g = rows @ rows.T / np.max(np.sum(rows ** 2, axis=1))
  lam = np.asarray(_modo_run(jnp.asarray(g, jnp.float32), 0.5, 0.0), np.float64)
  grad, support = g @ lam, lam > 1e-6
  assert support.sum() >= 2 and abs(lam.sum() - 1) < 1e-5
  np.testing.assert_allclose(grad[support], grad[support].min(), atol=1e-5)
  assert np.all(grad[~support] >= grad[support].min() - 1e-5)


def test_sdmgrad_converges_to_the_direction_oriented_optimum():
  # Two tasks: w_1 = ((G22 - G12)(1 + lam/2) - (G11 - G12) lam/2) /
  # (G11 - 2 G12 + G22), clipped: the minimiser of 1/2 ||g_w + lam g_0||^2.
  lam = 0.3
  for gram in ([[1.0, 0.2], [0.2, 0.3]], [[1.0, -0.6], [-0.6, 0.8]], [[1.0, 0.95], [0.95, 0.92]]):
    g = np.asarray(gram)
    a = ((g[1, 1] - g[0, 1]) * (1 + lam / 2) - (g[0, 0] - g[0, 1]) * lam / 2) / (
        g[0, 0] - 2 * g[0, 1] + g[1, 1])
    a = np.clip(a, 0.0, 1.0)
    got = sdmgrad_lib.simplex_steps(jnp.asarray(g, jnp.float32), jnp.full(2, 0.5),
                                    lam, 0.5, 400)
    np.testing.assert_allclose(got, [a, 1 - a], atol=1e-5)
  # Four tasks, KKT: the gradient G (w + lam w0) is smallest, and equal, on the
  # support of w.
  rows = np.random.default_rng(5).normal(size=(4, 6)) + 0.3
  g = rows @ rows.T / np.max(np.sum(rows ** 2, axis=1))
  w = np.asarray(sdmgrad_lib.simplex_steps(jnp.asarray(g, jnp.float32),
                                           jnp.full(4, 0.25), lam, 0.5, 400), np.float64)
  grad = g @ (w + lam / 4)
  support = w > 1e-6
  assert support.any() and abs(w.sum() - 1) < 1e-5
  np.testing.assert_allclose(grad[support], grad[support].min(), atol=1e-5)
  assert np.all(grad[~support] >= grad[support].min() - 1e-5)


# --- jit, chains, hyperparameters, degenerate inputs ------------------------------


_FACTORIES = {
    "sdmgrad": lambda T, **kw: mtl.sdmgrad(num_tasks=T, **kw),
    "modo": lambda T, **kw: mtl.modo(num_tasks=T, **kw),
}


@pytest.mark.parametrize("name", list(_FACTORIES))
def test_jit_matches_eager_with_three_batches(name):
  tx = _FACTORIES[name](3)
  params = jax.tree.map(lambda x: x[0], _tree(3, 0))
  batches = [[_tree(3, 10 * step + k) for k in range(3)] for step in range(3)]
  update = jax.jit(tx.update)
  eager_state = jit_state = tx.init(params)
  for g1, g2, g3 in batches:
    eager, eager_state = tx.update(g1, eager_state, params, second_grads=g2, third_grads=g3)
    jitted, jit_state = update(g1, jit_state, params, second_grads=g2, third_grads=g3)
    for a, b in zip(jax.tree.leaves((eager, eager_state)), jax.tree.leaves((jitted, jit_state))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    rebuilt = mtl.combine(eager_state.task_weights, g3)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(rebuilt)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(_FACTORIES))
def test_weights_ignore_each_batch_scale(name):
  # The step sizes are relative to s1 s2: scaling one batch changes nothing
  # in the weights; scaling the update's batch scales the update.
  g1, g2 = _tree(3, 0), _tree(3, 1)
  tx = _FACTORIES[name](3)
  _, base = tx.update(g1, tx.init(None), second_grads=g2)
  _, scaled = tx.update(g1, tx.init(None), second_grads=jax.tree.map(lambda x: 1e6 * x, g2))
  np.testing.assert_allclose(scaled.task_weights, base.task_weights, rtol=1e-5)


def _degenerate():
  base = _tree(1, 7)
  tile = lambda signs: jax.tree.map(lambda g: jnp.concatenate([s * g for s in signs]), base)
  scaled = lambda s, seed: jax.tree.map(lambda x: s * x, _tree(3, seed))
  return {
      "zero": (jax.tree.map(jnp.zeros_like, _tree(3, 0)), _tree(3, 1)),
      "zero_second": (_tree(3, 0), jax.tree.map(jnp.zeros_like, _tree(3, 1))),
      "identical": (tile([1.0, 1.0, 1.0]), tile([1.0, 1.0, 1.0])),
      "opposite": (tile([1.0, -1.0]), tile([-1.0, 1.0])),
      "one_task": (base, _tree(1, 8)),
      "tiny": (scaled(1e-20, 0), scaled(1e-20, 1)),
      "huge": (scaled(1e20, 0), scaled(1e20, 1)),
      "mixed": (scaled(1e-20, 0), scaled(1e20, 1)),
  }


@pytest.mark.parametrize("name", list(_FACTORIES))
@pytest.mark.parametrize("kind", list(_degenerate()))
def test_finite_on_degenerate_two_batch_inputs(name, kind):
  first, second = _degenerate()[kind]
  num_tasks = jax.tree.leaves(first)[0].shape[0]
  tx = _FACTORIES[name](num_tasks)
  state = tx.init(None)
  for _ in range(2):
    out, state = tx.update(first, state, second_grads=second)
    for leaf in jax.tree.leaves((out, state)):
      assert np.all(np.isfinite(np.asarray(leaf, np.float64))), (kind, leaf)
    # Finite weights on the simplex (SDMGrad's: mixed with the uniform ones).
    np.testing.assert_allclose(float(jnp.sum(state.task_weights)), 1.0, atol=1e-5)
    assert np.all(np.asarray(state.task_weights) >= 0)


def test_optax_chain_and_injected_hyperparameters():
  g1, g2 = _tree(2, 0), _tree(2, 1)
  params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), g1)
  injected = optax.inject_hyperparams(mtl.modo, static_args=("num_tasks",))(
      gamma=0.5, rho=0.5, num_tasks=2)
  tx = optax.chain(injected, optax.sgd(1.0))
  _, state = jax.jit(tx.update)(_G1, tx.init({"w": jnp.zeros(2)}), {"w": jnp.zeros(2)},
                                second_grads=_G2)
  np.testing.assert_allclose(optax.tree.get(state, "task_weights"), [0.34375, 0.65625],
                             atol=1e-7)
  # A traced step size (a schedule) changes the weights.
  state = optax.tree.set(state, gamma=jnp.asarray(0.0))
  _, state = jax.jit(tx.update)(_G1, state, {"w": jnp.zeros(2)}, second_grads=_G2)
  np.testing.assert_allclose(optax.tree.get(state, "task_weights"), [0.34375, 0.65625],
                             atol=1e-7)
  chained = optax.chain(mtl.sdmgrad(num_tasks=2), optax.adam(1e-3))
  updates, _ = jax.jit(chained.update)(g1, chained.init(params), params, second_grads=g2)
  assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_heads_are_summed_and_skipped_steps_keep_the_state():
  g1, g2 = _tree(2, 0), _tree(2, 1)
  params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), g1)
  tx = mtl.modo(num_tasks=2, shared={"a": True, "b": True, "c": False})
  out, state = tx.update(g1, tx.init(params), params, second_grads=g2)
  np.testing.assert_allclose(out["c"]["d"], g1["c"]["d"].sum(0), rtol=1e-6)
  other = dict(g2, c={"d": 100.0 * g2["c"]["d"]})
  _, state2 = tx.update(g1, tx.init(params), params, second_grads=other)
  np.testing.assert_allclose(state2.task_weights, state.task_weights, rtol=1e-6)
  # A NaN in the second batch only: the step is skipped, lambda kept.
  poisoned = jax.tree.map(lambda x: x.at[0].set(jnp.nan), g2)
  out, skipped = tx.update(g1, state, params, second_grads=poisoned)
  assert all(not np.any(l) for l in jax.tree.leaves(out))
  np.testing.assert_array_equal(skipped.task_weights, [0.0, 0.0])
  np.testing.assert_array_equal(skipped.simplex_weights, state.simplex_weights)


# --- errors -------------------------------------------------------------------


def test_update_errors():
  tx = mtl.sdmgrad(num_tasks=2)
  state = tx.init(None)
  with pytest.raises(ValueError, match=r"second_grads=.*value_and_jacobians.*same_batch"):
    tx.update(_G1, state)
  with pytest.raises(ValueError, match="second_grads must have the structure"):
    tx.update(_G1, state, second_grads={"v": _G2["w"]})
  with pytest.raises(ValueError, match=r"leaf \['w'\] of second_grads has shape \(3, 2\)"):
    tx.update(_G1, state, second_grads={"w": jnp.zeros((3, 2))})
  with pytest.raises(ValueError, match=r"leaf \['w'\] of third_grads has shape"):
    mtl.modo(num_tasks=2).update(_G1, mtl.modo(num_tasks=2).init(None),
                                 second_grads=_G2, third_grads={"w": jnp.zeros((2, 3))})
  with pytest.raises(ValueError, match="second_grads has dtype int32"):
    tx.update(_G1, state, second_grads={"w": jnp.zeros((2, 2), jnp.int32)})
  with pytest.raises(ValueError, match="built for 2 tasks"):
    tx.update({"w": jnp.ones((3, 2))}, state, second_grads={"w": jnp.ones((3, 2))})
  # Fused chains and one-batch paths cannot give the cross matrix.
  fused = mtl.chain(mtl.scale_by_realtime_loss(), mtl.modo(num_tasks=2))
  with pytest.raises(ValueError, match="mtl.modo reads the cross matrix.*optax.chain"):
    fused.update(_G1, fused.init(None), losses=jnp.ones(2), second_grads=_G2)
  with pytest.raises(TypeError, match="must be a two-batch method"):
    mtl.same_batch(mtl.mgda())
  with pytest.raises(TypeError, match="the method must be one of optax_mtl's"):
    mtl.same_batch(optax.adam(1e-3))


def test_hyperparameter_errors():
  for kwargs, error in (({"lam": -1.0}, ValueError), ({"gamma": -0.1}, ValueError),
                        ({"gamma": float("nan")}, ValueError), ({"iters": 0}, ValueError),
                        ({"iters": 2.5}, TypeError), ({"iters": True}, TypeError),
                        ({"num_tasks": 0}, ValueError), ({"num_tasks": "3"}, TypeError)):
    with pytest.raises(error, match="mtl.sdmgrad"):
      mtl.sdmgrad(**{"num_tasks": 2, **kwargs})
  for kwargs, error in (({"gamma": -1.0}, ValueError), ({"rho": -0.5}, ValueError),
                        ({"rho": float("inf")}, ValueError), ({"num_tasks": None}, TypeError)):
    with pytest.raises(error, match="mtl.modo"):
      mtl.modo(**{"num_tasks": 2, **kwargs})
  with pytest.raises(TypeError):
    mtl.modo()  # num_tasks is required: the state holds lambda


def test_state_keeps_its_types_under_x64():
  # The solvers return float32 weights: the state starts with them, so a
  # jitted train step compiles once also under jax_enable_x64.
  with jax.enable_x64(True):
    for make in _FACTORIES.values():
      assert make(3).init(None).simplex_weights.dtype == jnp.float32
    step = modo_lib.weight_step(jnp.eye(2, dtype=jnp.float64), jnp.full(2, 0.5), 0.1, 0.1)
    assert step.dtype == jnp.float32
