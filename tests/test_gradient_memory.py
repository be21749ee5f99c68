"""Gradient-memory methods (MoCo, DB-MTL, Excess-MTL): the papers' updates by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl as mtl
from optax_mtl._src.methods.gradient import db_mtl as db_mtl_lib
from optax_mtl._src.methods.gradient import moco as moco_lib
from optax_mtl._src.solvers import simplex

PARAMS = {"w": jnp.zeros(2)}


def _run(tx, grads, losses=None, params=PARAMS):
  """Updates over the steps; returns the [2] updates and the states."""
  state = tx.init(params)
  updates, states = [], []
  for step, g in enumerate(grads):
    kwargs = {} if losses is None else {"losses": jnp.asarray(losses[step], jnp.float32)}
    out, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params, **kwargs)
    updates.append(np.asarray(out["w"], np.float64))
    states.append(state)
  return updates, states


# --- MoCo ---------------------------------------------------------------------


def test_moco_two_tasks_by_hand():
  # beta = 0.5, gamma = 0.5, constant steps; g = diag(2, 1) twice.
  # Step 1: y = g / 2 = diag(1, 0.5); Gbar = diag(1, 0.25);
  #   lambda - 0.5 Gbar lambda = [0.25, 0.4375], projected (theta = -0.15625)
  #   to [0.40625, 0.59375]; update = [0.40625, 0.296875].
  # Step 2: y = diag(1.5, 0.75); Gbar = diag(1, 0.25);
  #   [0.40625, 0.59375] - 0.5 [0.40625, 0.1484375] = [0.203125, 0.51953125],
  #   theta = -0.138671875, lambda = [0.341796875, 0.658203125];
  #   update = [1.5 * 0.341796875, 0.75 * 0.658203125].
  tx = mtl.moco(beta=0.5, gamma=0.5, beta_sigma=0.0, gamma_sigma=0.0, num_tasks=2)
  g = [[2.0, 0.0], [0.0, 1.0]]
  updates, states = _run(tx, [g, g])
  np.testing.assert_allclose(states[0].task_weights, [0.40625, 0.59375], rtol=1e-6)
  np.testing.assert_allclose(updates[0], [0.40625, 0.296875], rtol=1e-6)
  np.testing.assert_allclose(states[1].memory["w"], [[1.5, 0.0], [0.0, 0.75]])
  np.testing.assert_allclose(states[1].task_weights, [0.341796875, 0.658203125],
                             rtol=1e-6)
  np.testing.assert_allclose(updates[1], [0.5126953125, 0.49365234375], rtol=1e-6)
  assert int(states[1].count) == 2


def _project(v):
  u = np.sort(v)[::-1]
  css = np.cumsum(u)
  j = np.arange(1, len(v) + 1)
  rho = j[u - (css - 1) / j > 0].max()
  return np.maximum(v - (css[rho - 1] - 1) / rho, 0)


def _moco_reference(grads, beta, gamma, rho, beta_sigma, gamma_sigma):
  """Algorithm 1 with the Gramian divided by its largest diagonal entry."""
  num = grads[0].shape[0]
  y, lam, out = np.zeros_like(grads[0]), np.full(num, 1.0 / num), []
  for k, g in enumerate(grads, start=1):
    y = y - beta / k ** beta_sigma * (y - g)
    gram = y @ y.T
    gram = gram / gram.diagonal().max()
    lam = _project(lam - gamma / k ** gamma_sigma * (gram + rho * np.eye(num)) @ lam)
    out.append(lam @ y)
  return out, lam


@pytest.mark.parametrize("seed", range(2))
def test_moco_matches_algorithm(seed):
  rng = np.random.default_rng(seed)
  grads = [rng.normal(size=(3, 2)) + [0.5, -0.2] for _ in range(4)]
  kw = dict(beta=0.7, gamma=0.8, rho=0.1, beta_sigma=0.5, gamma_sigma=0.3)
  expected, lam = _moco_reference(grads, **kw)
  updates, states = _run(mtl.moco(num_tasks=3, **kw), grads)
  for got, want in zip(updates, expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(states[-1].task_weights, lam, rtol=1e-5, atol=1e-6)


def test_moco_step_is_the_papers_with_gamma_over_the_largest_squared_norm():
  # Gbar = Y Y^T / s^2, so gamma on Gbar is the paper's step gamma / s^2 on Y Y^T.
  y = np.array([[3.0, 1.0], [-1.0, 2.0], [0.5, 0.5]])
  gram = y @ y.T
  scale_sq = gram.diagonal().max()
  lam = np.array([0.2, 0.5, 0.3])
  got = moco_lib.weight_step(jnp.asarray(gram / scale_sq, jnp.float32),
                             jnp.asarray(lam, jnp.float32), 0.3, 0.0)
  np.testing.assert_allclose(got, _project(lam - 0.3 / scale_sq * gram @ lam),
                             rtol=1e-6, atol=1e-7)


def test_simplex_projection_optimality():
  # MoCo's projection: w = argmin_{simplex} ||w - v|| iff <v - w, e_j - w> <= 0
  # for every vertex e_j.
  rng = np.random.default_rng(0)
  for v in [rng.normal(size=6) * 3, np.array([0.3, 0.3, -2.0, 0.3]), np.full(3, 5.0)]:
    w = np.asarray(simplex.project(jnp.asarray(v, jnp.float32)), np.float64)
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-6
    slack = (np.eye(len(v)) - w) @ (v - w)
    assert np.all(slack <= 1e-5), slack
    np.testing.assert_allclose(w, _project(v), atol=1e-6)


# --- DB-MTL -------------------------------------------------------------------


def test_db_mtl_two_tasks_by_hand():
  # beta = 0.5, constant rate. Step 1: g / L = [[0.6, 0.8], [0, 2]], ghat =
  # [[0.3, 0.4], [0, 1]], norms [0.5, 1], alpha = [2, 1], update = [0.6, 1.8].
  # Step 2: g / L = [[0.9, 1.2], [0, 3]], ghat = [[0.6, 0.8], [0, 2]], norms
  # [1, 2], alpha = [2, 1], update = [1.2, 3.6].
  tx = mtl.db_mtl(beta=0.5, beta_sigma=0.0, num_tasks=2)
  grads = [[[3.0, 4.0], [0.0, 1.0]], [[1.8, 2.4], [0.0, 9.0]]]
  updates, states = _run(tx, grads, losses=[[5.0, 0.5], [2.0, 3.0]])
  np.testing.assert_allclose(states[0].memory["w"], [[0.3, 0.4], [0.0, 1.0]], rtol=1e-6)
  np.testing.assert_allclose(states[0].task_weights, [2.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(updates[0], [0.6, 1.8], rtol=1e-6)
  np.testing.assert_allclose(states[1].memory["w"], [[0.6, 0.8], [0.0, 2.0]], rtol=1e-6)
  np.testing.assert_allclose(updates[1], [1.2, 3.6], rtol=1e-6)


def test_db_mtl_decayed_rate_and_balanced_norms():
  # beta_k = beta / k^sigma; every term alpha_t ghat_t has the largest norm.
  rng = np.random.default_rng(3)
  grads = [rng.normal(size=(3, 2)) * [[1.0], [10.0], [0.1]] for _ in range(3)]
  losses = [rng.uniform(0.5, 2.0, size=3) for _ in range(3)]
  updates, states = _run(mtl.db_mtl(beta=0.8, beta_sigma=0.5, num_tasks=3),
                         grads, losses=losses)
  ghat = np.zeros((3, 2))
  for k, (g, loss, out, state) in enumerate(zip(grads, losses, updates, states), 1):
    rate = 0.8 / math.sqrt(k)
    ghat = rate * ghat + (1 - rate) * g / loss[:, None]
    norms = np.linalg.norm(ghat, axis=1)
    alpha = norms.max() / norms
    np.testing.assert_allclose(state.memory["w"], ghat, rtol=1e-5)
    np.testing.assert_allclose(state.task_weights, alpha, rtol=1e-5)
    np.testing.assert_allclose(out, alpha @ ghat, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(alpha[:, None] * ghat, axis=1),
                               norms.max(), rtol=1e-5)


@pytest.mark.parametrize("seed", range(2))
def test_db_mtl_without_memory_closed_form(seed):
  # beta = 0: update = sum_t max_s ||g_s / L_s|| g_t / ||g_t||.
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(4, 3)) * rng.uniform(0.1, 10.0, size=(4, 1))
  g[2] = 0.0  # a zero gradient gets weight 0
  losses = rng.uniform(0.1, 5.0, size=4)
  tx = mtl.db_mtl(beta=0.0, num_tasks=4)
  assert isinstance(tx, mtl.Method)  # no memory: an ordinary aggregator
  state = tx.init(None)
  assert state == mtl.WeightsState(state.task_weights)
  out, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state,
                         losses=jnp.asarray(losses, jnp.float32))
  norms = np.linalg.norm(g, axis=1)
  top = (norms / losses).max()
  weights = np.where(norms > 0, top / np.where(norms > 0, norms, 1), 0)
  np.testing.assert_allclose(state.task_weights, weights, rtol=1e-5)
  np.testing.assert_allclose(out["w"], weights @ g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.6])
def test_db_mtl_ignores_each_losss_units(beta):
  # log(c_t L_t) has the gradient of log L_t: scaling task t's loss and
  # gradient by c_t changes nothing.
  rng = np.random.default_rng(5)
  grads = [rng.normal(size=(3, 2)) for _ in range(2)]
  losses = [rng.uniform(0.5, 2.0, size=3) for _ in range(2)]
  c = np.array([1e-3, 1.0, 50.0])
  base, _ = _run(mtl.db_mtl(beta=beta, num_tasks=3), grads, losses)
  scaled, _ = _run(mtl.db_mtl(beta=beta, num_tasks=3), [c[:, None] * g for g in grads],
                   [c * l for l in losses])
  for a, b in zip(base, scaled):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_db_mtl_balance_zero_and_capped():
  weights = db_mtl_lib.balance(jnp.array([2.0, 0.0, 1e-35, 1.0]))
  np.testing.assert_allclose(weights, [1.0, 0.0, 1e30, 2.0])


# --- Excess-MTL -----------------------------------------------------------------


def test_excess_mtl_three_steps_by_hand():
  # eta = 1. Step 1 (warm-up): S = |g|, r = [9/3, 1/1] = baseline; w uniform.
  # Step 2: S_0 = [5, 0], r = [16/5, 0], ratio [16/15, 0], w ∝ [e^(16/15), 1].
  # Step 3: S_1 = [0, sqrt(5)], r = [0, 4/sqrt(5)], w ∝ w * [1, e^(4/sqrt 5)].
  tx = mtl.excess_mtl(robust_step_size=1.0, num_tasks=2)
  grads = [[[3.0, 0.0], [0.0, 1.0]], [[4.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]]
  updates, states = _run(tx, grads)
  np.testing.assert_allclose(states[0].baseline, [3.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(states[0].task_weights, [0.5, 0.5])
  np.testing.assert_allclose(updates[0], [1.5, 0.5], rtol=1e-6)
  w2 = np.array([math.exp(16 / 15), 1.0])
  w2 /= w2.sum()
  np.testing.assert_allclose(states[1].task_weights, w2, rtol=1e-6)
  np.testing.assert_allclose(updates[1], [4 * w2[0], 0.0], rtol=1e-6)
  np.testing.assert_allclose(states[2].memory["w"], [[5.0, 0.0], [0.0, math.sqrt(5)]],
                             rtol=1e-6)
  w3 = w2 * [1.0, math.exp(4 / math.sqrt(5))]
  w3 /= w3.sum()
  np.testing.assert_allclose(states[2].task_weights, w3, rtol=1e-6)
  np.testing.assert_allclose(updates[2], [0.0, 2 * w3[1]], rtol=1e-6)
  np.testing.assert_allclose(states[2].baseline, [3.0, 1.0], rtol=1e-6)


def _excess_reference(grads, eta, warmup):
  """Equations 6, 7, 9 with a warm-up baseline, weights on the simplex."""
  num = grads[0].shape[0]
  squares, w, base, out = np.zeros_like(grads[0]), np.full(num, 1.0 / num), 0.0, []
  for k, g in enumerate(grads, start=1):
    squares = squares + g * g
    root = np.sqrt(squares)
    r = np.where(root > 0, g * g / np.where(root > 0, root, 1), 0).sum(axis=1)
    if k <= warmup:
      base = base + (r - base) / k
    else:
      w = w * np.exp(eta * r / base)
      w = w / w.sum()
    out.append(w @ g)
  return out, w


def test_excess_mtl_matches_algorithm_with_warmup():
  rng = np.random.default_rng(7)
  grads = [rng.normal(size=(3, 2)) * [[0.1], [1.0], [5.0]] for _ in range(5)]
  expected, w = _excess_reference(grads, eta=0.5, warmup=2)
  updates, states = _run(mtl.excess_mtl(0.5, warmup_steps=2, num_tasks=3), grads)
  np.testing.assert_allclose(states[1].task_weights, np.full(3, 1 / 3))
  for got, want in zip(updates, expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(states[-1].task_weights, w, rtol=1e-5)


def test_excess_mtl_huge_ratio_gives_weight_zero_not_nan():
  tx = mtl.excess_mtl(robust_step_size=1.0, num_tasks=2)
  tiny_then_big = [[[1e-20, 0.0], [1.0, 0.0]], [[1e20, 0.0], [1.0, 0.0]]]
  updates, states = _run(tx, tiny_then_big)
  np.testing.assert_allclose(states[1].task_weights, [1.0, 0.0])
  assert np.all(np.isfinite(updates[1]))


# --- the memory machinery -------------------------------------------------------

MAKERS = {
    "moco": lambda **kw: mtl.moco(num_tasks=3, **kw),
    "db_mtl": lambda **kw: mtl.db_mtl(num_tasks=3, **kw),
    "excess_mtl": lambda **kw: mtl.excess_mtl(num_tasks=3, **kw),
}
TREE = {"trunk": {"w": jnp.zeros((4, 2)), "b": jnp.zeros(2, jnp.bfloat16)},
        "head": jnp.zeros((2, 1))}
LOSSES = jnp.array([1.0, 2.0, 0.5])


def _tree_grads(seed, scale=1.0):
  leaves, treedef = jax.tree.flatten(TREE)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      (scale * jax.random.normal(k, (3,) + l.shape)).astype(l.dtype)
      for k, l in zip(keys, leaves)])


@pytest.mark.parametrize("name", MAKERS)
def test_memory_only_for_shared_leaves(name):
  tx = MAKERS[name](shared={"trunk": True, "head": False})
  state = tx.init(TREE)
  assert state._fields[:2] == ("task_weights", "memory")
  assert state.memory["head"] is None
  assert state.memory["trunk"]["w"].shape == (3, 4, 2)
  assert state.memory["trunk"]["b"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(state.memory["trunk"]["w"], 0.0)
  grads = _tree_grads(0)
  out, state = tx.update(grads, state, TREE, losses=LOSSES)
  assert state.memory["head"] is None
  assert state.memory["trunk"]["b"].dtype == jnp.bfloat16
  assert out["trunk"]["b"].dtype == jnp.bfloat16
  np.testing.assert_allclose(out["head"], grads["head"].sum(0), rtol=1e-6)
  assert optax.tree.get(state, "task_weights").shape == (3,)


@pytest.mark.parametrize("name", MAKERS)
def test_jit_matches_eager_over_three_steps(name):
  tx = MAKERS[name]()
  eager_state = jit_state = tx.init(TREE)
  update = jax.jit(tx.update)
  for step in range(3):
    grads = _tree_grads(step)
    eager, eager_state = tx.update(grads, eager_state, TREE, losses=LOSSES)
    compiled, jit_state = update(grads, jit_state, TREE, losses=LOSSES)
    for a, b in zip(jax.tree.leaves((eager, eager_state)),
                    jax.tree.leaves((compiled, jit_state))):
      np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                 rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", MAKERS)
def test_finite_on_degenerate_gradients(name):
  base = _tree_grads(1)
  cases = {
      "tiny": _tree_grads(2, 1e-20),
      "huge": _tree_grads(2, 1e20),
      "zero": jax.tree.map(jnp.zeros_like, base),
      "identical": jax.tree.map(lambda g: jnp.broadcast_to(g[:1], g.shape), base),
      "opposite": jax.tree.map(lambda g: g.at[1].set(-g[0]), base),
  }
  for kind, grads in cases.items():
    tx = MAKERS[name]()
    state = tx.init(TREE)
    for _ in range(2):
      out, state = tx.update(grads, state, TREE, losses=LOSSES)
      for leaf in jax.tree.leaves((out, state)):
        assert np.all(np.isfinite(np.asarray(leaf, np.float64))), (kind, leaf)
    weights = np.asarray(state.task_weights)
    if kind != "zero":
      assert np.any(weights != 0), kind


def test_homogeneous_at_extreme_scales():
  # float32 leaves only: bfloat16 rounds x * 1e-20 and x * 1e20 differently.
  tree = jax.tree.map(lambda p: p.astype(jnp.float32), TREE)
  base = jax.tree.map(lambda g: g.astype(jnp.float32), _tree_grads(3))
  for name, make in MAKERS.items():
    runs = []
    for scale in (1e-20, 1e20):
      tx = make()
      grads = jax.tree.map(lambda g: g * scale, base)
      state = tx.init(tree)
      for _ in range(2):
        out, state = tx.update(grads, state, tree, losses=LOSSES)
      runs.append(np.asarray(out["trunk"]["w"], np.float64) / scale)
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-4, err_msg=name)


def test_num_tasks_is_required():
  for factory in (mtl.moco, mtl.db_mtl, mtl.excess_mtl):
    with pytest.raises(TypeError, match="num_tasks"):
      factory()
    with pytest.raises(TypeError, match="num_tasks must be a positive Python int"):
      factory(num_tasks=None)
    with pytest.raises(ValueError, match="num_tasks must be a positive int"):
      factory(num_tasks=0)


@pytest.mark.parametrize("factory, kwargs, message", [
    (mtl.moco, {"beta": 0.0}, r"beta must be in \(0, 1\]"),
    (mtl.moco, {"beta": 1.5}, r"beta must be in \(0, 1\]"),
    (mtl.moco, {"gamma": -0.1}, "gamma must be finite and >= 0"),
    (mtl.moco, {"rho": float("nan")}, "rho must be finite and >= 0"),
    (mtl.moco, {"gamma_sigma": -1.0}, "gamma_sigma must be finite and >= 0"),
    (mtl.db_mtl, {"beta": 1.0}, r"beta must be in \[0, 1\)"),
    (mtl.db_mtl, {"beta_sigma": -0.5}, "beta_sigma must be finite and >= 0"),
    (mtl.excess_mtl, {"robust_step_size": 0.0}, "robust_step_size must be finite and > 0"),
    (mtl.excess_mtl, {"warmup_steps": 0}, "warmup_steps must be an integer >= 1"),
    (mtl.excess_mtl, {"warmup_steps": 1.5}, "warmup_steps must be an integer >= 1"),
])
def test_hyperparameter_errors(factory, kwargs, message):
  with pytest.raises(ValueError, match=message):
    factory(num_tasks=2, **kwargs)


@pytest.mark.parametrize("name", MAKERS)
def test_init_and_update_must_agree(name):
  tx = MAKERS[name]()
  grads = _tree_grads(0)
  with pytest.raises(TypeError, match=r"init needs the parameters.*tx.init\(params\)"):
    tx.init(None)
  other = {"trunk": TREE["trunk"]}
  with pytest.raises(ValueError, match="memory was built by tx.init.*structure"):
    tx.update(grads, tx.init(other), losses=LOSSES)
  wider = dict(TREE, head=jnp.zeros((2, 5)))
  with pytest.raises(ValueError, match=r"\['head'\].*shape \(3, 2, 1\).*memory.*\(3, 2, 5\)"):
    tx.update(grads, tx.init(wider), losses=LOSSES)
  with pytest.raises(ValueError, match=r"\['head'\] keeps a memory.*shared= mask"):
    _mask_flip(name, grads)
  with pytest.raises(TypeError, match="not this method's state"):
    tx.update(grads, mtl.WeightsState(jnp.ones(3)), TREE, losses=LOSSES)


def _mask_flip(name, grads):
  """A callable mask that marks the head shared at init, not at update."""
  flipped = {"value": True}
  tx = MAKERS[name](shared=lambda p: {"trunk": True, "head": flipped["value"]})
  state = tx.init(TREE)
  flipped["value"] = False
  return tx.update(grads, state, TREE, losses=LOSSES)


def test_chain_and_paths_refuse_a_memory_method():
  with pytest.raises(TypeError, match=r"argument 1 \(mtl.moco\) keeps a memory.*optax.chain"):
    mtl.chain(mtl.scale_by_realtime_loss(), mtl.moco(num_tasks=2))
  with pytest.raises(TypeError, match="mtl.db_mtl keeps a memory.*value_and_jacobian"):
    mtl.loss_weights(mtl.db_mtl(num_tasks=2), None, jnp.ones(2))
  # beta = 0 keeps no memory, so it fuses.
  assert isinstance(mtl.chain(mtl.scale_by_realtime_loss(),
                              mtl.db_mtl(beta=0.0, num_tasks=2)), mtl.Method)


def test_optax_chain_and_inject_hyperparams():
  tx = optax.inject_hyperparams(mtl.moco, static_args=("num_tasks",))(
      beta=1.0, gamma=0.5, beta_sigma=0.0, gamma_sigma=0.0, num_tasks=2)
  tx = optax.chain(tx, optax.sgd(1.0))
  state = tx.init(PARAMS)
  out, state = jax.jit(tx.update)({"w": jnp.array([[2.0, 0.0], [0.0, 1.0]])},
                                  state, PARAMS)
  # y = g, Gbar = diag(1, 0.25): [0.25, 0.4375] projected to [0.40625, 0.59375].
  np.testing.assert_allclose(optax.tree.get(state, "task_weights"), [0.40625, 0.59375])
  np.testing.assert_allclose(out["w"], [-0.8125, -0.59375])
