"""Conflict diagnostics: hand-worked numbers, the state option, no extra pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl as mtl

SQRT2 = np.sqrt(2.0)


def three_tasks():
  # g0 = (1, 0), g1 = (-1, 1), g2 = (0, 3), split over two leaves.
  return {"a": jnp.array([[1.0], [-1.0], [0.0]]), "b": jnp.array([[0.0], [1.0], [3.0]])}


def test_hand_worked_three_tasks():
  d = mtl.conflict_diagnostics(three_tasks())
  np.testing.assert_allclose(d.task_norms, [1.0, SQRT2, 3.0], rtol=1e-6)
  cos = np.array([[1.0, -1 / SQRT2, 0.0], [-1 / SQRT2, 1.0, 1 / SQRT2],
                  [0.0, 1 / SQRT2, 1.0]])
  np.testing.assert_allclose(d.task_cosines, cos, atol=1e-6)
  assert float(d.conflict_fraction) == pytest.approx(1 / 3)  # 1 pair of 3
  np.testing.assert_array_equal(d.most_conflicting_pair, [0, 1])
  assert float(d.most_conflicting_cosine) == pytest.approx(-1 / SQRT2, rel=1e-6)
  assert float(d.norm_ratio) == pytest.approx(3.0, rel=1e-6)


def test_from_a_gramian_or_a_mask_equals_from_the_gradients():
  grads = three_tasks()
  flat = np.concatenate([np.asarray(grads["a"]), np.asarray(grads["b"])], axis=1)
  from_matrix = mtl.conflict_diagnostics(jnp.asarray(flat @ flat.T))
  from_gramian = mtl.conflict_diagnostics(mtl.gramian(grads))
  direct = mtl.conflict_diagnostics(grads)
  for other in (from_matrix, from_gramian):
    for x, y in zip(other, direct):
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  # Only leaf "b": g0 = 0 there, g1 and g2 point the same way.
  only_b = mtl.conflict_diagnostics(grads, shared={"a": False, "b": True})
  assert float(only_b.conflict_fraction) == 0.0
  np.testing.assert_allclose(only_b.task_cosines,
                             [[0, 0, 0], [0, 1, 1], [0, 1, 1]], atol=1e-6)
  assert float(only_b.norm_ratio) == pytest.approx(3.0, rel=1e-6)
  with pytest.raises(ValueError, match="must be square"):
    mtl.conflict_diagnostics(jnp.ones((2, 3)))


def test_zero_gradients_one_task_and_extreme_scales_are_finite():
  zero_task = {"w": jnp.array([[0.0, 0.0], [2.0, 0.0], [0.0, -1.0]])}
  d = mtl.conflict_diagnostics(zero_task)
  np.testing.assert_allclose(d.task_cosines[0], [0.0, 0.0, 0.0])
  assert float(d.norm_ratio) == pytest.approx(2.0)  # over the nonzero ones
  assert float(d.conflict_fraction) == 0.0
  all_zero = mtl.conflict_diagnostics({"w": jnp.zeros((3, 4))})
  assert float(all_zero.norm_ratio) == 1.0 and float(all_zero.conflict_fraction) == 0.0
  one = mtl.conflict_diagnostics({"w": jnp.array([[3.0, 4.0]])})
  np.testing.assert_array_equal(one.most_conflicting_pair, [0, 0])
  assert float(one.most_conflicting_cosine) == 1.0 and float(one.norm_ratio) == 1.0
  for scale in (1e-20, 1e20):
    grads = jax.tree.map(lambda g: g * scale, three_tasks())
    d = mtl.conflict_diagnostics(grads)
    assert all(np.all(np.isfinite(np.asarray(x, np.float64))) for x in d)
    assert float(d.norm_ratio) == pytest.approx(3.0, rel=1e-5)
    np.testing.assert_allclose(d.task_norms, scale * np.array([1.0, SQRT2, 3.0]),
                               rtol=1e-5)


PARAMS = {"a": jnp.zeros((1,)), "b": jnp.zeros((1,))}


@pytest.mark.parametrize("make", [
    lambda: mtl.mgda(num_tasks=3),
    lambda: mtl.dwa(num_tasks=3),
    lambda: mtl.chain(mtl.normalize_gradients(num_tasks=3), mtl.upgrad()),
    lambda: mtl.scale_by_realtime_loss(num_tasks=3),
], ids=["mgda", "dwa", "chain", "scaling"])
def test_state_keeps_the_diagnostics_and_the_update_is_unchanged(make):
  grads, losses = three_tasks(), jnp.array([1.0, 2.0, 3.0])
  plain, kept = make(), mtl.with_diagnostics(make())
  want, want_state = plain.update(grads, plain.init(PARAMS), PARAMS, losses=losses)
  got, state = jax.jit(kept.update)(grads, kept.init(PARAMS), PARAMS, losses=losses)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  assert isinstance(state, mtl.DiagnosedState)
  for x, y in zip(jax.tree.leaves(state.method_state), jax.tree.leaves(want_state)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  expected = mtl.conflict_diagnostics(grads)
  chained = optax.chain(kept, optax.sgd(0.1))
  _, outer = chained.update(grads, chained.init(PARAMS), PARAMS, losses=losses)
  np.testing.assert_allclose(optax.tree.get(outer, "task_cosines"),
                             expected.task_cosines, atol=1e-6)
  np.testing.assert_allclose(state.conflict.norm_ratio, expected.norm_ratio, rtol=1e-6)


def test_a_gramian_method_pays_no_extra_pass():
  grads = {"a": jnp.ones((3, 40)), "b": jnp.ones((3, 20))}
  params = {"a": jnp.zeros(40), "b": jnp.zeros(20)}

  def contractions(tx):
    update = lambda g: tx.update(g, tx.init(params), params, losses=jnp.ones(3))[0]
    return str(jax.make_jaxpr(update)(grads)).count("dot_general")
  for make in (lambda: mtl.mgda(num_tasks=3), lambda: mtl.upgrad(num_tasks=3)):
    assert contractions(mtl.with_diagnostics(make())) == contractions(make())
  # A norm-only method gets the Gramian in its own statistics pass: one
  # contraction per leaf more, and as many in the rescue branch of the
  # statistics (a cond taken only for out-of-range gradients).
  make = lambda: mtl.chain(mtl.normalize_gradients(num_tasks=3), mtl.sum())
  assert contractions(mtl.with_diagnostics(make())) == contractions(make()) + 2 * len(grads)


def test_a_skipped_step_keeps_the_previous_diagnostics():
  tx = mtl.with_diagnostics(mtl.mgda(num_tasks=3))
  _, state = tx.update(three_tasks(), tx.init(PARAMS), PARAMS)
  bad = jax.tree.map(lambda g: g.at[1, 0].set(jnp.nan), three_tasks())
  out, skipped = tx.update(bad, state, PARAMS)
  assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(out))
  for x, y in zip(skipped.conflict, state.conflict):
    np.testing.assert_array_equal(x, y)


def test_gradient_paths_keep_diagnostics_or_refuse():
  def loss_fn(params, x):
    # Positive losses (DWA takes their ratios); tasks 0 and 2 pull apart.
    return jnp.stack([jnp.exp(jnp.sum(params["w"] * x)), jnp.sum(params["w"] ** 2),
                      jnp.exp(-jnp.sum(params["w"] * x))])
  params, x = {"w": jnp.array([1.0, 2.0])}, jnp.array([0.5, -1.0])
  tx = mtl.with_diagnostics(mtl.dwa(num_tasks=3))
  _, grads, state = mtl.value_and_gramian_grad(loss_fn, tx)(tx.init(params), params, x)
  task_grads = mtl.value_and_jacobian(loss_fn)(params, x)[1]
  want = mtl.conflict_diagnostics(task_grads)
  np.testing.assert_allclose(state.conflict.task_cosines, want.task_cosines, atol=1e-6)
  assert float(state.conflict.most_conflicting_cosine) == pytest.approx(-1.0, abs=1e-6)
  with pytest.raises(ValueError, match="does not compute it"):
    mtl.value_and_weighted_grad(loss_fn, tx)(tx.init(params), params, x)


def test_errors():
  with pytest.raises(ValueError, match="num_tasks=T"):
    mtl.with_diagnostics(mtl.mgda())
  with pytest.raises(TypeError, match="expected a method of optax_mtl"):
    mtl.with_diagnostics(optax.adam(1e-3))
  kept = mtl.with_diagnostics(mtl.mgda(num_tasks=2))
  with pytest.raises(TypeError, match="apply it once"):
    mtl.with_diagnostics(kept)
  with pytest.raises(TypeError, match="whole chain"):
    mtl.chain(mtl.scale_by_realtime_loss(), kept)
  with pytest.raises(TypeError, match="DiagnosedState"):
    kept.update({"w": jnp.ones((2, 3))}, mtl.mgda(num_tasks=2).init(None))
