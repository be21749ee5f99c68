"""IMTL-G, Aligned-MTL and ConFIG: the papers' defining equations and closed forms."""

import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl as mtl
from optax_mtl._src.methods.gradient import aligned_mtl as aligned_lib
from optax_mtl._src.methods.gradient import config as config_lib
from optax_mtl._src.methods.gradient import imtl_g as imtl_lib


def _update(tx, grads):
  grads = jnp.asarray(grads, jnp.float32)
  out, state = tx.update({"w": grads}, tx.init(None))
  return np.asarray(out["w"], np.float64)


def _combined(weights_fn, grads, *args):
  """The update from the weights a method's T x T function gives."""
  grads = np.asarray(grads, np.float64)
  return np.asarray(weights_fn(_gram(grads), *args), np.float64) @ grads


def _imtl(grads):
  return _combined(imtl_lib.impartial_weights, grads)


def _config(grads):
  return _combined(config_lib.conflict_free_weights, grads)


def _aligned(grads, scale="min"):
  return _combined(lambda g: aligned_lib.balance_matrix(g, scale).sum(1), grads)


def _gram(grads):
  grads = np.asarray(grads, np.float64)
  return jnp.asarray(grads @ grads.T, jnp.float32)


def _random_jacobian(rng, num_tasks, dim, spread=1.0):
  """Random gradients with norms spread over ``10**[-spread, spread]``."""
  grads = rng.normal(size=(num_tasks, dim))
  return grads * np.logspace(-spread, spread, num_tasks)[:, None]


def _unit(grads):
  grads = np.asarray(grads, np.float64)
  return grads / np.linalg.norm(grads, axis=1, keepdims=True)


# --- IMTL-G ---------------------------------------------------------------------


def _imtl_paper(grads):
  """Liu et al. 2021, Section 3.2: alpha_{2:T} = g_1 U^T (D U^T)^{-1}."""
  grads = np.asarray(grads, np.float64)
  units = _unit(grads)
  diffs_g = grads[:1] - grads[1:]      # D: rows g_1 - g_t
  diffs_u = units[:1] - units[1:]      # U: rows u_1 - u_t
  tail = grads[0] @ diffs_u.T @ np.linalg.inv(diffs_g @ diffs_u.T)
  return np.concatenate([[1.0 - tail.sum()], tail])


@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_imtl_g_matches_the_papers_closed_form(num_tasks):
  rng = np.random.default_rng(num_tasks)
  for _ in range(3):
    grads = _random_jacobian(rng, num_tasks, 9)
    weights = np.asarray(imtl_lib.impartial_weights(_gram(grads)), np.float64)
    np.testing.assert_allclose(weights, _imtl_paper(grads), rtol=2e-4, atol=1e-5)


def _check_impartial(grads, weights, rtol=1e-4):
  grads = np.asarray(grads, np.float64)
  update = weights @ grads
  norms = np.linalg.norm(grads, axis=1)
  alive = norms > 0
  projections = (grads[alive] @ update) / norms[alive]
  np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-5)
  np.testing.assert_allclose(projections, projections.mean(), rtol=rtol)
  assert projections.min() > 0
  np.testing.assert_array_equal(weights[~alive], 0.0)


@pytest.mark.parametrize("num_tasks", [3, 4])
def test_imtl_g_equal_unit_projections_on_random_gramians(num_tasks):
  rng = np.random.default_rng(10 + num_tasks)
  for _ in range(5):
    grads = _random_jacobian(rng, num_tasks, 6, spread=0.5)
    weights = np.asarray(imtl_lib.impartial_weights(_gram(grads)), np.float64)
    _check_impartial(grads, weights)


