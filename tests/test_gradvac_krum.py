"""GradVac (Algorithm 1 in parameter space, targets, PCGrad limit) and Krum."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl as mtl
from optax_mtl._src.methods.gradient import gradvac as gradvac_lib
from optax_mtl._src.methods.gradient import krum as krum_lib


def _update(tx, grads, state=None):
  state = tx.init(None) if state is None else state
  out, state = tx.update({"w": jnp.asarray(grads, jnp.float32)}, state)
  return np.asarray(out["w"], np.float64), state


# --- GradVac -------------------------------------------------------------------


def _gradvac_reference(grads, targets, orders, beta):
  """Algorithm 1 of Wang et al. on explicit vectors (float64)."""
  grads = np.asarray(grads, np.float64)
  targets = np.array(targets, np.float64)
  out = []
  for i, order in enumerate(orders):
    g = grads[i].copy()
    for j in order:
      if j == i:
        continue
      phi = g @ grads[j] / (np.linalg.norm(g) * np.linalg.norm(grads[j]))
      goal = targets[i, j]
      if phi < goal:
        g = g + (np.linalg.norm(g) * (goal * np.sqrt(1 - phi ** 2)
                                      - phi * np.sqrt(1 - goal ** 2))
                 / (np.linalg.norm(grads[j]) * np.sqrt(1 - goal ** 2))) * grads[j]
      targets[i, j] = (1 - beta) * targets[i, j] + beta * phi
    out.append(g)
  return np.sum(out, axis=0), targets


def _orders(key_data, num):
  """The visiting orders of one update, derived from the state's key as the rule does."""
  _, step_key = jax.random.split(jax.random.wrap_key_data(key_data))
  keys = jax.random.split(step_key, num)
  return np.stack([np.asarray(jax.random.permutation(k, num)) for k in keys])


def test_gradvac_coefficients_match_algorithm_1_over_steps():
  rng = np.random.default_rng(1)
  num, beta = 5, 0.25
  targets = rng.uniform(-0.5, 0.9, size=(num, num))
  np.fill_diagonal(targets, 0.0)
  state = jnp.asarray(targets, jnp.float32)
  for _ in range(3):
    grads = rng.normal(size=(num, 7)) + 0.3 * rng.normal(size=7)
    orders = np.stack([rng.permutation(num) for _ in range(num)])
    coeffs, state = gradvac_lib.vaccine_coefficients(
        jnp.asarray(grads @ grads.T, jnp.float32), state, jnp.asarray(orders), beta)
    expected, targets = _gradvac_reference(grads, targets, orders, beta)
    np.testing.assert_allclose(np.asarray(coeffs, np.float64).sum(0) @ grads,
                               expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state, targets, rtol=1e-4, atol=1e-6)


def test_gradvac_update_and_targets_follow_the_state_key():
  rng = np.random.default_rng(0)
  num, beta = 3, 0.3
  tx = mtl.gradvac(beta=beta, seed=5, num_tasks=num)
  state = tx.init(None)
  targets = np.zeros((num, num))
  for _ in range(3):
    grads = rng.normal(size=(num, 4)) + 0.5 * rng.normal(size=4)
    orders = _orders(state.key, num)
    expected, targets = _gradvac_reference(grads, targets, orders, beta)
    update, state = _update(tx, grads, state)
    np.testing.assert_allclose(update, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state.targets, targets, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.task_weights) @ grads, expected,
                               rtol=1e-4, atol=1e-5)
  # The targets are EMAs of the cosines seen; the diagonal is untouched.
  assert np.all(np.diagonal(np.asarray(state.targets)) == 0)
  assert np.count_nonzero(np.asarray(state.targets)) == num * (num - 1)


