"""CR-MOGM (the EMA of an aggregator's weights) and main-versus-auxiliary tasks."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl as mtl
from optax_mtl._src.methods.gradient import auxiliary as auxiliary_lib


def _update(tx, grads, state=None):
  state = tx.init(None) if state is None else state
  out, state = tx.update({"w": jnp.asarray(grads, jnp.float32)}, state)
  return np.asarray(out["w"], np.float64), state


def _steps(num, count, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(num, 5)) + 0.4 * rng.normal(size=5) for _ in range(count)]


def _inner_weights(tx, grads, state=None):
  """The weights an aggregator applied, from its update (independent gradients)."""
  update, state = _update(tx, grads, state)
  weights = np.linalg.lstsq(np.asarray(grads).T, update, rcond=None)[0]
  return weights, state


# --- CR-MOGM -----------------------------------------------------------------------


def test_cr_mogm_with_alpha_zero_is_the_inner_method():
  # PCGrad keeps a key in its state: the inner state must advance as its own.
  tx = mtl.cr_mogm(mtl.pcgrad(seed=3), alpha=0.0, num_tasks=3)
  inner = mtl.pcgrad(seed=3)
  s1, s2 = tx.init(None), inner.init(None)
  for grads in _steps(3, 3):
    u1, s1 = _update(tx, grads, s1)
    u2, s2 = _update(inner, grads, s2)
    np.testing.assert_allclose(u1, u2, rtol=1e-5, atol=1e-6)


def test_cr_mogm_follows_the_ema_recursion_over_steps():
  alpha = 0.7
  tx = mtl.cr_mogm(mtl.mgda(), alpha=alpha, num_tasks=2)
  state = tx.init(None)
  average = None
  for k, grads in enumerate(_steps(2, 4, seed=1)):
    current, _ = _inner_weights(mtl.mgda(), grads)
    average = current if k == 0 else alpha * average + (1 - alpha) * current
    update, state = _update(tx, grads, state)
    np.testing.assert_allclose(state.task_weights, average, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(update, average @ grads, rtol=1e-4, atol=1e-5)
  assert int(state.count) == 4
  # The average of simplex weights stays on the simplex.
  np.testing.assert_allclose(np.sum(state.task_weights), 1.0, rtol=1e-5)


def test_cr_mogm_hand_worked_two_steps():
  # MGDA on e1, e2 gives [0.5, 0.5]; on e1, 3 e2 it gives [0.9, 0.1]; with
  # alpha = 0.25: 0.25 * [0.5, 0.5] + 0.75 * [0.9, 0.1] = [0.8, 0.2].
  tx = mtl.cr_mogm(mtl.mgda(), alpha=0.25, num_tasks=2)
  _, state = _update(tx, [[1.0, 0.0], [0.0, 1.0]])
  np.testing.assert_allclose(state.task_weights, [0.5, 0.5], rtol=1e-6)
  update, state = _update(tx, [[1.0, 0.0], [0.0, 3.0]], state)
  np.testing.assert_allclose(state.task_weights, [0.8, 0.2], rtol=1e-5)
  np.testing.assert_allclose(update, [0.8, 0.6], rtol=1e-5)


def test_cr_mogm_logs_only_the_average():
  # The inner state's own task_weights is hidden from optax.tree.get.
  tx = optax.chain(mtl.cr_mogm(mtl.mgda(num_tasks=2), alpha=0.5, num_tasks=2),
                   optax.sgd(1.0))
  state = tx.init(None)
  _, state = tx.update({"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}, state)
  np.testing.assert_allclose(optax.tree.get(state, "task_weights"), [0.8, 0.2],
                             rtol=1e-5)
  np.testing.assert_allclose(mtl.applied_weights(state), [0.8, 0.2], rtol=1e-5)


def test_cr_mogm_claims_what_averaging_keeps():
  assert mtl.cr_mogm(mtl.mgda(), num_tasks=2).claims == {
      "permutation_equivariant", "homogeneous"}
  assert mtl.cr_mogm(mtl.mgda("l2"), num_tasks=2).claims == {
      "permutation_equivariant", "task_scale_invariant"}
  assert mtl.cr_mogm(mtl.pcgrad(), num_tasks=2).claims == {"homogeneous"}
  assert mtl.cr_mogm(mtl.mgda("loss"), num_tasks=2).reads == {"gramian", "losses"}


def test_cr_mogm_errors():
  with pytest.raises(TypeError, match="must be an aggregator of optax_mtl"):
    mtl.cr_mogm(optax.sgd(0.1), num_tasks=2)
  with pytest.raises(ValueError, match="got a combination of 2 members"):
    mtl.cr_mogm(mtl.chain(mtl.normalize_gradients(), mtl.mgda()), num_tasks=2)
  with pytest.raises(ValueError, match="got a combination of 2 members"):
    mtl.cr_mogm(mtl.dwa(num_tasks=2), num_tasks=2)
  with pytest.raises(ValueError, match="is a task scaling, not an aggregator"):
    mtl.cr_mogm(mtl.normalize_gradients(), num_tasks=2)
  with pytest.raises(ValueError, match="pass shared= to mtl.cr_mogm"):
    mtl.cr_mogm(mtl.mgda(shared={"w": True}), num_tasks=2)
  with pytest.raises(ValueError, match="built for num_tasks=3"):
    mtl.cr_mogm(mtl.mgda(num_tasks=3), num_tasks=2)
  with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
    mtl.cr_mogm(mtl.mgda(), alpha=1.5, num_tasks=2)


# --- main and auxiliary tasks --------------------------------------------------------

# g_M = [1, 0]; g_a1 = [-1, 1] conflicts (cos -0.7071); g_a2 = [1, 1] helps (cos 0.7071).
HAND = np.array([[1.0, 0.0], [-1.0, 1.0], [1.0, 1.0]])


@pytest.mark.parametrize("mode, weights, update", [
    # g_a1 - (-1 / 1) g_M = [0, 1]: update [1, 0] + [0, 1] + [1, 1].
    ("project", [2.0, 1.0, 1.0], [2.0, 2.0]),
    # max(0, cos): 0 for a1, 0.7071 for a2.
    ("cosine", [1.0, 0.0, 0.70710678], [1.70710678, 0.70710678]),
    ("drop", [1.0, 0.0, 1.0], [2.0, 1.0]),
])
def test_auxiliary_hand_worked(mode, weights, update):
  out, state = _update(mtl.auxiliary(1, mode, num_tasks=3), HAND)
  np.testing.assert_allclose(state.task_weights, weights, rtol=1e-6)
  np.testing.assert_allclose(out, update, rtol=1e-6)


def test_auxiliary_projects_onto_the_summed_main_gradient():
  # Two main tasks e1, e2 (g_M = [1, 1]); aux [-2, 0]: <g_a, g_M> = -2,
  # ||g_M||^2 = 2, so g_a + g_M = [-1, 1] and the update is [0, 2].
  grads = np.array([[1.0, 0.0], [0.0, 1.0], [-2.0, 0.0]])
  out, state = _update(mtl.auxiliary(2, num_tasks=3), grads)
  np.testing.assert_allclose(state.task_weights, [2.0, 2.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(out, [0.0, 2.0], atol=1e-6)
  np.testing.assert_allclose(out @ grads[:2].sum(0), 2.0, rtol=1e-6)  # = ||g_M||^2


@pytest.mark.parametrize("mode", ["project", "cosine", "drop"])
@pytest.mark.parametrize("num_main", [1, 2])
def test_auxiliary_never_slows_the_main_objective(mode, num_main):
  rng = np.random.default_rng(num_main)
  for _ in range(5):
    grads = rng.normal(size=(5, 6)) * rng.uniform(0.1, 10.0, size=(5, 1))
    weights = np.asarray(auxiliary_lib.auxiliary_weights(
        jnp.asarray(grads @ grads.T, jnp.float32), num_main, mode), np.float64)
    out = weights @ grads
    main = grads[:num_main].sum(0)
    assert out @ main >= main @ main - 1e-4 * np.linalg.norm(out) * np.linalg.norm(main)
    if mode == "project":  # only the negative component along g_M is removed
      aux = out - main
      np.testing.assert_allclose(
          aux @ main, np.maximum(grads[num_main:] @ main, 0.0).sum(), rtol=1e-4,
          atol=1e-5)
  # Through the transformation, with the Gramian computed by the engine.
  out, _ = _update(mtl.auxiliary(num_main, mode), grads)
  np.testing.assert_allclose(out, weights @ grads, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["project", "cosine", "drop"])
@pytest.mark.parametrize("main", [[[0.0, 0.0]], [[1.0, 0.0], [-1.0, 0.0]]],
                         ids=["zero", "cancelling"])
def test_auxiliary_kept_when_the_main_gradient_vanishes(mode, main):
  grads = np.array(main + [[-1.0, 2.0], [3.0, 1.0]])
  out, state = _update(mtl.auxiliary(len(main), mode, num_tasks=len(grads)), grads)
  np.testing.assert_allclose(state.task_weights, 1.0)
  np.testing.assert_allclose(out, [2.0, 3.0], atol=1e-6)


def test_auxiliary_all_main_is_the_sum():
  grads = np.array([[1.0, 0.0], [-3.0, 1.0]])
  out, _ = _update(mtl.auxiliary(2), grads)
  np.testing.assert_allclose(out, grads.sum(0))


def test_auxiliary_errors():
  with pytest.raises(ValueError, match="num_main must be an integer >= 1"):
    mtl.auxiliary(0)
  with pytest.raises(ValueError, match="num_main must be an integer >= 1"):
    mtl.auxiliary(1.5)
  with pytest.raises(ValueError, match=r"num_main=3 exceeds the number of tasks 2.*1 <= num_main <= 2"):
    mtl.auxiliary(3, num_tasks=2)
  with pytest.raises(ValueError, match="num_main=3 exceeds the number of tasks 2"):
    _update(mtl.auxiliary(3), np.ones((2, 2)))
  with pytest.raises(ValueError, match="mode must be one of"):
    mtl.auxiliary(1, "weighted")
