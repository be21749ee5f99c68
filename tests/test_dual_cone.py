"""Dual-cone projections (UPGrad, DualProj) and priority-constrained descent.

The solver against its KKT conditions and a brute-force enumeration of
active sets; the aggregators against the two-task closed forms, the
non-conflict guarantee on nearly opposite gradients, and PCD's constraints,
fallbacks and moving average. The compiled T x T functions are shared
between tests (few distinct T) to keep compilation short.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl as mtl
from optax_mtl._src.methods.gradient import pcd as pcd_lib
from optax_mtl._src.methods.gradient import upgrad as upgrad_lib


_DIM = 6


def _update(tx, grads, state=None):
  """One update; gradients zero-padded to _DIM entries (fewer eager compiles)."""
  grads = np.asarray(grads, np.float32)
  padded = np.pad(grads, ((0, 0), (0, _DIM - grads.shape[1])))
  state = tx.init(None) if state is None else state
  out, state = tx.update({"w": jnp.asarray(padded)}, state)
  return np.asarray(out["w"], np.float64)[:grads.shape[1]], state


def _brute_force(matrix, linear, free):
  """min 1/2 x'Ax - c'x over x >= 0 (x = 0 off ``free``), every active set."""
  num = len(linear)
  scale = max(1.0, np.abs(linear).max())
  best = None
  indices = [i for i in range(num) if free[i]]
  for size in range(len(indices) + 1):
    for subset in itertools.combinations(indices, size):
      x = np.zeros(num)
      if subset:
        s = list(subset)
        x[s] = np.linalg.lstsq(matrix[np.ix_(s, s)], linear[s], rcond=None)[0]
      y = matrix @ x - linear
      if np.all(x >= -1e-9 * scale) and np.all(y[free] >= -1e-9 * scale):
        value = 0.5 * x @ matrix @ x - linear @ x
        if best is None or value < best[0] - 1e-12:
          best = (value, x)
  return best


def _jacobian(rng, num_tasks, dim, kind):
  jac = rng.normal(size=(num_tasks, dim)) + rng.uniform(0, 1) * rng.normal(size=dim)
  if kind == "colinear":
    jac[-1] = -2.5 * jac[0]
    jac[1] = 0.5 * jac[0]
  elif kind == "low_rank":
    jac = rng.normal(size=(num_tasks, 2)) @ rng.normal(size=(2, dim))
  elif kind == "zero_row":
    jac[1] = 0.0
  return jac


# --- the solver ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["random", "colinear", "low_rank", "zero_row"])
def test_solver_kkt_and_brute_force(kind):
  # Row i of the projections solves min 1/2 x'Gx + (G e_i)'x over x >= 0.
  rng = np.random.default_rng(0)
  for trial in range(6):
    num = 3 + trial % 2
    jac = _jacobian(rng, num, 6, kind)
    gram = jac @ jac.T
    top = gram.diagonal().max()
    coefficients, residuals = upgrad_lib.projection_coefficients(
        jnp.asarray(gram / top, jnp.float32))
    for i in range(num):
      v = np.asarray(coefficients[i], np.float64)
      x = v - np.eye(num)[i]
      y = gram @ v
      if not np.any(v):  # a projection below float32's resolution: zero
        assert v @ gram @ v <= 1e-5 * top
        continue
      scale = top * max(1.0, x.sum())
      assert np.all(x >= 0)                                  # dual feasibility
      assert np.all(y >= -1e-6 * scale)                      # primal feasibility
      assert np.all(np.abs(x * y) <= 2e-5 * scale * (1 + x))  # complementarity
      value, reference = _brute_force(gram, -gram[i], np.ones(num, bool))
      # Stationarity: G x is unique over the solution set (x need not be).
      np.testing.assert_allclose(gram @ x, gram @ reference, atol=1e-4 * scale)
      assert 0.5 * x @ gram @ x + gram[i] @ x <= value + 1e-5 * scale
    # Nearly opposite dependent gradients (random rank 2 gives them) are at
    # float32's resolution; the residual then says so.
    assert np.max(residuals) <= (1e-5 if kind == "random" else 1e-3)


def test_solver_fixed_coordinates_and_offsets():
  # PCD's problem: x_0 fixed, constraints (G v)_j >= tau_j G_jj.
  rng = np.random.default_rng(1)
  for trial in range(8):
    jac = rng.normal(size=(3, 5))
    gram = jac @ jac.T
    tau = rng.uniform(0.0, 0.5, 2)
    offsets = np.concatenate([[0.0], tau * gram.diagonal()[1:]])
    v, residual = pcd_lib.constrained_direction(jnp.asarray(gram, jnp.float32), tau)
    v = np.asarray(v, np.float64)
    assert v[0] == 1.0 and np.all(v[1:] >= 0)
    assert np.all((gram @ v - offsets)[1:] >= -1e-5 * gram.diagonal().max())
    _, x = _brute_force(gram, offsets - gram[:, 0], np.array([False, True, True]))
    np.testing.assert_allclose(gram @ v, gram @ (np.eye(3)[0] + x),
                               atol=1e-4 * np.abs(gram).max())
    assert float(residual) <= 1e-5


def test_solver_reports_infeasible_constraints():
  # <g_1, d> >= 0.02 and <-g_1, d> >= 0.02 cannot hold together.
  gram = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, -1.0], [0.0, -1.0, 1.0]])
  v, residual = pcd_lib.constrained_direction(gram, jnp.array([0.02, 0.02]))
  assert float(residual) > 0.1 and np.all(np.isfinite(v))


@pytest.mark.parametrize("num, dim", [(4, 1), (4, 2), (64, 3)])
def test_solver_degenerate_gramians_stay_finite_and_feasible(num, dim):
  rng = np.random.default_rng(num + dim)
  jac = rng.normal(size=(num, dim)).astype(np.float32)
  gram = jac @ jac.T
  coefficients, residuals = upgrad_lib.projection_coefficients(gram / gram.max())
  coefficients = np.asarray(coefficients, np.float64)
  assert np.all(np.isfinite(coefficients)) and np.all(np.asarray(residuals) <= 1e-3)
  jac64 = jac.astype(np.float64)
  dots = (coefficients @ jac64) @ jac64.T
  norms = np.linalg.norm(jac64, axis=1)
  assert np.all(dots >= -1e-5 * norms[None, :] * norms.max())
  # Zero and identical gradients: every projection is the gradient itself.
  for matrix, expected in ((np.zeros((num, num)), np.eye(num)),
                           (np.ones((num, num)), np.eye(num))):
    coefficients, _ = upgrad_lib.projection_coefficients(jnp.asarray(matrix, jnp.float32))
    np.testing.assert_allclose(np.asarray(coefficients),
                               expected if matrix.any() else 0.0, atol=1e-6)


# --- UPGrad and DualProj -------------------------------------------------------


def test_two_conflicting_tasks_closed_form():
  g1, g2 = np.array([1.0, 0.0]), np.array([-2.0, 1.0])
  dot = g1 @ g2  # -2: they conflict
  # The dual cone of {g1, g2} is a wedge; each gradient lands on the other's
  # face: pi(g1) = g1 - <g1, g2> / |g2|^2 g2 = (0.2, 0.4), pi(g2) = (0, 1).
  p1 = g1 - dot / (g2 @ g2) * g2
  p2 = g2 - dot / (g1 @ g1) * g1
  np.testing.assert_allclose([p1, p2], [[0.2, 0.4], [0.0, 1.0]], atol=1e-12)
  update, state = _update(mtl.upgrad(num_tasks=2), [g1, g2])
  np.testing.assert_allclose(update, [0.1, 0.7], rtol=1e-5)
  np.testing.assert_allclose(state.task_weights, [1.5, 0.7], rtol=1e-5)
  # DualProj: the mean (-0.5, 0.5) conflicts with g1 only, so it lands on
  # the face <g1, u> = 0: (0, 0.5), which g2 agrees with.
  update, state = _update(mtl.dualproj(num_tasks=2), [g1, g2])
  np.testing.assert_allclose(update, [0.0, 0.5], atol=3e-6)  # a few ulps inside
  np.testing.assert_allclose(state.task_weights, [1.0, 0.5], rtol=1e-5)
  assert float(state.residual) <= 1e-5


def test_without_conflict_the_mean():
  grads = np.array([[1.0, 0.2, 0.0], [0.3, 1.0, 0.1], [0.5, 0.0, 2.0]])
  assert np.all(grads @ grads.T > 0)
  np.testing.assert_allclose(_update(mtl.upgrad(), grads)[0], grads.mean(0), rtol=1e-5)
  preference = np.array([0.5, 1.0, 2.0])
  np.testing.assert_allclose(_update(mtl.upgrad(preference), grads)[0],
                             preference @ grads, rtol=1e-5)


def test_preference_weights_the_projections():
  rng = np.random.default_rng(3)
  grads = rng.normal(size=(3, 4))
  gram = grads @ grads.T
  coefficients, _ = upgrad_lib.projection_coefficients(jnp.asarray(gram, jnp.float32))
  projections = np.asarray(coefficients, np.float64) @ grads
  preference = np.array([0.2, 0.0, 1.5])
  update, state = _update(mtl.upgrad(preference), grads)
  np.testing.assert_allclose(update, preference @ projections, rtol=1e-4, atol=1e-6)
  assert state.task_weights.shape == (3,) and float(state.residual) <= 1e-5


@pytest.mark.parametrize("delta", [1e-1, 1e-2, 3e-3])
def test_no_conflict_with_nearly_opposite_gradients(delta):
  # The aggregators' rules on the engine's float32 Gramian, combined in
  # float32: cosines with every task >= -1e-6 even when tasks 1 and 3 are
  # at cosine -1 + delta^2 / 2 from task 0 (delta = 3e-3: -0.9999955).
  rng = np.random.default_rng(4)
  preference = jnp.linspace(1.0, 2.0, 4)
  for trial in range(5):
    a = rng.normal(size=_DIM)
    a /= np.linalg.norm(a)
    rows = [a]
    for k in range(3):
      b = rng.normal(size=_DIM)
      b -= (b @ a) * a
      b /= np.linalg.norm(b)
      rows.append(rng.uniform(0.5, 2.0) * (-a + delta * b) if k % 2 == 0
                  else 0.3 * rng.normal(size=_DIM))
    grads = np.stack(rows).astype(np.float32)
    gram = mtl.gramian({"w": jnp.asarray(grads)}).normalized
    coefficients, _ = upgrad_lib.projection_coefficients(gram)
    projected, _ = upgrad_lib.combination_projection(gram, jnp.full((4,), 0.25))
    for weights in (jnp.full((4,), 0.25) @ coefficients, preference @ coefficients,
                    projected):
      update = np.asarray(np.asarray(weights, np.float32) @ grads, np.float64)
      if not np.any(update):  # the cone is flat there: a zero update
        continue
      cosines = (grads.astype(np.float64) @ update
                 / (np.linalg.norm(grads.astype(np.float64), axis=1)
                    * np.linalg.norm(update)))
      assert np.min(cosines) >= -1e-6, (trial, cosines)


def test_not_zero_at_every_pareto_stationary_point():
  # 0 is in the convex hull (g1 + g2 = 0) but g3, g4 are orthogonal to both:
  # the dual cone is {(0, y), y >= 0}, they are their own projections, and
  # both methods move by (0, 0.75): stationary_zero does not hold.
  grads = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
  for tx in (mtl.upgrad(), mtl.dualproj()):
    np.testing.assert_allclose(_update(tx, grads)[0], [0.0, 0.75], atol=1e-6)
  # Opposite gradients alone: the dual cone is their orthogonal complement.
  np.testing.assert_allclose(_update(mtl.upgrad(), grads[:2])[0], 0.0, atol=1e-7)


def test_dual_cone_errors():
  with pytest.raises(ValueError, match="preference must be finite and >= 0"):
    mtl.upgrad(jnp.array([1.0, -1.0]))
  with pytest.raises(ValueError, match="preference must have a positive entry"):
    mtl.dualproj(jnp.zeros(3))
  with pytest.raises(ValueError, match="one entry per task"):
    mtl.upgrad(jnp.ones((2, 2)))
  with pytest.raises(ValueError, match="num_tasks=3 but preference has 2"):
    mtl.upgrad(jnp.ones(2), num_tasks=3)
  with pytest.raises(TypeError, match="num_tasks must be a positive Python int"):
    mtl.dualproj(num_tasks=2.0)
  tx = mtl.upgrad(jnp.ones(2))
  with pytest.raises(ValueError, match=r"len\(preference\)"):
    tx.update({"w": jnp.ones((3, 2))}, tx.init(None))
  # A traced preference (inject_hyperparams under jit) skips the checks.
  tx = optax.inject_hyperparams(mtl.upgrad)(preference=jnp.array([1.0, 3.0]))
  grads = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
  jax.make_jaxpr(tx.update)(grads, tx.init(None))
  update, _ = tx.update(grads, tx.init(None))
  # Orthogonal gradients lie on the cone's boundary; the projections are met
  # a few ulps inside it.
  np.testing.assert_allclose(update["w"], [1.0, 3.0], rtol=1e-5)


# --- PCD -----------------------------------------------------------------------


def _pcd_reference(grads, tau, v, eps=1e-8):
  """PCD in parameter space, the QP solved by enumeration in float64."""
  grads = np.asarray(grads, np.float64)
  h = grads / np.sqrt(v + eps)[:, None]
  gram = h @ h.T
  tau = np.broadcast_to(tau, (len(grads) - 1,))
  offsets = np.concatenate([[0.0], tau * gram.diagonal()[1:]])
  free = np.arange(len(grads)) > 0
  _, lam = _brute_force(gram, offsets - gram[:, 0], free)
  d = h[0] + lam @ h
  return np.linalg.norm(grads[0]) * d / np.linalg.norm(d), h, d


@pytest.mark.parametrize("tau", [0.0, 0.02, 0.3])
def test_pcd_constraints_hold_and_match_the_qp(tau):
  rng = np.random.default_rng(5)
  tx = mtl.pcd(tau=tau, num_tasks=3)
  for _ in range(3):
    grads = rng.normal(size=(3, 6)) * rng.uniform(0.1, 10.0, size=(3, 1))
    update, state = _update(tx, grads)
    # First step: the bias-corrected EMA is ||g_t||^2 itself.
    expected, h, d = _pcd_reference(grads, tau, np.sum(grads ** 2, axis=1))
    assert bool(state.feasible)
    np.testing.assert_allclose(update, expected, rtol=2e-4,
                               atol=2e-5 * np.abs(expected).max())
    np.testing.assert_allclose(np.linalg.norm(update), np.linalg.norm(grads[0]), rtol=1e-5)
    # <h_j, d> >= tau ||h_j||^2, d along the update.
    direction = update / np.linalg.norm(update) * np.linalg.norm(d)
    slack = h[1:] @ direction - tau * np.sum(h[1:] ** 2, axis=1)
    assert np.all(slack >= -1e-4)
    rebuilt = mtl.combine(state.task_weights, {"w": jnp.asarray(grads, jnp.float32)})
    np.testing.assert_allclose(rebuilt["w"], update, rtol=1e-5, atol=1e-6)


def test_pcd_hand_worked_two_tasks():
  # h_0 = (1, 0), h_1 = (-1, 1) / sqrt(2). <h_1, h_0 + lam h_1> = tau needs
  # lam = tau + 1/sqrt(2); d = (1 - lam / sqrt(2), lam / sqrt(2)).
  grads = [[2.0, 0.0], [-1.0, 1.0]]
  tau = 0.02
  lam = tau + 1.0 / np.sqrt(2.0)
  d = np.array([1.0 - lam / np.sqrt(2.0), lam / np.sqrt(2.0)])
  update, state = _update(mtl.pcd(tau=tau, num_tasks=2), grads)
  np.testing.assert_allclose(update, 2.0 * d / np.linalg.norm(d), rtol=1e-5)
  np.testing.assert_allclose(update, [1.37375, 1.45349], rtol=1e-4)
  # Weights on the raw gradients: w_0 = c s_0, w_1 = c lam s_1.
  c = 2.0 / np.linalg.norm(d)
  np.testing.assert_allclose(state.task_weights, [c / 2.0, c * lam / np.sqrt(2.0)],
                             rtol=1e-5)


def test_pcd_fallbacks():
  # Opposite secondary gradients with tau > 0: infeasible, the update is g_0.
  grads = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
  update, state = _update(mtl.pcd(tau=0.1, num_tasks=3), grads)
  np.testing.assert_allclose(update, grads[0], rtol=1e-6)
  assert not bool(state.feasible) and float(state.residual) > 0.1
  np.testing.assert_allclose(state.task_weights, [1.0, 0.0, 0.0])
  # With tau = 0 the same constraints are feasible: d is orthogonal to g_1.
  update, state = _update(mtl.pcd(tau=0.0, num_tasks=3), grads)
  assert bool(state.feasible)
  np.testing.assert_allclose(update, grads[0], atol=1e-6)
  # g_0 = 0 gives zero; tau = 0 with h_1 = -h_0 gives d = 0, zero too.
  update, state = _update(mtl.pcd(num_tasks=2), [[0.0, 0.0], [1.0, 2.0]])
  np.testing.assert_allclose(update, 0.0)
  np.testing.assert_allclose(state.task_weights, 0.0)
  update, _ = _update(mtl.pcd(tau=0.0, num_tasks=2), [[1.0, 1.0], [-2.0, -2.0]])
  np.testing.assert_allclose(update, 0.0, atol=1e-6)
  # One task: g_0.
  update, _ = _update(mtl.pcd(num_tasks=1), [[3.0, -4.0]])
  np.testing.assert_allclose(update, [3.0, -4.0], rtol=1e-6)


def test_pcd_bias_corrected_ema():
  rng = np.random.default_rng(6)
  beta, tau = 0.9, np.array([0.05, 0.2])
  tx = mtl.pcd(tau=tau, beta=beta, num_tasks=3)
  state = tx.init(None)
  history = []
  for step in range(4):
    grads = rng.normal(size=(3, 6)) * np.array([[1.0], [3.0 + step], [0.2]])
    history.append(np.sum(grads ** 2, axis=1))
    update, state = _update(tx, grads, state)
  k = len(history)
  ema = sum((1 - beta) * beta ** (k - 1 - i) * history[i] for i in range(k))
  assert int(state.count) == 4
  np.testing.assert_allclose(float(state.norm_scale) ** 2 * np.asarray(state.sq_norm_ema),
                             ema, rtol=1e-5)
  expected, _, _ = _pcd_reference(grads, tau, ema / (1 - beta ** k))
  np.testing.assert_allclose(update, expected, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("scale", [1e-20, 1e20])
def test_pcd_extreme_scales(scale):
  grads = np.array([[1.0, 0.5, 0.0, 0.0, 0.0, 0.0], [-1.0, 1.0, 0.2, 0.0, 0.0, 0.0],
                    [0.1, -1.0, 1.0, 0.0, 0.0, 0.0]])
  update, state = _update(mtl.pcd(num_tasks=3), grads * scale)
  assert np.all(np.isfinite(update)) and bool(state.feasible)
  if scale > 1:
    # Far above sqrt(eps) the direction does not depend on the scale.
    expected, _, _ = _pcd_reference(grads, 0.02, np.sum(grads ** 2, axis=1), eps=0.0)
  else:
    # Far below it, eps dominates: h_t = g_t / sqrt(eps), no normalisation.
    expected, _, _ = _pcd_reference(grads, 0.02, np.zeros(3), eps=1.0)
  np.testing.assert_allclose(update / scale, expected, rtol=1e-4)


def test_pcd_errors_and_traced_hyperparameters():
  with pytest.raises(TypeError, match="num_tasks"):
    mtl.pcd()
  with pytest.raises(ValueError, match=r"tau must be in \[0, 1\]"):
    mtl.pcd(tau=1.5, num_tasks=2)
  with pytest.raises(ValueError, match="tau must be a scalar or a vector of length"):
    mtl.pcd(tau=jnp.ones(3), num_tasks=3)
  with pytest.raises(ValueError, match=r"beta must be in \[0, 1\)"):
    mtl.pcd(beta=1.0, num_tasks=2)
  with pytest.raises(ValueError, match="eps must be finite and > 0"):
    mtl.pcd(eps=0.0, num_tasks=2)
  grads = {"w": jnp.array([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0], [-1.0, 0.5, 0.0, 0.0, 0.0, 0.0],
                           [0.0, 1.0, -0.5, 0.0, 0.0, 0.0]])}
  tx = optax.inject_hyperparams(mtl.pcd, static_args=("num_tasks",))(
      tau=jnp.array([0.1, 0.4]), num_tasks=3)
  jax.make_jaxpr(tx.update)(grads, tx.init(None))
  injected, state = tx.update(grads, tx.init(None))
  expected, _, _ = _pcd_reference(grads["w"], np.array([0.1, 0.4]),
                                  np.sum(np.asarray(grads["w"], np.float64) ** 2, axis=1))
  np.testing.assert_allclose(injected["w"], expected, rtol=1e-4, atol=1e-6)
  assert bool(optax.tree.get(state, "feasible"))