def test_gradvac_correction_reaches_the_target_cosine():
  # g1 = [1, 0], g2 = [1, 1]: cos = 0.7071 < target 0.9, so g1 gets
  # ||g1|| (0.9 * 0.7071 - 0.7071 * 0.4359) / (1.4142 * 0.4359) = 0.5324 g2,
  # and cos(g1', g2) = 0.9 exactly; g2 is above its target 0 and untouched.
  grads = np.array([[1.0, 0.0], [1.0, 1.0]])
  coeffs, targets = gradvac_lib.vaccine_coefficients(
      jnp.asarray(grads @ grads.T, jnp.float32), jnp.array([[0.0, 0.9], [0.0, 0.0]]),
      jnp.array([[0, 1], [1, 0]]), 0.0)
  np.testing.assert_allclose(coeffs, [[1.0, 0.532371], [0.0, 1.0]], atol=1e-5)
  corrected = grads[0] + 0.532371 * grads[1]
  cosine = corrected @ grads[1] / (np.linalg.norm(corrected) * np.sqrt(2.0))
  np.testing.assert_allclose(cosine, 0.9, atol=1e-5)
  np.testing.assert_allclose(targets, [[0.0, 0.9], [0.0, 0.0]])  # beta = 0


def test_gradvac_without_ema_is_pcgrad():
  # Target 0: the correction is -<g_i, g_j> / ||g_j||^2 g_j when phi < 0,
  # i.e. PCGrad's projection; the same seed gives the same orders.
  rng = np.random.default_rng(3)
  vaccine = mtl.gradvac(beta=0.0, seed=3, num_tasks=3)
  surgery = mtl.pcgrad(seed=3)
  s1, s2 = vaccine.init(None), surgery.init(None)
  for _ in range(3):
    grads = rng.normal(size=(3, 4))
    u1, s1 = _update(vaccine, grads, s1)
    u2, s2 = _update(surgery, grads, s2)
    np.testing.assert_allclose(u1, u2, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(s1.targets, 0.0)


@pytest.mark.parametrize("grads", [
    [[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]],      # identical: targets reach 1
    [[1.0, -2.0], [-1.0, 2.0], [0.5, -1.0]],   # opposite
    [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]],      # a zero gradient
])
def test_gradvac_degenerate_gradients_stay_finite(grads):
  tx = mtl.gradvac(beta=1.0, num_tasks=3)
  state = tx.init(None)
  for _ in range(3):
    update, state = _update(tx, grads, state)
    assert np.all(np.isfinite(update)) and np.all(np.isfinite(state.targets))
  if np.all(np.asarray(grads) == grads[0]):
    np.testing.assert_allclose(update, 3.0 * np.asarray(grads[0]), rtol=1e-5)
  if not np.any(grads[0]):
    # No cosine with a zero gradient: its pairs keep the initial target.
    np.testing.assert_array_equal(np.asarray(state.targets)[0], 0.0)
    np.testing.assert_array_equal(np.asarray(state.targets)[:, 0], 0.0)


def test_gradvac_errors():
  with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
    mtl.gradvac(beta=1.5, num_tasks=2)
  with pytest.raises(TypeError, match="seed must be an integer"):
    mtl.gradvac(seed=0.5, num_tasks=2)
  with pytest.raises(ValueError, match="num_tasks must be a positive int"):
    mtl.gradvac(num_tasks=0)


# --- Krum ------------------------------------------------------------------------


def _krum_reference(grads, f, m):
  grads = np.asarray(grads, np.float64)
  num = len(grads)
  dist = ((grads[:, None] - grads[None]) ** 2).sum(-1)
  scores = [np.sort(np.delete(dist[i], i))[:num - f - 2].sum() for i in range(num)]
  chosen = np.argsort(scores, kind="stable")[:m]
  return grads[chosen].mean(0), chosen


def _cluster_with_outliers(num_honest, num_outliers, seed):
  rng = np.random.default_rng(seed)
  honest = np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=(num_honest, 3))
  outliers = 100.0 * rng.normal(size=(num_outliers, 3))
  return np.concatenate([outliers, honest])  # outliers first: no index luck


def _krum_weights(grads, f, m=1):
  grads = np.asarray(grads, np.float64)
  return np.asarray(krum_lib.krum_weights(jnp.asarray(grads @ grads.T, jnp.float32),
                                          f, m), np.float64)


