"""Nash-MTL and FairGrad: the system G w = w^(-1/alpha), its closed forms, the cap."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl as mtl
from optax_mtl._src.solvers import positive_system


def _solve(rows, alpha=1.0, max_iters=50):
  """The solver on the Gramian of ``rows``, weights as float64."""
  rows = np.asarray(rows, np.float64)
  gram = rows @ rows.T
  top = np.max(np.diag(gram))
  scale = np.sqrt(top)
  normalized = gram / top if top > 0 else gram
  solution = positive_system.solve(jnp.asarray(normalized, jnp.float32),
                                   jnp.float32(scale), alpha, max_iters)
  return np.asarray(solution.weights, np.float64), solution


def _residual(rows, weights, alpha):
  rows = np.asarray(rows, np.float64)
  gram = rows @ rows.T
  return np.max(np.abs((gram @ weights) * weights ** (1.0 / alpha) - 1.0))


def _update(tx, rows, state=None):
  state = tx.init(None) if state is None else state
  out, state = tx.update({"g": jnp.asarray(rows, jnp.float32)}, state)
  return np.asarray(out["g"], np.float64), state


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("num_tasks", [2, 3, 6])
def test_defining_equation_on_random_gramians(alpha, num_tasks):
  rng = np.random.default_rng(num_tasks)
  for _ in range(3):
    rows = rng.normal(size=(num_tasks, 2 * num_tasks + 3))
    rows = rows * np.exp(rng.normal(size=(num_tasks, 1)))  # unequal scales
    weights, solution = _solve(rows, alpha)
    assert bool(solution.converged) and int(solution.iterations) <= 10
    assert np.all(weights > 0)
    assert _residual(rows, weights, alpha) <= 1e-4
    assert float(solution.residual) <= 1e-4


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_defining_equation_on_rank_deficient_gramians(alpha):
  # Six tasks in three dimensions: G has rank 3 and the Hessian of the
  # potential stays positive definite through its barrier term.
  rng = np.random.default_rng(5)
  rows = rng.normal(size=(6, 3)) + 1.5 * rng.normal(size=3)
  weights, solution = _solve(rows, alpha)
  assert bool(solution.converged)
  assert np.linalg.matrix_rank(rows @ rows.T) == 3
  assert _residual(rows, weights, alpha) <= 1e-3


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_orthogonal_gradients_closed_form(alpha):
  # G = diag(||g_t||^2): w_t = ||g_t||^(-2 alpha / (1 + alpha)).
  rows = np.array([[3.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
  weights, _ = _solve(rows, alpha)
  expected = np.array([3.0, 0.5]) ** (-2.0 * alpha / (1.0 + alpha))
  np.testing.assert_allclose(weights, expected, rtol=1e-5)


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_identical_and_colinear_gradients_closed_form(alpha):
  # g_t = c_t g: G = c c^T ||g||^2, singular. alpha = 1: a_t = 1 / (c_t
  # sqrt(T) ||g||); identical (c = 1): w = (T ||g||^2)^(-alpha / (1 + alpha)).
  g = np.array([1.0, 2.0, 2.0])  # ||g|| = 3
  identical, _ = _solve(np.stack([g, g, g]), alpha)
  np.testing.assert_allclose(identical, (3 * 9.0) ** (-alpha / (1 + alpha)), rtol=1e-5)
  if alpha == 1.0:
    c = np.array([1.0, 4.0, 0.25])
    colinear, _ = _solve(c[:, None] * g, alpha)
    np.testing.assert_allclose(colinear, 1.0 / (c * np.sqrt(3.0) * 3.0), rtol=1e-5)


@pytest.mark.parametrize("cosine", [-0.6, 0.0, 0.5])
def test_two_tasks_nash_closed_form(cosine):
  # a_t = 1 / (||g_t|| sqrt(1 + cos)): a_1 (G a)_1 = (1 + cos) / (1 + cos).
  angle = np.arccos(cosine)
  rows = np.array([[2.0, 0.0], [0.5 * np.cos(angle), 0.5 * np.sin(angle)]])
  weights, _ = _solve(rows, 1.0)
  np.testing.assert_allclose(weights, 1.0 / (np.array([2.0, 0.5]) * np.sqrt(1 + cosine)),
                             rtol=1e-5)


def test_hand_worked_example():
  # g_1 = (1, 0), g_2 = (1, 1): cos = 1/sqrt(2), a_1 = 1/sqrt(1 + 1/sqrt(2))
  # = 0.765367, a_2 = a_1 / sqrt(2) = 0.541196; u = (1.306563, 0.541196),
  # <u, g_1> = 1.306563 = 1 / a_1, ||u||^2 = 2.
  tx = mtl.nash_mtl(max_norm=0.0, num_tasks=2)
  update, state = _update(tx, [[1.0, 0.0], [1.0, 1.0]])
  np.testing.assert_allclose(state.task_weights, [0.765367, 0.541196], rtol=1e-5)
  np.testing.assert_allclose(update, [1.306563, 0.541196], rtol=1e-5)
  assert bool(state.converged) and float(state.residual) <= 1e-5
  # The cap: ||u|| = sqrt(2) becomes 1.
  capped, _ = _update(mtl.nash_mtl(num_tasks=2), [[1.0, 0.0], [1.0, 1.0]])
  np.testing.assert_allclose(capped, update / np.sqrt(2.0), rtol=1e-5)


def test_fairgrad_alpha_one_is_nash_without_cap():
  rows = np.random.default_rng(0).normal(size=(3, 5))
  nash, _ = _update(mtl.nash_mtl(max_norm=0.0, num_tasks=3), rows)
  fair, state = _update(mtl.fairgrad(num_tasks=3), rows)
  np.testing.assert_allclose(fair, nash, rtol=1e-5)
  assert bool(state.converged)


@pytest.mark.parametrize("max_norm", [0.0, 0.5, 1.0, 10.0])
def test_max_norm_caps_the_update(max_norm):
  # An exact solution has ||u||^2 = a^T G a = sum_t a_t (G a)_t = T.
  rows = np.random.default_rng(1).normal(size=(3, 5))
  update, state = _update(mtl.nash_mtl(max_norm=max_norm, num_tasks=3), rows)
  expected = np.sqrt(3.0) if max_norm == 0 else min(np.sqrt(3.0), max_norm)
  np.testing.assert_allclose(np.linalg.norm(update), expected, rtol=1e-5)
  # The bargaining weights kept in the state are those before the cap.
  raw = np.asarray(state.weights, np.float64) / np.exp(float(state.log_scale))
  np.testing.assert_allclose(np.asarray(state.task_weights) / raw,
                             expected / np.sqrt(3.0), rtol=1e-5)


def test_update_every_reuses_the_weights():
  rng = np.random.default_rng(2)
  tx = mtl.nash_mtl(max_norm=0.0, update_every=3, num_tasks=3)
  state = tx.init(None)
  steps = [rng.normal(size=(3, 5)) for _ in range(4)]
  solved = [_update(mtl.nash_mtl(max_norm=0.0, num_tasks=3), g)[1].task_weights
            for g in steps]
  applied = []
  for rows in steps:
    update, state = _update(tx, rows, state)
    applied.append(np.asarray(state.task_weights))
    np.testing.assert_allclose(update, applied[-1] @ rows, rtol=1e-5, atol=1e-6)
  assert int(state.count) == 1
  np.testing.assert_allclose(applied[0], solved[0], rtol=1e-6)
  np.testing.assert_allclose(applied[1], solved[0], rtol=1e-6)  # reused
  np.testing.assert_allclose(applied[2], solved[0], rtol=1e-6)  # reused
  np.testing.assert_allclose(applied[3], solved[3], rtol=1e-6)  # solved again
  assert not np.allclose(solved[1], solved[0], rtol=1e-2)


def test_reused_weights_are_capped_on_the_current_gradients():
  tx = mtl.nash_mtl(max_norm=1.0, update_every=2, num_tasks=2)
  rows = np.array([[2.0, 0.0], [0.0, 4.0]])
  first, state = _update(tx, rows)
  second, state = _update(tx, 3.0 * rows, state)
  np.testing.assert_allclose(np.linalg.norm(first), 1.0, rtol=1e-5)
  np.testing.assert_allclose(second, first, rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_no_solution_is_reported_not_replaced_by_equal_weights(alpha):
  # Opposite gradients, and a third task closing the hull: 0 is a convex
  # combination of the gradients, so no u has <u, g_t> > 0 for every t.
  g, h = np.array([1.0, 2.0, -1.0, 0.0, 3.0]), np.array([0.5, -1.0, 2.0, 1.0, 0.0])
  for rows in (np.stack([g, -g]), np.stack([g, h, -(g + 2.0 * h)])):
    weights, solution = _solve(rows, alpha)
    assert not bool(solution.converged)
    assert float(solution.residual) >= 0.99
    np.testing.assert_array_equal(weights, 0.0)
  update, state = _update(mtl.nash_mtl(num_tasks=2), np.stack([g, -g]))
  assert not bool(state.converged) and float(state.residual) >= 0.99
  np.testing.assert_array_equal(update, 0.0)
  _, state = _update(mtl.fairgrad(alpha), np.stack([g, -g]))
  assert not bool(state.converged)


def test_zero_gradient_task_gets_weight_zero():
  rng = np.random.default_rng(3)
  rows = rng.normal(size=(2, 5))
  with_zero = np.concatenate([rows[:1], np.zeros((1, 5)), rows[1:]])
  weights, solution = _solve(with_zero)
  others, _ = _solve(rows)
  assert bool(solution.converged)
  np.testing.assert_allclose(weights, [others[0], 0.0, others[1]], rtol=1e-5)
  zeros, solution = _solve(np.zeros((2, 3)))
  np.testing.assert_array_equal(zeros, 0.0)
  assert bool(solution.converged)


def test_non_finite_gramian_gives_zero_weights():
  solution = positive_system.solve(jnp.array([[1.0, jnp.nan], [jnp.nan, 1.0]]),
                                   jnp.float32(1.0))
  np.testing.assert_array_equal(solution.weights, 0.0)
  assert not bool(solution.converged)
  assert np.isfinite(float(solution.residual))


@pytest.mark.parametrize("scale", [1e-20, 1e20])
def test_tiny_and_huge_gradients(scale):
  rows = np.random.default_rng(4).normal(size=(3, 5))
  base, _ = _update(mtl.nash_mtl(num_tasks=3), rows)
  scaled, state = _update(mtl.nash_mtl(num_tasks=3), scale * rows)
  tol = {"rtol": 1e-5, "atol": 1e-5 * np.linalg.norm(base)}
  np.testing.assert_allclose(scaled, base, **tol)
  assert bool(state.converged)
  # Tasks 1e12 apart in scale: the update is that of the unit-scale tasks.
  mixed, _ = _update(mtl.nash_mtl(num_tasks=3),
                     np.array([1e-6, 1.0, 1e6])[:, None] * rows)
  np.testing.assert_allclose(mixed, base, **tol)
  # FairGrad's update scales as c^((1 - alpha) / (1 + alpha)): c^(-1/3).
  fair, _ = _update(mtl.fairgrad(2.0), rows)
  fair_scaled, state = _update(mtl.fairgrad(2.0), scale * rows)
  np.testing.assert_allclose(fair_scaled, fair * scale ** (-1.0 / 3.0), rtol=1e-4)
  assert bool(state.converged)


def test_fairgrad_alpha_limits():
  rows = np.random.default_rng(6).normal(size=(3, 5)) + 0.5
  gains = lambda alpha: rows @ _update(mtl.fairgrad(alpha), rows)[0]
  # alpha -> 0: w_t = (G w)_t^(-alpha) -> 1, the sum of the gradients.
  small, _ = _solve(rows, 0.01)
  np.testing.assert_allclose(small, 1.0, atol=0.05)
  # alpha -> infinity: max-min fairness, the gains <u, g_t> equalise.
  spread = lambda g: np.max(g) / np.min(g)
  assert spread(gains(50.0)) < 1.1 < spread(gains(1.0))


def test_claims():
  assert mtl.nash_mtl(num_tasks=2).claims == {
      "permutation_equivariant", "task_scale_invariant", "non_conflicting"}
  assert "non_conflicting" not in mtl.nash_mtl(update_every=2, num_tasks=2).claims
  assert "task_scale_invariant" in mtl.fairgrad().claims
  assert mtl.fairgrad(2.0).claims == {"permutation_equivariant", "non_conflicting"}
  # alpha != 1 is not task-scale invariant.
  rows = np.random.default_rng(7).normal(size=(2, 5))
  factors = np.array([[1.0], [10.0]])
  a, _ = _update(mtl.fairgrad(2.0), rows)
  b, _ = _update(mtl.fairgrad(2.0), factors * rows)
  assert not np.allclose(a, b, rtol=1e-2)


def test_inject_hyperparams():
  rows = jnp.asarray(np.random.default_rng(8).normal(size=(2, 5)), jnp.float32)
  fair = optax.inject_hyperparams(mtl.fairgrad)(alpha=2.0)
  out, state = fair.update({"g": rows}, fair.init(None))
  np.testing.assert_allclose(out["g"], _update(mtl.fairgrad(2.0), rows)[0], rtol=1e-5)
  assert bool(state.inner_state.converged)
  # A traced alpha builds the method (no claim depends on it then).
  traced = jax.eval_shape(lambda a: mtl.fairgrad(a).update({"g": rows}, mtl.fairgrad(a).init(None))[0],
                          jnp.float32(2.0))
  assert traced["g"].shape == (5,)
  nash = optax.inject_hyperparams(mtl.nash_mtl, static_args=("num_tasks",))(
      max_norm=0.5, num_tasks=2)
  out, _ = nash.update({"g": rows}, nash.init(None))
  np.testing.assert_allclose(np.linalg.norm(out["g"]), 0.5, rtol=1e-5)


def test_hyperparameter_errors():
  with pytest.raises(TypeError, match="num_tasks"):
    mtl.nash_mtl()
  with pytest.raises(TypeError, match="num_tasks must be a positive Python int"):
    mtl.nash_mtl(num_tasks=2.0)
  with pytest.raises(ValueError, match="num_tasks must be a positive int"):
    mtl.nash_mtl(num_tasks=0)
  with pytest.raises(ValueError, match="max_norm must be finite and >= 0"):
    mtl.nash_mtl(-1.0, num_tasks=2)
  with pytest.raises(ValueError, match="update_every must be an integer >= 1"):
    mtl.nash_mtl(update_every=0, num_tasks=2)
  with pytest.raises(ValueError, match="optim_iters must be an integer >= 1"):
    mtl.nash_mtl(optim_iters=2.5, num_tasks=2)
  for alpha in (0.0, -1.0, float("inf")):
    with pytest.raises(ValueError, match="alpha must be finite and > 0"):
      mtl.fairgrad(alpha)
  with pytest.raises(ValueError, match="alpha must be a scalar"):
    mtl.fairgrad(jnp.ones(2))
