"""GradDrop and the STCH, PBI and COSMOS scalarisations against their papers' math."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl as mtl
from optax_mtl._src.methods.loss import cosmos as cosmos_lib

# --- GradDrop ---------------------------------------------------------------


def _drop(task_grads, leak=0.0, seed=0, state=None):
  tx = mtl.graddrop(leak, seed)
  return tx.update(task_grads, tx.init(None) if state is None else state)


def test_graddrop_agreeing_signs_give_the_sum():
  # Every coordinate has one sign across tasks: P is 0 or 1, so the mask is
  # forced whatever U is, and nothing is dropped.
  signs = jnp.where(jnp.arange(64) % 3 == 0, -1.0, 1.0)
  magnitudes = jnp.abs(jax.random.normal(jax.random.key(4), (2, 64)))
  grads = {"a": jnp.array([[1.0, -2.0, 0.0], [3.0, -1.0, 0.0]]),
           "b": signs[None, :] * magnitudes}
  for seed in range(2):
    out, _ = _drop(grads, seed=seed)
    np.testing.assert_array_equal(out["a"], [4.0, -3.0, 0.0])
    np.testing.assert_allclose(out["b"], grads["b"].sum(0), rtol=1e-6)


def test_graddrop_opposite_signs_keep_one_side():
  # g_1 = 2, g_2 = -1: P = (1 + 1/3) / 2 = 2/3. Keeping the positive side
  # gives 2, the negative side -1; a leak l adds l times what was dropped.
  n = 64
  grads = jnp.stack([jnp.full((n,), 2.0), jnp.full((n,), -1.0)])
  out, _ = _drop(grads, seed=3)
  assert set(np.unique(out).tolist()) == {-1.0, 2.0}
  leak = 0.25
  leaky, _ = _drop(grads, leak=leak, seed=3)
  # Same seed, same masks: positive kept -> 2 + 0.25 * (-1); else -1 + 0.25 * 2.
  expected = np.where(np.asarray(out) > 0, 1.75, -0.5)
  np.testing.assert_allclose(leaky, expected, rtol=1e-6)
  # One leak per task: task 0 always passes, task 1 only when kept.
  per_task, _ = _drop(grads, leak=jnp.array([1.0, 0.0]), seed=3)
  np.testing.assert_allclose(per_task, np.where(np.asarray(out) > 0, 2.0, 1.0))


def test_graddrop_with_full_leak_is_the_sum():
  grads = {"w": jax.random.normal(jax.random.key(0), (2, 64))}
  out, _ = _drop(grads, leak=1.0, seed=2)
  np.testing.assert_allclose(out["w"], grads["w"].sum(0), rtol=1e-6, atol=1e-6)


def test_graddrop_keeps_the_positive_side_with_probability_p():
  # 2000 coordinates with purities spread over (0, 1): the number kept
  # positive is a sum of Bernoulli(P_k); 5 standard deviations.
  n = 2000
  a = jnp.linspace(0.1, 3.0, n)
  b = jnp.linspace(3.0, 0.1, n) ** 1.5
  grads = jnp.stack([a, -b])
  purity = np.asarray(a / (a + b), np.float64)
  out, _ = _drop(grads, seed=11)
  kept_positive = np.asarray(out) > 0
  sigma = np.sqrt(np.sum(purity * (1 - purity)))
  assert abs(kept_positive.sum() - purity.sum()) < 5 * sigma
  # A single purity, P = 3/4, over the same number of coordinates.
  out, _ = _drop(jnp.stack([jnp.full((n,), 3.0), jnp.full((n,), -1.0)]), seed=12)
  fraction = np.mean(np.asarray(out) > 0)
  assert abs(fraction - 0.75) < 5 * np.sqrt(0.75 * 0.25 / n)


def test_graddrop_is_deterministic_and_its_key_advances():
  # jit == eager is checked by the property matrix.
  grads = {"w": jax.random.normal(jax.random.key(1), (2, 64)),
           "v": jax.random.normal(jax.random.key(2), (2, 3))}
  tx = mtl.graddrop(seed=5, num_tasks=2)
  first, state = tx.update(grads, tx.init(None))
  again, state_again = tx.update(grads, tx.init(None))
  for x, y in zip(jax.tree.leaves((first, state)), jax.tree.leaves((again, state_again))):
    np.testing.assert_array_equal(x, y)
  second, _ = tx.update(grads, state)
  other, _ = mtl.graddrop(seed=6).update(grads, mtl.graddrop(seed=6).init(None))
  assert np.any(np.asarray(second["w"]) != np.asarray(first["w"]))
  assert np.any(np.asarray(other["w"]) != np.asarray(first["w"]))
  np.testing.assert_array_equal(state.task_weights, np.ones(2))


def test_graddrop_zero_gradients_give_zero():
  out, _ = _drop(jnp.zeros((2, 3)))
  np.testing.assert_array_equal(out, np.zeros(3))


def test_graddrop_hyperparameter_errors():
  for bad in (1.5, -0.1, [0.5, 2.0]):
    with pytest.raises(ValueError, match=r"leak must be in \[0, 1\]"):
      mtl.graddrop(bad)
  with pytest.raises(ValueError, match="leak must be a number"):
    mtl.graddrop(jnp.zeros((2, 2)))
  with pytest.raises(ValueError, match="num_tasks=3 but leak has 2"):
    mtl.graddrop(jnp.array([0.1, 0.2]), num_tasks=3)
  with pytest.raises(TypeError, match="seed must be an integer"):
    mtl.graddrop(seed=0.5)
  tx = mtl.graddrop(jnp.array([0.1, 0.2]))
  with pytest.raises(ValueError, match=r"built for 2 tasks \(len\(leak\)\)"):
    tx.update(jnp.ones((3, 4)), tx.init(None))
  assert "permutation_equivariant" not in tx.claims
  assert mtl.graddrop().claims == {"homogeneous", "permutation_equivariant"}
  with pytest.raises(ValueError, match="coordinate by coordinate"):
    mtl.loss_weights(mtl.graddrop(), mtl.graddrop().init(None), jnp.ones(2))


# --- scalarisations: d_t is the derivative of the objective ----------------


def numeric_gradient(objective, losses, h=1e-6):
  losses = np.asarray(losses, np.float64)
  out = np.zeros_like(losses)
  for t in range(losses.size):
    step = np.zeros_like(losses)
    step[t] = h
    out[t] = (objective(losses + step) - objective(losses - step)) / (2 * h)
  return out


def weights_of(tx, losses, state=None):
  state = tx.init(None) if state is None else state
  weights, state = mtl.loss_weights(tx, state, jnp.asarray(losses, jnp.float32))
  return np.asarray(weights, np.float64), state


def stch_objective(mu, p, z):
  def g(losses):
    x = p * (losses - z) / mu
    return mu * (np.max(x) + np.log(np.sum(np.exp(x - np.max(x)))))
  return g


def test_stch_hand_worked_weights():
  # mu = 0.5, p = (1, 2), L = (1, 0.8), z = 0: logits (2, 3.2),
  # softmax (0.23148, 0.76852), d = p * softmax = (0.23148, 1.53704).
  tx = mtl.scale_by_stch(0.5, jnp.array([1.0, 2.0]), num_tasks=2)
  weights, _ = weights_of(tx, [1.0, 0.8])
  np.testing.assert_allclose(weights, [0.231475, 1.537050], rtol=1e-5)
  np.testing.assert_allclose(
      weights, numeric_gradient(stch_objective(0.5, np.array([1.0, 2.0]), 0.0),
                                [1.0, 0.8]), rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_stch_weights_are_the_objectives_gradient(seed):
  rng = np.random.default_rng(seed)
  losses, p = rng.uniform(0.1, 3.0, 3), rng.uniform(0.2, 2.0, 3)
  tx = mtl.scale_by_stch(0.7, jnp.asarray(p, jnp.float32), num_tasks=3)
  weights, _ = weights_of(tx, losses)
  objective = stch_objective(0.7, np.asarray(p, np.float32).astype(np.float64), 0.0)
  np.testing.assert_allclose(weights, numeric_gradient(objective, np.float32(losses)),
                             rtol=2e-5, atol=1e-7)


def test_stch_warmup_tracks_then_freezes_the_ideal_point():
  p = np.array([1.0, 0.5])
  tx = mtl.scale_by_stch(1.0, jnp.asarray(p), warmup_steps=2, num_tasks=2)
  weights, state = weights_of(tx, [2.0, 3.0])
  np.testing.assert_array_equal(weights, p)  # the preference-weighted sum
  weights, state = weights_of(tx, [1.0, 4.0], state)
  np.testing.assert_array_equal(weights, p)
  np.testing.assert_array_equal(state.ideal_point, [1.0, 3.0])
  assert int(state.count) == 2
  weights, state = weights_of(tx, [1.5, 3.5], state)
  expected = numeric_gradient(stch_objective(1.0, p, np.array([1.0, 3.0])), [1.5, 3.5])
  np.testing.assert_allclose(weights, expected, rtol=1e-5)
  _, state = weights_of(tx, [0.5, 1.0], state)
  np.testing.assert_array_equal(state.ideal_point, [1.0, 3.0])
  assert int(state.count) == 2


def test_stch_is_finite_at_extreme_scales():
  tx = mtl.scale_by_stch(1e-30, num_tasks=3)
  weights, _ = weights_of(tx, [1e29, 2e29, 0.0])
  np.testing.assert_array_equal(weights, [0.0, 1.0, 0.0])
  weights, _ = weights_of(mtl.scale_by_stch(1e30, num_tasks=2), [1e-30, 1.0])
  np.testing.assert_allclose(weights, [0.5, 0.5])


def test_stch_traced_mu_with_inject_hyperparams():
  tx = optax.inject_hyperparams(mtl.scale_by_stch, static_args=("num_tasks",))(
      mu=0.5, preference=jnp.array([1.0, 2.0]), num_tasks=2)
  out, _ = jax.jit(tx.update)(jnp.ones((2, 1)), tx.init(None),
                              losses=jnp.array([1.0, 0.8]))
  np.testing.assert_allclose(out[:, 0], [0.231475, 1.537050], rtol=1e-5)


def test_stch_hyperparameter_errors():
  for bad in (0.0, -1.0, float("inf")):
    with pytest.raises(ValueError, match="mu must be finite and > 0"):
      mtl.scale_by_stch(bad, num_tasks=2)
  for bad in (-1, 1.5):
    with pytest.raises(ValueError, match="warmup_steps must be an integer >= 0"):
      mtl.scale_by_stch(warmup_steps=bad, num_tasks=2)
  with pytest.raises(TypeError, match="num_tasks must be a positive Python int"):
    mtl.scale_by_stch(num_tasks=None)


def pbi_objective(theta, p):
  r = p / np.linalg.norm(p)
  def g(losses):
    d1 = losses @ r
    return d1 + theta * np.linalg.norm(losses - d1 * r)
  return g


def test_pbi_hand_worked_weights():
  # theta = 2, r = (1, 1) / sqrt 2, L = (3, 1): d1 = 2 sqrt 2, L - d1 r =
  # (1, -1), d2 = sqrt 2, so d = r + 2 (1, -1) / sqrt 2 = (3, -1) / sqrt 2.
  weights, _ = weights_of(mtl.scale_by_pbi(2.0), [3.0, 1.0])
  np.testing.assert_allclose(weights, [3 / np.sqrt(2), -1 / np.sqrt(2)], rtol=1e-6)
  np.testing.assert_allclose(
      weights, numeric_gradient(pbi_objective(2.0, np.ones(2)), [3.0, 1.0]), rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_pbi_weights_are_the_objectives_gradient(seed):
  rng = np.random.default_rng(seed)
  losses, p = rng.uniform(0.1, 3.0, 3), rng.uniform(0.2, 2.0, 3)
  tx = mtl.scale_by_pbi(5.0, jnp.asarray(p, jnp.float32))
  weights, _ = weights_of(tx, losses)
  objective = pbi_objective(5.0, np.asarray(p, np.float32).astype(np.float64))
  np.testing.assert_allclose(weights, numeric_gradient(objective, np.float32(losses)),
                             rtol=2e-5, atol=1e-5)


def test_pbi_on_the_ray_the_derivative_of_d2_is_zero():
  p = np.array([1.0, 2.0])
  r = p / np.linalg.norm(p)
  tx = mtl.scale_by_pbi(5.0, jnp.asarray(p))
  for losses in ([0.5, 1.0], [0.0, 0.0], [3e29, 6e29]):
    weights, _ = weights_of(tx, losses)
    np.testing.assert_allclose(weights, r, rtol=1e-6)
  weights, _ = weights_of(mtl.scale_by_pbi(5.0), [7.0])
  np.testing.assert_array_equal(weights, [1.0])


def test_pbi_hyperparameter_errors():
  with pytest.raises(ValueError, match="theta must be finite and >= 0"):
    mtl.scale_by_pbi(-1.0)
  with pytest.raises(ValueError, match="num_tasks=3 but preference has 2"):
    mtl.scale_by_pbi(preference=jnp.array([1.0, 1.0]), num_tasks=3)
  tx = mtl.scale_by_pbi(preference=jnp.array([1.0, 1.0]))
  with pytest.raises(ValueError, match=r"built for 2 tasks \(len\(preference\)\)"):
    weights_of(tx, [1.0, 2.0, 3.0])


@pytest.mark.parametrize("factory", [
    lambda p: mtl.scale_by_stch(preference=p, num_tasks=2),
    lambda p: mtl.scale_by_pbi(preference=p, num_tasks=2),
    lambda p: mtl.scale_by_cosmos(preference=p, num_tasks=2)],
    ids=["stch", "pbi", "cosmos"])
def test_preference_validation(factory):
  with pytest.raises(ValueError, match="preference must be finite and >= 0"):
    factory(jnp.array([1.0, -0.5]))
  with pytest.raises(ValueError, match="preference must have a positive entry"):
    factory(jnp.zeros(2))
  with pytest.raises(ValueError, match="preference must be a non-empty vector"):
    factory(jnp.ones((2, 1)))
  with pytest.raises(ValueError, match="num_tasks=2 but preference has 3"):
    factory(jnp.ones(3))


def cosmos_objective(lam, r):
  def g(losses):
    cosine = r @ losses / (np.linalg.norm(r) * np.linalg.norm(losses))
    return r @ losses - lam * cosine
  return g


def test_cosmos_hand_worked_weights():
  # r = (1/2, 1/2), lam = 1, L = (1, 3): cos = 4 / (sqrt(1/2) sqrt 10) =
  # 0.894427; d = r - (r_hat - cos L_hat) / ||L|| = (0.365836, 0.544721).
  tx = mtl.scale_by_cosmos(1.0, jnp.array([0.5, 0.5]), num_tasks=2)
  weights, _ = weights_of(tx, [1.0, 3.0])
  np.testing.assert_allclose(weights, [0.365836, 0.544721], rtol=1e-5)
  np.testing.assert_allclose(
      weights, numeric_gradient(cosmos_objective(1.0, np.array([0.5, 0.5])),
                                [1.0, 3.0]), rtol=1e-5)


def test_cosmos_draws_the_next_preference_ahead():
  tx = mtl.scale_by_cosmos(2.0, alpha=1.2, seed=3, num_tasks=3)
  state = tx.init(None)
  losses = np.array([0.5, 1.5, 1.0])
  seen = []
  for _ in range(3):
    r = np.asarray(optax.tree.get(state, "preference"), np.float64)
    assert np.all(r >= 0) and abs(r.sum() - 1) < 1e-6
    weights, state = weights_of(tx, losses, state)
    # The update applied the preference read before it.
    objective = cosmos_objective(2.0, np.asarray(r, np.float32).astype(np.float64))
    np.testing.assert_allclose(weights, numeric_gradient(objective, losses),
                               rtol=2e-5, atol=1e-6)
    seen.append(r)
  assert not np.allclose(seen[0], seen[1])
  again = tx.init(None)
  np.testing.assert_array_equal(again.preference, seen[0])


def test_cosmos_is_finite_at_zero_losses():
  tx = mtl.scale_by_cosmos(1.0, jnp.array([0.2, 0.8]), num_tasks=2)
  weights, state = weights_of(tx, [0.0, 0.0])
  np.testing.assert_allclose(weights, [0.2, 0.8], rtol=1e-6)
  np.testing.assert_allclose(state.preference, [0.2, 0.8])
  direct = cosmos_lib.cosmos_weights(jnp.array([1e-20, 0.0]), jnp.array([0.5, 0.5]), 1.0)
  assert np.all(np.isfinite(direct))


def test_cosmos_hyperparameter_errors():
  with pytest.raises(ValueError, match="lam must be finite and >= 0"):
    mtl.scale_by_cosmos(-1.0, num_tasks=2)
  with pytest.raises(ValueError, match="alpha must be finite and > 0"):
    mtl.scale_by_cosmos(alpha=0.0, num_tasks=2)
  with pytest.raises(TypeError, match="seed must be an integer"):
    mtl.scale_by_cosmos(seed="0", num_tasks=2)


# --- the one-backward path ------------------------------------------------------


def _loss_fn(params, x, y):
  pred = jnp.tanh(x @ params["w1"]) @ params["w2"]
  return jnp.mean((pred - y) ** 2, axis=0) * jnp.array([1.0, 4.0, 0.3]) + 0.05


@pytest.mark.parametrize("make", [
    lambda: mtl.scale_by_stch(0.5, warmup_steps=1, num_tasks=3),
    lambda: mtl.scale_by_pbi(3.0),
    lambda: mtl.scale_by_cosmos(1.0, seed=2, num_tasks=3)],
    ids=["stch", "pbi", "cosmos"])
def test_one_backward_matches_per_task_gradients(make):
  tx = make()
  # The shapes of test_loss_one_backward.py, whose compiled kernels it reuses.
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  params = {"w1": 0.5 * jax.random.normal(k1, (4, 8)),
            "w2": 0.5 * jax.random.normal(k2, (8, 3))}
  x, y = jax.random.normal(k3, (16, 4)), jax.random.normal(k4, (16, 3))
  stacked = optax.chain(tx, mtl.sum())
  one = mtl.value_and_weighted_grad(_loss_fn, mtl.chain(tx, mtl.sum()))
  states_a = states_b = stacked.init(params)
  for _ in range(2):
    losses, task_grads = mtl.value_and_jacobian(_loss_fn)(params, x, y)
    reference, states_a = stacked.update(task_grads, states_a, params, losses=losses)
    _, grads, states_b = one(states_b, params, x, y)
    for a, b in zip(jax.tree.leaves((reference, states_a)),
                    jax.tree.leaves((grads, states_b))):
      np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                 rtol=1e-5, atol=1e-6)