@pytest.mark.parametrize("f", [1, 2])
def test_krum_selects_an_honest_gradient(f):
  num = 2 * f + 3
  grads = _cluster_with_outliers(num - f, f, seed=f)
  weights = _krum_weights(grads, f)
  expected, chosen = _krum_reference(grads, f, 1)
  np.testing.assert_allclose(weights @ grads, expected, rtol=1e-5)
  assert chosen[0] >= f
  np.testing.assert_array_equal(weights[:f], 0.0)
  assert weights.sum() == 1.0 and np.count_nonzero(weights) == 1


def test_krum_update_through_the_transformation():
  grads = _cluster_with_outliers(4, 1, seed=1)
  update, state = _update(mtl.krum(1, num_tasks=5), grads)
  np.testing.assert_allclose(update, _krum_reference(grads, 1, 1)[0], rtol=1e-5)
  np.testing.assert_allclose(state.task_weights, _krum_weights(grads, 1))


def test_multi_krum_averages_the_best_scores():
  f, m = 2, 4
  grads = _cluster_with_outliers(6, f, seed=4)
  expected, chosen = _krum_reference(grads, f, m)
  weights = _krum_weights(grads, f, m)
  np.testing.assert_allclose(weights @ grads, expected, rtol=1e-5)
  assert set(chosen) <= set(range(f, 8))
  reference = np.zeros(8)
  reference[chosen] = 0.25
  np.testing.assert_allclose(weights, reference)


def test_krum_hand_worked_scores():
  # Points 0, 1, 3, 10 on a line, f = 0, 2 neighbours each: scores
  # 0: 1 + 9 = 10; 1: 1 + 4 = 5; 3: 4 + 9 = 13; 10: 49 + 81 = 130.
  grads = np.array([[0.0], [1.0], [3.0], [10.0]])
  np.testing.assert_allclose(_krum_weights(grads, 0), [0.0, 1.0, 0.0, 0.0])
  np.testing.assert_allclose(_krum_weights(grads, 0, 2), [0.5, 0.5, 0.0, 0.0])
  np.testing.assert_allclose(_krum_weights(grads, 0, 3), [1 / 3, 1 / 3, 1 / 3, 0.0],
                             rtol=1e-6)


def test_krum_ties_go_to_the_lowest_index():
  grads = np.array([[1.0, 2.0]] * 4)
  np.testing.assert_array_equal(_krum_weights(grads, 0, 2), [0.5, 0.5, 0.0, 0.0])


def test_krum_with_injected_hyperparameters():
  grads = jnp.asarray(_cluster_with_outliers(4, 1, seed=6), jnp.float32)
  tx = optax.inject_hyperparams(mtl.krum)(num_byzantine=1, num_selected=2)
  out, _ = jax.jit(tx.update)({"w": grads}, tx.init(None))
  np.testing.assert_allclose(out["w"], _krum_reference(grads, 1, 2)[0], rtol=1e-5)


def test_krum_errors():
  grads = np.ones((5, 2))
  with pytest.raises(ValueError, match=r"needs at least 2 \* num_byzantine \+ 3 = 7 tasks, got 5; lower num_byzantine to at most 1"):
    _update(mtl.krum(2), grads)
  with pytest.raises(ValueError, match="got 2; Krum needs at least 3 tasks"):
    mtl.krum(0, num_tasks=2)
  with pytest.raises(ValueError, match="num_selected=6 exceeds the number of tasks 5"):
    _update(mtl.krum(0, num_selected=6), grads)
  with pytest.raises(ValueError, match="num_byzantine must be an integer >= 0"):
    mtl.krum(-1)
  with pytest.raises(ValueError, match="num_byzantine must be an integer >= 0"):
    mtl.krum(1.5)
  with pytest.raises(ValueError, match="num_selected must be an integer >= 1"):
    mtl.krum(0, num_selected=0)
