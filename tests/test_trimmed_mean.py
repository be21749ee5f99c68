"""The coordinate-wise trimmed mean and the core's coordinate-wise aggregators."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl as mtl


def reference(stack, trim):
  ordered = np.sort(np.asarray(stack, np.float64), axis=0)
  return ordered[trim:stack.shape[0] - trim].mean(axis=0)


@pytest.mark.parametrize("num_tasks,trim", [(1, 0), (4, 1), (7, 2), (7, 3)])
def test_matches_sorting_each_coordinate(num_tasks, trim):
  grads = {"a": jax.random.normal(jax.random.key(0), (num_tasks, 5, 3)),
           "b": jax.random.normal(jax.random.key(1), (num_tasks, 2))}
  tx = mtl.trimmed_mean(trim)
  out, _ = tx.update(grads, tx.init(None))
  for name in grads:
    np.testing.assert_allclose(out[name], reference(grads[name], trim),
                               rtol=1e-6, atol=1e-6)


def test_zero_trim_is_the_mean():
  grads = jax.random.normal(jax.random.key(2), (5, 9))
  tx = mtl.trimmed_mean(0)
  np.testing.assert_allclose(tx.update(grads, tx.init(None))[0],
                             grads.mean(0), rtol=1e-6, atol=1e-7)


def test_outliers_leave_the_range_of_the_honest_tasks():
  honest = jax.random.normal(jax.random.key(3), (5, 100))
  outliers = jnp.stack([1e6 * jnp.ones(100), -1e6 * jnp.ones(100)])
  grads = jnp.concatenate([honest, outliers])
  tx = mtl.trimmed_mean(2)
  out, _ = tx.update(grads, tx.init(None))
  assert np.all(out >= honest.min(0) - 1e-6) and np.all(out <= honest.max(0) + 1e-6)


def test_after_a_task_scaling_the_trim_sees_the_scaled_gradients():
  grads = jnp.array([[1.0, 4.0], [2.0, -1.0], [8.0, 0.5]])
  losses = jnp.array([1.0, 2.0, 4.0])
  fused = mtl.chain(mtl.scale_by_realtime_loss(), mtl.trimmed_mean(1))
  plain = optax.chain(mtl.scale_by_realtime_loss(), mtl.trimmed_mean(1))
  out, _ = fused.update(grads, fused.init(None), losses=losses)
  expected, _ = plain.update(grads, plain.init(None), losses=losses)
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  np.testing.assert_allclose(out, [1.0, 0.125], rtol=1e-6)


def test_bfloat16_is_sorted_in_float32_and_returned_in_bfloat16():
  grads = jax.random.normal(jax.random.key(4), (5, 16)).astype(jnp.bfloat16)
  tx = mtl.trimmed_mean(1)
  out, _ = tx.update(grads, tx.init(None))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float64),
                             reference(grads.astype(jnp.float32), 1), rtol=1e-2,
                             atol=1e-2)


def test_too_few_tasks_for_the_trim():
  with pytest.raises(ValueError, match=r"trim_number=2 .*trim_number <= 1 for 4 tasks"):
    tx = mtl.trimmed_mean(2)
    tx.update(jnp.ones((4, 3)), tx.init(None))
  with pytest.raises(ValueError, match=r"trim_number <= 1 for 3 tasks"):
    mtl.trimmed_mean(2, num_tasks=3)


@pytest.mark.parametrize("bad,error", [(-1, ValueError), (1.5, TypeError),
                                       (True, TypeError)])
def test_trim_number_is_a_nonnegative_python_int(bad, error):
  with pytest.raises(error, match="trim_number"):
    mtl.trimmed_mean(bad)


def test_paths_without_the_task_gradients_refuse_it():
  def loss_fn(params):
    return jnp.stack([jnp.sum(params ** 2), jnp.sum(params)])
  tx = mtl.trimmed_mean(0)
  with pytest.raises(ValueError, match="coordinate by coordinate.*value_and_jacobian"):
    mtl.value_and_weighted_grad(loss_fn, tx)(tx.init(None), jnp.ones(3))


def test_the_sorting_network_sorts_every_size_up_to_64():
  from optax_mtl._src.methods.gradient import trimmed_mean as lib
  rng = np.random.default_rng(0)
  for size in range(1, 65):
    values = rng.normal(size=(size, 6)).astype(np.float32)
    values[:, :2] = rng.integers(0, 3, size=(size, 2))  # ties
    np.testing.assert_array_equal(np.stack(lib.sorted_slices(list(values))),
                                  np.sort(values, axis=0))
