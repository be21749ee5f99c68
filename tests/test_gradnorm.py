"""GradNorm: the weight step on a hand-computed case, the first-step losses."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl as mtl


def test_weight_step_hand_computed():
  # Norms 1 and 3, weights (1, 1), losses equal to the initial ones (r = 1).
  # G = (1, 3), mean 2, targets (2, 2): signs (-1, +1), grads (-1, +3).
  # w = (1 + 0.1, 1 - 0.3) = (1.1, 0.7), renormalised to sum 2: (1.2222, 0.7778).
  tx = mtl.scale_by_gradnorm(num_tasks=2, alpha=1.5, optimizer=optax.sgd(0.1))
  grads = {"w": jnp.array([[1.0, 0.0], [0.0, 3.0]])}
  losses = jnp.array([2.0, 5.0])
  state = tx.init(None)
  out, state = tx.update(grads, state, losses=losses)
  np.testing.assert_allclose(out["w"], grads["w"])  # w(0) = 1 applied
  np.testing.assert_allclose(state.task_weights, [1.0, 1.0])
  np.testing.assert_allclose(state.learned_weights, [2 * 1.1 / 1.8, 2 * 0.7 / 1.8], rtol=1e-6)
  np.testing.assert_allclose(state.initial_losses, losses)
  # Second step: losses (1, 5) -> ratios (0.5, 1), r = (2/3, 4/3).
  w = np.array([2 * 1.1 / 1.8, 2 * 0.7 / 1.8])
  norms = np.array([1.0, 3.0])
  r = np.array([2 / 3, 4 / 3])
  gw = w * norms
  target = gw.mean() * r ** 1.5
  new = w - 0.1 * np.sign(gw - target) * norms
  new = 2 * new / new.sum()
  out, state = tx.update(grads, state, losses=jnp.array([1.0, 5.0]))
  np.testing.assert_allclose(out["w"], w[:, None] * np.asarray(grads["w"]), rtol=1e-6)
  np.testing.assert_allclose(state.task_weights, w, rtol=1e-6)
  np.testing.assert_allclose(state.learned_weights, new, rtol=1e-5)
  np.testing.assert_allclose(state.initial_losses, losses)


def test_layer_mask_picks_the_leaves():
  grads = {"last": jnp.array([[1.0], [3.0]]), "other": jnp.array([[100.0], [0.0]])}
  tx = mtl.scale_by_gradnorm(num_tasks=2, optimizer=optax.sgd(0.1),
                             layer={"last": True, "other": False})
  _, state = tx.update(grads, tx.init(None), losses=jnp.ones(2))
  np.testing.assert_allclose(state.learned_weights, [2 * 1.1 / 1.8, 2 * 0.7 / 1.8], rtol=1e-6)
  found = optax.tree.get(state, "learned_weights")
  np.testing.assert_allclose(found, state.learned_weights)


@pytest.mark.parametrize("optimizer", [None, optax.sgd(10.0)], ids=["adam", "sgd"])
def test_weights_stay_positive_and_sum_to_t(optimizer):
  tx = mtl.scale_by_gradnorm(num_tasks=3, learning_rate=10.0, optimizer=optimizer)
  grads = {"w": jnp.array([[1e20, 0.0], [0.0, 1.0], [1.0, 1.0]])}
  state = tx.init(None)
  for step in range(5):
    _, state = tx.update(grads, state, losses=jnp.array([1.0, 2.0, 3.0]) / (step + 1))
    w = np.asarray(state.learned_weights)
    assert np.all(w > 0) and np.all(np.isfinite(w))
    np.testing.assert_allclose(w.sum(), 3.0, rtol=1e-5)


def test_default_adam_step_does_not_depend_on_the_norms_scale():
  # Adam's first step is learning_rate * sign(gradient) whatever the norms:
  # with norms (1, 3) or (1e4, 3e4) the weights move by the same amount.
  losses = jnp.array([2.0, 5.0])
  moved = []
  for scale in (1.0, 1e4):
    grads = {"w": scale * jnp.array([[1.0, 0.0], [0.0, 3.0]])}
    tx = mtl.scale_by_gradnorm(num_tasks=2, learning_rate=0.1)
    _, state = tx.update(grads, tx.init(None), losses=losses)
    moved.append(np.asarray(state.learned_weights))
  # Signs (-1, +1): w = (1.1, 0.9) -> renormalised to sum 2: unchanged.
  np.testing.assert_allclose(moved[0], [1.1, 0.9], rtol=1e-5)
  np.testing.assert_allclose(moved[1], moved[0], rtol=1e-6)


def test_alias_is_scaling_then_sum():
  grads = {"w": jnp.array([[1.0, 0.0], [0.0, 3.0]])}
  tx = mtl.gradnorm(num_tasks=2, optimizer=optax.sgd(0.1))
  state = tx.init(None)
  losses = jnp.array([2.0, 5.0])
  _, state = tx.update(grads, state, losses=losses)
  out, _ = tx.update(grads, state, losses=losses)
  w = np.array([2 * 1.1 / 1.8, 2 * 0.7 / 1.8])
  np.testing.assert_allclose(out["w"], w @ np.asarray(grads["w"]), rtol=1e-6)


def test_inject_hyperparams_and_errors():
  tx = optax.inject_hyperparams(mtl.scale_by_gradnorm, static_args=("num_tasks",))(
      num_tasks=2, alpha=1.5, learning_rate=0.025)
  grads = {"w": jnp.array([[1.0, 0.0], [0.0, 3.0]])}
  out, _ = jax.jit(tx.update)(grads, tx.init({"w": jnp.zeros(2)}), losses=jnp.ones(2))
  np.testing.assert_allclose(out["w"], grads["w"])
  with pytest.raises(ValueError, match="num_tasks must be a positive"):
    mtl.scale_by_gradnorm(num_tasks=0)
  with pytest.raises(ValueError, match="learning_rate must be"):
    mtl.scale_by_gradnorm(num_tasks=2, learning_rate=0.0)
  with pytest.raises(ValueError, match="alpha must be"):
    mtl.scale_by_gradnorm(num_tasks=2, alpha=-1.0)
  with pytest.raises(ValueError, match="built for 2 tasks"):
    mtl.scale_by_gradnorm(num_tasks=2).update({"w": jnp.ones((3, 2))}, None, losses=jnp.ones(3))
