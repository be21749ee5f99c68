"""PCGrad: closed forms, untouched non-conflicting gradients, the random order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl as mtl
from optax_mtl._src.methods.gradient import pcgrad as pcgrad_lib


def _update(tx, grads, state=None):
  state = tx.init(None) if state is None else state
  out, state = tx.update({"w": jnp.asarray(grads, jnp.float32)}, state)
  return np.asarray(out["w"], np.float64), state


def _reference(grads, orders):
  """Algorithm 1 in parameter space, with given visiting orders."""
  grads = np.asarray(grads, np.float64)
  out = []
  for i, order in enumerate(orders):
    g = grads[i].copy()
    for j in order:
      if j == i:
        continue
      dot = g @ grads[j]
      if dot < 0:
        g = g - dot / (grads[j] @ grads[j]) * grads[j]
    out.append(g)
  return np.sum(out, axis=0)


def test_two_task_closed_form():
  g1, g2 = np.array([1.0, 1.0]), np.array([-1.0, 0.0])
  expected = (g1 - (g1 @ g2) / (g2 @ g2) * g2) + (g2 - (g1 @ g2) / (g1 @ g1) * g1)
  update, _ = _update(mtl.pcgrad(), [g1, g2])
  np.testing.assert_allclose(update, expected, rtol=1e-6)  # [-0.5, 1.5]
  mean, _ = _update(mtl.pcgrad(reduction="mean"), [g1, g2])
  np.testing.assert_allclose(mean, expected / 2, rtol=1e-6)


def test_non_conflicting_gradients_untouched():
  grads = np.array([[1.0, 0.0, 1.0], [0.5, 2.0, 0.0], [0.0, 1.0, 3.0]])
  update, _ = _update(mtl.pcgrad(seed=3), grads)
  np.testing.assert_allclose(update, grads.sum(0), rtol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_matches_parameter_space_algorithm(seed):
  rng = np.random.default_rng(seed)
  grads = rng.normal(size=(5, 7))
  gram = grads @ grads.T
  orders = np.stack([rng.permutation(5) for _ in range(5)])
  coeffs = pcgrad_lib.projection_coefficients(jnp.asarray(gram, jnp.float32),
                                              jnp.asarray(orders))
  np.testing.assert_allclose(np.asarray(coeffs, np.float64).sum(0) @ grads,
                             _reference(grads, orders), rtol=1e-4, atol=1e-5)


def test_key_advances_and_orders_differ():
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(6, 4))
  tx = mtl.pcgrad(seed=0)
  state = tx.init(None)
  outputs = []
  for _ in range(6):
    out, new_state = _update(tx, grads, state)
    assert not np.array_equal(np.asarray(new_state.key), np.asarray(state.key))
    state = new_state
    outputs.append(out)
  # With 6 conflicting tasks the random orders change the result.
  assert len({tuple(np.round(o, 5)) for o in outputs}) > 1
  assert state.key.dtype == jnp.uint32


def test_opposite_gradients_cancel():
  update, _ = _update(mtl.pcgrad(), [[1.0, -2.0], [-1.0, 2.0]])
  np.testing.assert_allclose(update, 0.0, atol=1e-7)


def test_state_works_under_vmap_over_seeds():
  txs = [mtl.pcgrad(seed=s) for s in range(3)]
  states = jax.tree.map(lambda *x: jnp.stack(x), *[t.init(None) for t in txs])
  grads = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32)}
  out, _ = jax.vmap(lambda s: txs[0].update(grads, s))(states)
  assert out["w"].shape == (3, 3)


def test_errors():
  with pytest.raises(ValueError, match="reduction must be one of"):
    mtl.pcgrad(reduction="max")
  with pytest.raises(TypeError, match="seed must be an integer"):
    mtl.pcgrad(seed=0.5)
