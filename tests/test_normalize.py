"""Gradient normalisation: unit-norm task gradients, loss ratios, zero guard."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl as mtl


def _norms(tree):
  leaves = jax.tree.leaves(tree)
  return np.sqrt(sum(np.sum(np.asarray(l, np.float64).reshape(l.shape[0], -1) ** 2, 1)
                     for l in leaves))


@pytest.mark.parametrize("scale", [1e-20, 1.0, 1e20])
def test_equal_norm_task_gradients(scale):
  rng = np.random.default_rng(0)
  grads = {"a": jnp.asarray(scale * rng.normal(size=(3, 4, 2)) * np.array([1, 10, 100])[:, None, None],
                            jnp.float32),
           "b": jnp.asarray(scale * rng.normal(size=(3, 5)), jnp.float32)}
  tx = mtl.normalize_gradients()
  out, _ = tx.update(grads, tx.init(None))
  np.testing.assert_allclose(_norms(out), 1.0, rtol=1e-5)
  # Directions unchanged.
  ratio = np.asarray(out["b"], np.float64) / np.asarray(grads["b"], np.float64)
  np.testing.assert_allclose(ratio, ratio[:, :1] * np.ones_like(ratio), rtol=1e-5)


def test_zero_gradient_stays_zero():
  grads = {"w": jnp.array([[0.0, 0.0], [3.0, 4.0]])}
  tx = mtl.normalize_gradients()
  out, _ = tx.update(grads, tx.init(None))
  np.testing.assert_allclose(out["w"], [[0.0, 0.0], [0.6, 0.8]], rtol=1e-6)


def test_mask_sets_the_norm():
  grads = {"trunk": jnp.array([[3.0, 4.0], [0.0, 2.0]]), "head": jnp.array([[100.0], [1.0]])}
  tx = mtl.normalize_gradients(shared={"trunk": True, "head": False})
  out, _ = tx.update(grads, tx.init(None))
  np.testing.assert_allclose(out["trunk"], [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)
  np.testing.assert_allclose(out["head"], [[20.0], [0.5]], rtol=1e-6)


def test_loss_ratios():
  tx = mtl.normalize_gradients(alpha=2.0, num_tasks=2)
  grads = {"w": jnp.array([[2.0, 0.0], [0.0, 5.0]])}
  state = tx.init(None)
  out, state = tx.update(grads, state, losses=jnp.array([4.0, 2.0]))
  np.testing.assert_allclose(_norms(out), 1.0, rtol=1e-6)  # r = 1 at the start
  # Ratios (0.5, 1.0) -> r = (2/3, 4/3), norms r^2.
  out, state = tx.update(grads, state, losses=jnp.array([2.0, 2.0]))
  np.testing.assert_allclose(_norms(out), [4 / 9, 16 / 9], rtol=1e-5)
  np.testing.assert_allclose(state.initial_losses, [4.0, 2.0])


def test_inject_hyperparams_and_errors():
  tx = optax.inject_hyperparams(mtl.normalize_gradients, static_args=("num_tasks",))(
      alpha=1.0, num_tasks=2)
  grads = {"w": jnp.array([[2.0, 0.0], [0.0, 5.0]])}
  out, _ = jax.jit(tx.update)(grads, tx.init({"w": jnp.zeros(2)}), losses=jnp.ones(2))
  np.testing.assert_allclose(_norms(out), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="pass num_tasks=T|Pass num_tasks=T"):
    mtl.normalize_gradients(alpha=0.5)
  with pytest.raises(ValueError, match="alpha must be"):
    mtl.normalize_gradients(alpha=-1.0, num_tasks=2)
  with pytest.raises(TypeError, match="needs the per-task losses"):
    mtl.normalize_gradients(1.0, num_tasks=2).update(grads, None)