def test_imtl_g_rank_deficient_gramians():
  rng = np.random.default_rng(3)
  a, b, c = rng.normal(size=(3, 6))
  # Five tasks of rank three: colinear copies with other scales, and a zero
  # gradient that must get weight 0 without spoiling the others.
  grads = np.stack([a, b, 3.0 * a, c, 0.5 * b, np.zeros(6)])
  weights = np.asarray(imtl_lib.impartial_weights(_gram(grads)), np.float64)
  _check_impartial(grads, weights)
  # The direction of the three distinct gradients alone (the length, fixed
  # by the weights summing to 1, depends on how the copies share them).
  reduced = np.asarray(imtl_lib.impartial_weights(_gram(np.stack([a, b, c]))))
  full, alone = weights @ grads, reduced @ np.stack([a, b, c])
  np.testing.assert_allclose(full @ alone / (np.linalg.norm(full) * np.linalg.norm(alone)),
                             1.0, rtol=1e-6)


def test_imtl_g_two_task_closed_form():
  rng = np.random.default_rng(4)
  for _ in range(3):
    grads = _random_jacobian(rng, 2, 5)
    n1, n2 = np.linalg.norm(grads, axis=1)
    expected = (grads[0] / n1 + grads[1] / n2) / (1.0 / n1 + 1.0 / n2)
    np.testing.assert_allclose(_imtl(grads), expected, rtol=1e-5, atol=1e-6)


def test_imtl_g_hand_worked_examples():
  # g1 = e1, g2 = e1 + e2: w = (2 - sqrt2, sqrt2 - 1), u = (1, sqrt2 - 1),
  # and <u, g_t> / ||g_t|| = 1 for both.
  grads = np.array([[1.0, 0.0], [1.0, 1.0]])
  root2 = np.sqrt(2.0)
  weights = np.asarray(imtl_lib.impartial_weights(_gram(grads)))
  np.testing.assert_allclose(weights, [2.0 - root2, root2 - 1.0], rtol=1e-6)
  np.testing.assert_allclose(_update(mtl.imtl_g(), grads), [1.0, root2 - 1.0],
                             rtol=1e-6)
  # Orthogonal gradients of norms 1, 2, 4: w proportional to 1 / ||g_t||.
  grads = np.diag([1.0, 2.0, 4.0])
  weights = np.asarray(imtl_lib.impartial_weights(_gram(grads)))
  np.testing.assert_allclose(weights, [4 / 7, 2 / 7, 1 / 7], rtol=1e-6)
  np.testing.assert_allclose(_imtl(grads), [4 / 7] * 3, rtol=1e-6)


def test_imtl_g_degenerate_directions():
  g = np.array([1.0, -2.0, 0.5])
  # Identical gradients: the mean. Colinear g and 2g: w = (2, 1) / 3, the
  # limit of nearby independent pairs.
  identical = np.asarray(imtl_lib.impartial_weights(_gram(np.stack([g, g, g]))))
  np.testing.assert_allclose(identical, [1 / 3] * 3, rtol=1e-5)
  colinear = np.asarray(imtl_lib.impartial_weights(_gram(np.stack([g, 2.0 * g]))))
  np.testing.assert_allclose(colinear, [2 / 3, 1 / 3], rtol=1e-5)
  near = np.stack([g, 2.0 * g + 1e-3 * np.array([2.0, 1.0, 0.0])])
  np.testing.assert_allclose(_imtl_paper(near), colinear, atol=1e-3)
  # Opposite gradients: the only equal projection is 0.
  opposite = np.asarray(imtl_lib.impartial_weights(_gram(np.stack([g, -3.0 * g]))))
  np.testing.assert_array_equal(opposite, 0.0)


def test_imtl_g_zero_when_the_equal_projection_would_be_negative():
  # u3 close to (u1 + u2) / sqrt2 with a small norm: the exact weights summing
  # to 1 give one negative projection shared by all three tasks.
  angle = 0.05
  u3 = np.array([np.cos(angle) / np.sqrt(2), np.cos(angle) / np.sqrt(2),
                 np.sin(angle)])
  grads = np.stack([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], 0.1 * u3])
  exact = _imtl_paper(grads)
  projections = (grads @ (exact @ grads)) / np.linalg.norm(grads, axis=1)
  np.testing.assert_allclose(projections, projections[0], rtol=1e-8)
  assert projections[0] < 0
  weights = np.asarray(imtl_lib.impartial_weights(_gram(grads)))
  np.testing.assert_array_equal(weights, 0.0)


