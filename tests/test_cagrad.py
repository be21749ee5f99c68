"""CAGrad: c = 0 is the mean, the dual's optimality, the primal's constraint."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl as mtl
from optax_mtl._src.methods.gradient import cagrad as cagrad_lib


def _update(tx, grads):
  return np.asarray(tx.update({"w": jnp.asarray(grads, jnp.float32)},
                              tx.init(None))[0]["w"], np.float64)


def _dual(grads, c, w):
  g0 = grads.mean(0)
  gw = w @ grads
  return gw @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(gw)


def test_c_zero_is_mean():
  grads = np.random.default_rng(0).normal(size=(4, 5))
  for rescale in (0, 1, 2):
    np.testing.assert_allclose(_update(mtl.cagrad(0.0, rescale), grads),
                               grads.mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_tasks", [2, 3])
def test_dual_optimal_against_grid(seed, num_tasks):
  rng = np.random.default_rng(seed)
  grads = rng.normal(size=(num_tasks, 6))
  c = 0.5
  gram = grads @ grads.T
  w, lam = cagrad_lib.dual_weights(jnp.asarray(gram, jnp.float32), c)
  w = np.asarray(w, np.float64)
  steps = np.linspace(0, 1, 201)
  grid = [np.array(p) for p in itertools.product(steps, repeat=num_tasks - 1)
          if sum(p) <= 1]
  best = min(_dual(grads, c, np.append(p, 1 - sum(p))) for p in grid)
  assert _dual(grads, c, w) <= best + 1e-5
  expected_lam = c * np.linalg.norm(grads.mean(0)) / np.linalg.norm(w @ grads)
  np.testing.assert_allclose(float(lam), expected_lam, rtol=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_primal_solution(seed):
  rng = np.random.default_rng(seed)
  grads = rng.normal(size=(3, 5)) + 0.3 * rng.normal(size=5)
  c = 0.4
  d = _update(mtl.cagrad(c, rescale=0), grads)
  g0 = grads.mean(0)
  radius = c * np.linalg.norm(g0)
  # On the ball's boundary, and no feasible point is better for the worst task.
  np.testing.assert_allclose(np.linalg.norm(d - g0), radius, rtol=1e-4)
  worst = np.min(grads @ d)
  for _ in range(2000):
    v = rng.normal(size=5)
    candidate = g0 + radius * v / np.linalg.norm(v)
    assert np.min(grads @ candidate) <= worst + 1e-5


def test_two_task_closed_form_equal_norms():
  # Equal norms: by symmetry w = (1/2, 1/2), g_w = g_0, d = (1 + c) g_0.
  grads = np.array([[1.0, 0.0], [0.0, 1.0]])
  c = 0.4
  g0 = grads.mean(0)
  np.testing.assert_allclose(_update(mtl.cagrad(c, 0), grads), (1 + c) * g0, rtol=1e-5)
  np.testing.assert_allclose(_update(mtl.cagrad(c, 1), grads),
                             (1 + c) * g0 / (1 + c * c), rtol=1e-5)
  np.testing.assert_allclose(_update(mtl.cagrad(c, 2), grads), g0, rtol=1e-5)


def test_inject_hyperparams_and_errors():
  tx = optax.inject_hyperparams(mtl.cagrad)(c=0.4, rescale=1)
  grads = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)}
  update, _ = jax.jit(tx.update)(grads, tx.init({"w": jnp.zeros(4)}))
  np.testing.assert_allclose(update["w"], _update(mtl.cagrad(0.4, 1), grads["w"]),
                             rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="c must be finite and >= 0"):
    mtl.cagrad(c=-0.1)
  with pytest.raises(ValueError, match=r"rescale must be one of \(0, 1, 2\)"):
    mtl.cagrad(rescale=3)
