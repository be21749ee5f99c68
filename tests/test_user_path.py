"""The paths users take: optax chains, inject_hyperparams, MultiSteps, Flax NNX."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_mtl as mtl


def two_task_losses(params, x):
  pred = x @ params["w"]
  return jnp.stack([jnp.mean((pred - 1.0) ** 2), jnp.mean((pred + 0.5 * x[:, 0]) ** 2)])


PARAMS = {"w": jnp.array([0.3, -0.2, 0.1])}
X = jax.random.normal(jax.random.key(0), (8, 3))


def test_mean_then_adam_equals_adam_on_mean_loss():
  tx = optax.chain(mtl.mean(), optax.adam(1e-2))
  reference = optax.adam(1e-2)
  params, ref_params = PARAMS, PARAMS
  state, ref_state = tx.init(params), reference.init(ref_params)
  for _ in range(5):
    losses, task_grads = mtl.value_and_jacobian(two_task_losses)(params, X)
    updates, state = tx.update(task_grads, state, params, losses=losses)
    params = optax.apply_updates(params, updates)
    grads = jax.grad(lambda p: jnp.mean(two_task_losses(p, X)))(ref_params)
    ref_updates, ref_state = reference.update(grads, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, ref_updates)
  np.testing.assert_allclose(params["w"], ref_params["w"], rtol=1e-5)


def test_weighted_equals_gradient_of_weighted_loss():
  weights = jnp.array([2.0, 0.25])
  _, task_grads = mtl.value_and_jacobian(two_task_losses)(PARAMS, X)
  tx = mtl.weighted(weights)
  out, _ = tx.update(task_grads, tx.init(PARAMS), PARAMS)
  expected = jax.grad(lambda p: jnp.dot(weights, two_task_losses(p, X)))(PARAMS)
  np.testing.assert_allclose(out["w"], expected["w"], rtol=1e-5)


def test_inject_hyperparams_changes_weights_during_training():
  tx = optax.inject_hyperparams(mtl.weighted)(weights=jnp.array([1.0, 0.0]))
  state = tx.init(PARAMS)
  _, task_grads = mtl.value_and_jacobian(two_task_losses)(PARAMS, X)
  update = jax.jit(tx.update)
  first, state = update(task_grads, state, PARAMS)
  np.testing.assert_allclose(first["w"], task_grads["w"][0], rtol=1e-6)
  state.hyperparams["weights"] = jnp.array([0.0, 1.0])
  second, state = update(task_grads, state, PARAMS)
  np.testing.assert_allclose(second["w"], task_grads["w"][1], rtol=1e-6)


def test_inject_hyperparams_forwards_losses():
  # A method needing losses still receives them through inject_hyperparams.
  seen = {}
  def rule(inputs, state):
    seen["losses"] = inputs.losses
    return jnp.ones(inputs.num_tasks), state
  factory = lambda scale: optax.chain(
      mtl.aggregator(mtl.Weighting("probe", rule, reads={"losses"})), optax.scale(scale))
  tx = optax.inject_hyperparams(factory)(scale=2.0)
  _, task_grads = mtl.value_and_jacobian(two_task_losses)(PARAMS, X)
  tx.update(task_grads, tx.init(PARAMS), PARAMS, losses=jnp.array([3.0, 4.0]))
  np.testing.assert_allclose(seen["losses"], [3.0, 4.0])


def test_multisteps_after_the_aggregator_accumulates_updates():
  # Accumulation belongs after the aggregator: it then stores one update per
  # mini-batch, not T stacked gradients, and the aggregator sees each batch's
  # own gradients and losses.
  k = 3
  tx = optax.chain(mtl.mean(),
                   optax.MultiSteps(optax.sgd(0.1), every_k_schedule=k).gradient_transformation())
  state = tx.init(PARAMS)
  xs = [jax.random.normal(jax.random.key(i), (8, 3)) for i in range(k)]
  params = PARAMS
  means = []
  for x in xs:
    losses, task_grads = mtl.value_and_jacobian(two_task_losses)(params, x)
    means.append(jax.tree.map(lambda g: g.mean(0), task_grads))
    updates, state = tx.update(task_grads, state, params, losses=losses)
    if len(means) < k:
      assert not np.any(np.asarray(updates["w"]))
  expected = -0.1 * np.mean([m["w"] for m in means], axis=0)
  np.testing.assert_allclose(updates["w"], expected, rtol=1e-5)


def test_nnx_optimizer_update_forwards_losses():
  seen = {}
  def rule(inputs, state):
    seen["losses"] = inputs.losses
    return jnp.full(inputs.num_tasks, 0.5), state

  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  def loss_fn(model, x):
    y = model(x)
    return jnp.stack([jnp.mean(y[:, 0] ** 2), jnp.mean((y[:, 1] - 1.0) ** 2)])

  tx = optax.chain(mtl.aggregator(mtl.Weighting("probe", rule, reads={"losses"})), optax.sgd(0.1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
  losses, grads = mtl.value_and_jacobian(loss_fn)(model, X)
  optimizer.update(model, grads, losses=losses)
  np.testing.assert_allclose(seen["losses"], losses, rtol=1e-6)
  after = nnx.state(model, nnx.Param)
  expected = jax.tree.map(lambda p, g: p - 0.1 * 0.5 * g.sum(0), before, grads)
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_nnx_optimizer_without_losses_for_a_method_that_needs_them():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  tx = mtl.aggregator(mtl.Weighting(
      "probe", lambda i, s: (jnp.ones(i.num_tasks), s), reads={"losses"}))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  _, grads = mtl.value_and_jacobian(lambda m, x: jnp.stack([m(x).sum(), m(x).mean()]))(model, X)
  with pytest.raises(TypeError, match=r"optimizer.update\(model, grads, losses=losses\)"):
    optimizer.update(model, grads)


def test_shared_mask_callable_on_nnx_params():
  class TwoHeads(nnx.Module):
    def __init__(self, rngs):
      self.trunk = nnx.Linear(3, 4, rngs=rngs)
      self.heads = nnx.Linear(4, 2, rngs=rngs)
    def __call__(self, x):
      return self.heads(nnx.relu(self.trunk(x)))

  def loss_fn(model, x):
    y = model(x)
    return jnp.stack([jnp.mean(y[:, 0] ** 2), jnp.mean((y[:, 1] - 1.0) ** 2)])

  def shared(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "heads" not in jax.tree_util.keystr(path), params)

  model = TwoHeads(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(mtl.mean(shared=shared), optax.sgd(1.0)),
                            wrt=nnx.Param)
  before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
  _, grads = mtl.value_and_jacobian(loss_fn)(model, X)
  optimizer.update(model, grads)
  after = nnx.state(model, nnx.Param)
  np.testing.assert_allclose(after["heads"]["kernel"][...],
                             before["heads"]["kernel"][...] - grads["heads"]["kernel"][...].sum(0),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(after["trunk"]["kernel"][...],
                             before["trunk"]["kernel"][...] - grads["trunk"]["kernel"][...].mean(0),
                             rtol=1e-5, atol=1e-7)


def test_shared_mask_errors():
  task_grads = {"a": jnp.ones((2, 3)), "b": jnp.ones((2,))}
  with pytest.raises(ValueError, match=r"no entry for gradient leaf \['b'\]"):
    mtl.mean(shared={"a": True, "c": False}).update(task_grads, mtl.mean().init(None))
  with pytest.raises(ValueError, match="without params"):
    mtl.mean(shared=lambda p: p).update(task_grads, mtl.mean().init(None))
  with pytest.raises(ValueError, match="must be a Python bool"):
    mtl.mean(shared={"a": "yes", "b": True}).update(task_grads, mtl.mean().init(None))


def test_weighted_errors():
  with pytest.raises(ValueError, match="one entry per task"):
    mtl.weighted(jnp.ones((2, 2)))
  with pytest.raises(ValueError, match="finite"):
    mtl.weighted(jnp.array([1.0, jnp.nan]))
  with pytest.raises(ValueError, match=r"built for 2 tasks \(len\(weights\)\).*T=3"):
    mtl.weighted(jnp.ones(2)).update({"w": jnp.ones((3, 4))}, mtl.weighted(jnp.ones(2)).init(None))