def test_imtl_g_state_logs_weights_and_handles_all_zero():
  tx = mtl.imtl_g(num_tasks=2)
  grads = jnp.array([[1.0, 0.0], [0.0, 3.0]])
  out, state = tx.update({"w": grads}, tx.init(None))
  np.testing.assert_allclose(state.task_weights, [0.75, 0.25], rtol=1e-6)
  np.testing.assert_allclose(out["w"], [0.75, 0.75], rtol=1e-6)
  zero = _imtl(np.zeros((3, 4)))
  np.testing.assert_array_equal(zero, 0.0)


# --- Aligned-MTL ----------------------------------------------------------------


def _sigma_squared(eigenvalues, scale):
  kept = np.sort(eigenvalues)[::-1]
  if scale == "min":
    return kept[-1]
  if scale == "median":
    return np.sort(kept)[(len(kept) - 1) // 2]  # lower median, as torch.median
  return kept.mean()


@pytest.mark.parametrize("scale", ["min", "median", "rmse"])
def test_aligned_mtl_condition_number_one(scale):
  rng = np.random.default_rng(5)
  grads = _random_jacobian(rng, 4, 8, spread=0.5)
  gram = np.asarray(grads @ grads.T)
  balance = np.asarray(aligned_lib.balance_matrix(_gram(grads), scale), np.float64)
  sigma_sq = _sigma_squared(np.linalg.eigvalsh(gram), scale)
  # The aligned gradients B J are orthogonal with squared norms sigma^2.
  aligned = balance @ gram @ balance
  np.testing.assert_allclose(aligned, sigma_sq * np.eye(4), rtol=2e-4,
                             atol=2e-4 * sigma_sq)
  # B J = sigma U W^T for the SVD J = U S W^T: the scaled polar factor.
  left, _, right_t = np.linalg.svd(grads, full_matrices=False)
  np.testing.assert_allclose(balance @ grads, np.sqrt(sigma_sq) * left @ right_t,
                             rtol=2e-4, atol=2e-4 * np.sqrt(sigma_sq))
  update = _aligned(grads, scale)
  np.testing.assert_allclose(update, balance.sum(1) @ grads, rtol=1e-4,
                             atol=1e-5 * np.linalg.norm(update))
  np.testing.assert_allclose(update, np.sqrt(sigma_sq) * right_t.T @ left.T @ np.ones(4),
                             rtol=2e-4, atol=2e-4 * np.sqrt(sigma_sq))


def test_aligned_mtl_sigma_of_each_scale():
  # Orthogonal gradients of norms 1, 2, 3, 4: eigenvalues 1, 4, 9, 16, and the
  # aligned gradients are sigma * e_t.
  grads = np.diag([1.0, 2.0, 3.0, 4.0])
  expected = {"min": 1.0, "median": 2.0, "rmse": np.sqrt(7.5)}
  for scale, sigma in expected.items():
    weights = np.asarray(aligned_lib.balance_matrix(_gram(grads), scale)).sum(1)
    np.testing.assert_allclose(weights, sigma / np.array([1.0, 2.0, 3.0, 4.0]),
                               rtol=1e-5)
    np.testing.assert_allclose(_aligned(grads, scale), [sigma] * 4, rtol=1e-5)


def test_aligned_mtl_hand_worked_example():
  # G = diag(4, 1): B = diag(1/2, 1) for "min" and the lower median, and
  # sqrt(2.5) diag(1/2, 1) for "rmse".
  grads = np.array([[2.0, 0.0], [0.0, 1.0]])
  np.testing.assert_allclose(_update(mtl.aligned_mtl("min"), grads), [1.0, 1.0],
                             rtol=1e-6)
  np.testing.assert_allclose(_update(mtl.aligned_mtl("median"), grads), [1.0, 1.0],
                             rtol=1e-6)
  np.testing.assert_allclose(_update(mtl.aligned_mtl("rmse"), grads),
                             [np.sqrt(2.5)] * 2, rtol=1e-6)
  # A non-diagonal Gramian: g1 = (1, 0), g2 = (1, 1), G = [[1, 1], [1, 2]],
  # lam = (3 -+ sqrt5) / 2; B = sqrt(lam_min) G^(-1/2).
  grads = np.array([[1.0, 0.0], [1.0, 1.0]])
  values, vectors = np.linalg.eigh(grads @ grads.T)
  balance = np.sqrt(values[0]) * vectors @ np.diag(values ** -0.5) @ vectors.T
  np.testing.assert_allclose(values, [(3 - np.sqrt(5)) / 2, (3 + np.sqrt(5)) / 2])
  np.testing.assert_allclose(_aligned(grads), balance.sum(1) @ grads, rtol=1e-5)


def test_aligned_mtl_rank_deficient_and_zero():
  rng = np.random.default_rng(6)
  a, b = rng.normal(size=(2, 5))
  grads = np.stack([a, b, a + b, 2.0 * a])  # rank 2
  gram = grads @ grads.T
  balance = np.asarray(aligned_lib.balance_matrix(_gram(grads), "min"), np.float64)
  values, vectors = np.linalg.eigh(gram)
  span = vectors[:, 2:]  # the two nonzero eigenvalues
  # B G B = lam_min P on the span, with lam_min the smallest nonzero one.
  np.testing.assert_allclose(balance @ gram @ balance, values[2] * span @ span.T,
                             rtol=1e-3, atol=1e-3 * values[2])
  # Identical gradients: every aligned gradient is g, the update their sum.
  g = rng.normal(size=5)
  np.testing.assert_allclose(_aligned(np.stack([g, g, g])), 3 * g, rtol=1e-5)
  np.testing.assert_array_equal(_aligned(np.zeros((3, 5))), 0.0)


def test_aligned_mtl_rejects_bad_scale():
  with pytest.raises(ValueError, match=r"mtl.aligned_mtl: scale must be one of \('min', 'median', 'rmse'\), got 'max'"):
    mtl.aligned_mtl("max")
  with pytest.raises(TypeError, match=r"mtl.aligned_mtl: scale must be a string"):
    mtl.aligned_mtl(1.0)
  with pytest.raises(TypeError, match=r"mtl.aligned_mtl: num_tasks must be a positive Python int"):
    mtl.aligned_mtl(num_tasks=2.0)


# --- ConFIG ---------------------------------------------------------------------


def _config_reference(grads):
  """Liu et al. 2025 in parameter space: d = pinv(U) 1, (sum g.d_hat) d_hat."""
  grads = np.asarray(grads, np.float64)
  direction = np.linalg.pinv(_unit(grads)) @ np.ones(len(grads))
  unit = direction / np.linalg.norm(direction)
  return np.sum(grads @ unit) * unit


@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_config_equal_cosines_and_magnitude(num_tasks):
  rng = np.random.default_rng(20 + num_tasks)
  for _ in range(3):
    grads = _random_jacobian(rng, num_tasks, 8)
    weights = np.asarray(config_lib.conflict_free_weights(_gram(grads)), np.float64)
    update = weights @ grads
    cosines = _unit(grads) @ update / np.linalg.norm(update)
    np.testing.assert_allclose(cosines, cosines.mean(), rtol=1e-4)
    assert cosines.min() > 0
    # The length is the sum of the gradients' projections onto the direction.
    direction = update / np.linalg.norm(update)
    np.testing.assert_allclose(np.linalg.norm(update), np.sum(grads @ direction),
                               rtol=1e-5)
    np.testing.assert_allclose(update, _config_reference(grads), rtol=2e-4,
                               atol=1e-5 * np.linalg.norm(update))


def test_config_two_task_closed_form():
  rng = np.random.default_rng(7)
  for _ in range(3):
    grads = _random_jacobian(rng, 2, 6)
    n1, n2 = np.linalg.norm(grads, axis=1)
    expected = (n1 + n2) / 2 * (grads[0] / n1 + grads[1] / n2)
    np.testing.assert_allclose(_config(grads), expected, rtol=1e-5, atol=1e-6)


def test_config_hand_worked_examples():
  # g1 = e1, g2 = 2 e2: d_hat = (1, 1) / sqrt2, length (1 + 2) / sqrt2.
  np.testing.assert_allclose(_update(mtl.config(), [[1.0, 0.0], [0.0, 2.0]]),
                             [1.5, 1.5], rtol=1e-6)
  # Orthogonal norms 1, 2, 4: length 7 / sqrt3 along (1, 1, 1) / sqrt3.
  np.testing.assert_allclose(_config(np.diag([1.0, 2.0, 4.0])), [7 / 3] * 3, rtol=1e-6)
  # g1 = e1, g2 = e1 + e2: d = (1, sqrt2 - 1), cosines 1 / |d| = 0.9239.
  update = _update(mtl.config(), [[1.0, 0.0], [1.0, 1.0]])
  root2 = np.sqrt(2.0)
  direction = np.array([1.0, root2 - 1.0]) / np.sqrt(4.0 - 2.0 * root2)
  length = (1.0 + root2) * direction[0] * 1.0
  np.testing.assert_allclose(update, length * direction, rtol=1e-6)


def test_config_degenerate_gradients():
  rng = np.random.default_rng(8)
  a, b = rng.normal(size=(2, 4))
  # A zero gradient is left out: weight 0, the same update as without it.
  with_zero = np.stack([a, np.zeros(4), b])
  weights = np.asarray(config_lib.conflict_free_weights(_gram(with_zero)))
  assert weights[1] == 0.0
  np.testing.assert_allclose(weights @ with_zero, _config_reference(np.stack([a, b])),
                             rtol=1e-5)
  # Opposite gradients and a Pareto-stationary point: no direction helps every
  # task, the update is zero.
  np.testing.assert_array_equal(_config(np.stack([a, -2.0 * a])), 0.0)
  stationary = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
  np.testing.assert_array_equal(_config(stationary), 0.0)
  # Three tasks in a plane with no equal-cosine direction: the least-squares
  # direction of the authors' code still helps every task, so it is kept.
  planar = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 2.0]])
  update = _config(planar)
  np.testing.assert_allclose(update, _config_reference(planar), rtol=1e-5)
  assert np.all(planar @ update > 0)
  # Identical gradients: the gradient itself times the number of tasks.
  np.testing.assert_allclose(_config(np.stack([a, a, a])), 3 * a, rtol=1e-5)


def test_config_direction_is_imtl_g_s_but_not_its_length():
  # Both solve C c = 1; only the length differs, and ConFIG's depends on each
  # task's norm: it is not invariant to one task's scale.
  rng = np.random.default_rng(9)
  grads = _random_jacobian(rng, 3, 7)
  config_update = _config(grads)
  imtl_update = _imtl(grads)
  cosine = config_update @ imtl_update / (
      np.linalg.norm(config_update) * np.linalg.norm(imtl_update))
  np.testing.assert_allclose(cosine, 1.0, rtol=1e-6)
  rescaled = grads * np.array([[1.0], [10.0], [1.0]])
  moved = _config(rescaled)
  np.testing.assert_allclose(moved / np.linalg.norm(moved),
                             config_update / np.linalg.norm(config_update), atol=1e-5)
  assert np.linalg.norm(moved) > 2.0 * np.linalg.norm(config_update)
