"""A method on the gradients of the log losses."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl as mtl


def loss_fn(params, x):
  pred = x @ params["w"]
  return jnp.stack([jnp.mean((pred - 3.0) ** 2), 40.0 * jnp.mean(pred ** 2) + 1.0,
                    jnp.mean(jnp.abs(pred + 1.0))])


@pytest.mark.parametrize("make", [mtl.mgda, lambda: mtl.cagrad(c=0.4),
                                  lambda: mtl.pcgrad(seed=3)],
                         ids=["mgda", "cagrad", "pcgrad"])
def test_equals_the_method_on_the_jacobian_of_the_log_losses(make):
  params = {"w": jax.random.normal(jax.random.key(0), (4, 2))}
  x = jax.random.normal(jax.random.key(1), (8, 4))
  losses, task_grads = mtl.value_and_jacobian(loss_fn)(params, x)
  _, log_grads = mtl.value_and_jacobian(
      lambda p, x: jnp.log(loss_fn(p, x)))(params, x)

  tx = mtl.on_log_losses(make())
  out, _ = tx.update(task_grads, tx.init(params), params, losses=losses)
  reference = make()
  expected, _ = reference.update(log_grads, reference.init(params), params)
  np.testing.assert_allclose(out["w"], expected["w"], rtol=2e-5, atol=1e-6)


def test_a_loss_in_other_units_changes_nothing():
  params = {"w": jax.random.normal(jax.random.key(2), (4, 2))}
  x = jax.random.normal(jax.random.key(3), (8, 4))
  tx = mtl.on_log_losses(mtl.mgda(), num_tasks=3)
  losses, grads = mtl.value_and_jacobian(loss_fn)(params, x)
  units = jnp.array([1.0, 1e3, 1e-2])
  out, _ = tx.update(grads, tx.init(params), params, losses=losses)
  rescaled, state = tx.update(mtl.scale_tasks(units, grads), tx.init(params),
                              params, losses=units * losses)
  np.testing.assert_allclose(rescaled["w"], out["w"], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(optax.tree.get(state[0], "task_weights"),
                             1.0 / (units * losses), rtol=1e-6)


def test_needs_the_losses():
  tx = mtl.on_log_losses(mtl.mgda())
  with pytest.raises(TypeError, match="losses="):
    tx.update(jnp.ones((2, 3)), tx.init(None))
