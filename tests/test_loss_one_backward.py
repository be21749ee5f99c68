"""The one-backward path gives the stacked path's updates and states."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_mtl as mtl

T = 3


def init_params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w1": 0.5 * jax.random.normal(k1, (4, 8)),
          "w2": 0.5 * jax.random.normal(k2, (8, T))}


def loss_fn(params, x, y):
  pred = jnp.tanh(x @ params["w1"]) @ params["w2"]
  # Per-task losses of very different scales, all positive.
  return jnp.mean((pred - y) ** 2, axis=0) * jnp.array([1.0, 5.0, 0.2]) + 1e-3


def batches(steps):
  key = jax.random.key(1)
  for _ in range(steps):
    key, kx, ky = jax.random.split(key, 3)
    yield jax.random.normal(kx, (16, 4)), jax.random.normal(ky, (16, T))


KPIS = jnp.array([0.3, 0.6, 0.95])
WEIGHTINGS = {
    "initial": lambda: mtl.scale_by_initial_loss(num_tasks=T),
    "prior": lambda: mtl.scale_by_prior_loss(jnp.array([1.0, 20.0, 0.05])),
    "realtime": mtl.scale_by_realtime_loss,
    "uncertainty": lambda: mtl.scale_by_uncertainty(num_tasks=T, learning_rate=0.1),
    "dwa": lambda: mtl.scale_by_dwa(num_tasks=T, period=2),
    "dtp": lambda: mtl.scale_by_dtp(2.0, num_tasks=T, smoothing=0.3),
    "random": lambda: mtl.scale_by_random(5),
    "geometric": mtl.scale_by_geometric_loss,
    "imtl_l": lambda: mtl.scale_by_imtl_l(num_tasks=T, learning_rate=0.1),
    "famo": lambda: mtl.scale_by_famo(num_tasks=T),
    "uncertainty_alias_with_priorities": lambda: mtl.uncertainty_weighting(
        num_tasks=T, priorities=jnp.array([2.0, 1.0, 0.5])),
}


def close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                               rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(WEIGHTINGS))
def test_one_backward_matches_stacked_path(name):
  weighting = WEIGHTINGS[name]()
  # The stacked path runs optax.chain; the one-backward path reads the same
  # members through mtl.chain (their states have the same structure).
  alias = name.endswith("priorities")
  stacked = weighting if alias else optax.chain(weighting, mtl.sum())
  fused = weighting if alias else mtl.chain(weighting, mtl.sum())
  opt = optax.sgd(0.02)

  @jax.jit
  def stacked_step(params, states, x, y):
    w_state, o_state = states
    losses, grads = mtl.value_and_jacobian(loss_fn)(params, x, y)
    update, w_state = stacked.update(grads, w_state, params, losses=losses, kpis=KPIS)
    update, o_state = opt.update(update, o_state, params)
    return optax.apply_updates(params, update), (w_state, o_state)

  one = mtl.value_and_weighted_grad(loss_fn, fused)

  @jax.jit
  def one_backward_step(params, states, x, y):
    w_state, o_state = states
    _, grads, w_state = one(w_state, params, x, y, weighting_args={"kpis": KPIS})
    update, o_state = opt.update(grads, o_state, params)
    return optax.apply_updates(params, update), (w_state, o_state)

  params = init_params()
  a = (params, (stacked.init(params), opt.init(params)))
  b = (params, (stacked.init(params), opt.init(params)))
  for x, y in batches(5):
    a = stacked_step(*a, x, y)
    b = one_backward_step(*b, x, y)
    # Float32 sums in a different order (T backward passes and a weighted
    # combination against one weighted backward pass).
    close(a, b, rtol=1e-4, atol=1e-5)
  assert not np.allclose(a[0]["w1"], params["w1"])


def test_loss_weights_of_scaling_and_alias():
  losses = jnp.array([2.0, 4.0, 0.5])
  realtime = mtl.scale_by_realtime_loss()
  w, _ = mtl.loss_weights(realtime, realtime.init(None), losses)
  np.testing.assert_allclose(w, [0.5, 0.25, 2.0])
  alias = mtl.realtime_loss_weighting(priorities=jnp.array([1.0, 2.0, 4.0]))
  w, _ = mtl.loss_weights(alias, alias.init(None), losses)
  np.testing.assert_allclose(w, [0.5, 0.5, 8.0])


def test_weighted_loss_in_value_and_grad():
  weighting = mtl.scale_by_geometric_loss()
  x, y = next(batches(1))
  params = init_params()

  def scalar_loss(p):
    return mtl.weighted_loss(weighting, weighting.init(None), loss_fn(p, x, y))

  (loss, (weights, _)), grads = jax.value_and_grad(scalar_loss, has_aux=True)(params)
  losses, task_grads = mtl.value_and_jacobian(loss_fn)(params, x, y)
  stacked = optax.chain(weighting, mtl.sum())
  reference, _ = stacked.update(task_grads, stacked.init(params), params,
                                losses=losses)
  close(grads, reference)
  np.testing.assert_allclose(loss, jnp.sum(weights * losses), rtol=1e-6)


def test_weighted_loss_with_nnx():
  model = nnx.Linear(4, T, rngs=nnx.Rngs(0))
  weighting = mtl.scale_by_realtime_loss()
  x, y = next(batches(1))

  def per_task(m):
    return jnp.mean((m(x) - y) ** 2, axis=0)

  def scalar_loss(m):
    return mtl.weighted_loss(weighting, weighting.init(None), per_task(m))

  (_, _), grads = nnx.value_and_grad(scalar_loss, has_aux=True)(model)
  expected = nnx.grad(lambda m: jnp.sum(jnp.log(per_task(m))))(model)
  close(grads, expected, rtol=1e-5)


def test_has_aux_and_argnums():
  weighting = mtl.scale_by_realtime_loss()

  def fn(scale, params, x, y):
    return loss_fn(params, x, y) * scale, {"mean": jnp.mean(x)}

  x, y = next(batches(1))
  params = init_params()
  step = mtl.value_and_weighted_grad(fn, weighting, argnums=(0, 1), has_aux=True)
  (losses, aux), (g_scale, g_params), _ = step(weighting.init(None), 2.0, params, x, y)
  # d/dscale sum_t L_t(scale)/L_t = sum_t 1/scale = T/2.
  np.testing.assert_allclose(g_scale, T / 2.0, rtol=1e-5)
  np.testing.assert_allclose(aux["mean"], jnp.mean(x))
  assert jax.tree.structure(g_params) == jax.tree.structure(params)
  assert losses.shape == (T,)


def test_one_backward_errors():
  x, y = next(batches(1))
  params = init_params()
  regrouping = optax.chain(mtl.scale_by_realtime_loss(),
                           optax.stateless(lambda u, p: {"tasks": u}))
  with pytest.raises(TypeError, match="one of optax_mtl.s.*no optimizer"):
    mtl.value_and_weighted_grad(loss_fn, regrouping)(
        regrouping.init(params), params, x, y)
  weighting = mtl.scale_by_realtime_loss()
  with pytest.raises(ValueError, match="shape \\(T,\\)"):
    mtl.value_and_weighted_grad(lambda p: jnp.sum(loss_fn(p, x, y)), weighting)(
        weighting.init(None), params)
  with pytest.raises(ValueError, match="argnums=2"):
    mtl.value_and_weighted_grad(loss_fn, weighting, argnums=2)(
        weighting.init(None), params)
  with pytest.raises(ValueError, match="must be > 0"):
    mtl.loss_weights(weighting, weighting.init(None), jnp.array([1.0, 0.0]))


@pytest.mark.parametrize("method", [
    lambda: mtl.mgda(), lambda: mtl.scale_by_gradnorm(num_tasks=T),
    lambda: mtl.chain(mtl.scale_by_realtime_loss(), mtl.pcgrad())],
    ids=["mgda", "gradnorm", "chain_with_pcgrad"])
def test_methods_reading_gradients_are_refused_with_the_path_to_use(method):
  tx = method()
  with pytest.raises(ValueError, match=r"reads the (gramian|norms).*mtl.value_and_jacobian"):
    mtl.loss_weights(tx, tx.init(None), jnp.ones(T))


def test_shared_mask_is_refused():
  tx = mtl.realtime_loss_weighting(priorities=jnp.ones(T), shared={"w1": True, "w2": False})
  with pytest.raises(ValueError, match="shared="):
    mtl.loss_weights(tx, tx.init(None), jnp.ones(T))


def test_value_and_weighted_grad_with_nnx_module():
  # The module's parameters are differentiated once; the update equals the
  # stacked path's, and BatchNorm statistics advance once, as in one forward.
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(4, T, rngs=rngs)
      self.norm = nnx.BatchNorm(T, rngs=rngs)
    def __call__(self, x):
      return self.norm(self.linear(x))

  x, y = next(batches(1))
  per_task = lambda m, x, y: jnp.mean((m(x) - y) ** 2, axis=0)
  weighting = mtl.scale_by_realtime_loss()
  one, stacked = Net(nnx.Rngs(0)), Net(nnx.Rngs(0))
  losses, grads, _ = mtl.value_and_weighted_grad(per_task, weighting)(
      weighting.init(None), one, x, y)
  ref_losses, task_grads = mtl.value_and_jacobian(per_task)(stacked, x, y)
  reference, _ = mtl.realtime_loss_weighting().update(
      task_grads, weighting.init(None), losses=ref_losses)
  close(losses, ref_losses)
  close(grads, reference, rtol=1e-5)
  close(nnx.state(one, nnx.BatchStat), nnx.state(stacked, nnx.BatchStat))
  assert not np.allclose(one.norm.mean[...], 0.0)
