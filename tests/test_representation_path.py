"""The representation path: methods balance the gradients of the shared features."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_mtl as mtl

T = 3


def encoder_fn(p, x):
  return jnp.tanh(x @ p["w"] + p["b"][None, :])


def heads_fn(h, z, y):
  """Three tasks: two regressions and a softplus loss, on [batch, 4] features."""
  return jnp.stack([
      jnp.mean((z @ h["a"] - y) ** 2),
      jnp.mean((z @ h["b"] + 0.5 * y) ** 2),
      jnp.mean(jax.nn.softplus(z @ h["c"])),
  ])


def problem(seed=0, batch=8):
  keys = jax.random.split(jax.random.key(seed), 6)
  encoder = {"w": jax.random.normal(keys[0], (3, 4)),
             "b": 0.1 * jax.random.normal(keys[1], (4,))}
  heads = {k: jax.random.normal(key, (4,)) for k, key in zip("abc", keys[2:5])}
  x = jax.random.normal(keys[5], (batch, 3))
  y = jnp.sum(x, axis=1)
  return encoder, heads, x, y


def weighted_loss_grads(encoder, heads, x, y, shared_w, head_w):
  """Reference gradients: of sum_t shared_w[t] L_t (encoder), head_w (heads)."""
  def total(w, e, h):
    return jnp.sum(jnp.asarray(w, jnp.float32) * heads_fn(h, encoder_fn(e, x), y))
  return (jax.grad(total, argnums=1)(shared_w, encoder, heads),
          jax.grad(total, argnums=2)(head_w, encoder, heads))


def feature_jacobian(encoder, heads, x, y):
  """[T, batch * features] float64: dL_t/dz by jax.jacrev, not the path's vmap."""
  z = encoder_fn(encoder, x)
  jac = jax.jacrev(lambda z: heads_fn(heads, z, y))(z)
  return np.asarray(jac, np.float64).reshape(T, -1)


def min_norm_by_hand(gram):
  """argmin over the simplex of a^T G a, by enumerating the active sets (KKT)."""
  n = gram.shape[0]
  best, best_value = None, np.inf
  for size in range(1, n + 1):
    for support in itertools.combinations(range(n), size):
      s = list(support)
      kkt = np.zeros((size + 1, size + 1))
      kkt[:size, :size] = 2 * gram[np.ix_(s, s)]
      kkt[:size, size] = kkt[size, :size] = 1.0
      rhs = np.zeros(size + 1)
      rhs[size] = 1.0
      sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:size]
      if np.any(sol < -1e-12):
        continue
      alpha = np.zeros(n)
      alpha[s] = sol
      value = alpha @ gram @ alpha
      if value < best_value - 1e-15:
        best, best_value = alpha, value
  return best


def assert_trees_close(got, want, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


# (1) Fixed weights: exact identities with jax.grad.

def test_sum_is_the_gradient_of_the_summed_loss():
  encoder, heads, x, y = problem()
  tx = mtl.sum()
  step = jax.jit(mtl.value_and_representation_grad(encoder_fn, heads_fn, tx))
  losses, (enc_g, head_g), _ = step(tx.init(None), encoder, heads, x, y)
  np.testing.assert_allclose(losses, heads_fn(heads, encoder_fn(encoder, x), y),
                             rtol=1e-6)
  want_enc, want_heads = jax.grad(
      lambda e, h: jnp.sum(heads_fn(h, encoder_fn(e, x), y)), argnums=(0, 1))(
          encoder, heads)
  assert_trees_close(enc_g, want_enc)
  assert_trees_close(head_g, want_heads)


def test_mean_averages_the_encoder_and_heads_keep_their_task_gradient():
  # As the stacked path with shared= the encoder: the encoder gets the
  # gradient of the mean loss, each head its own task's gradient.
  encoder, heads, x, y = problem(1)
  tx = mtl.mean()
  step = jax.jit(mtl.value_and_representation_grad(encoder_fn, heads_fn, tx))
  _, (enc_g, head_g), _ = step(tx.init(None), encoder, heads, x, y)
  want_enc = jax.grad(lambda e: jnp.mean(heads_fn(heads, encoder_fn(e, x), y)))(encoder)
  want_heads = jax.grad(lambda h: jnp.sum(heads_fn(h, encoder_fn(encoder, x), y)))(heads)
  assert_trees_close(enc_g, want_enc)
  assert_trees_close(head_g, want_heads)


# (2) MGDA on the feature gradients, by hand.

@functools.cache
def mgda_step():
  tx = mtl.mgda(num_tasks=T, tol=1e-9, max_iters=2000)
  return tx, jax.jit(mtl.value_and_representation_grad(encoder_fn, heads_fn, tx))


def test_mgda_weights_are_the_min_norm_point_of_the_feature_gradients():
  encoder, heads, x, y = problem(9)
  tx, step = mgda_step()
  losses, (enc_g, head_g), state = step(tx.init(None), encoder, heads, x, y)

  jac = feature_jacobian(encoder, heads, x, y)
  alpha = min_norm_by_hand(jac @ jac.T)
  assert np.all(alpha > 0.05)  # an interior point of the simplex
  np.testing.assert_allclose(state.task_weights, alpha, atol=2e-4)
  want_enc, want_heads = weighted_loss_grads(encoder, heads, x, y, alpha, np.ones(T))
  assert_trees_close(enc_g, want_enc, rtol=1e-3, atol=1e-4)
  assert_trees_close(head_g, want_heads)
  # The encoder's gradient is the VJP with the path's own weights.
  exact_enc, _ = weighted_loss_grads(encoder, heads, x, y, state.task_weights, np.ones(T))
  assert_trees_close(enc_g, exact_enc)


# (3) Non-conflicting with every task's feature gradient.

@pytest.mark.parametrize("seed", [9, 6, 0])
def test_mgda_direction_conflicts_with_no_task(seed):
  encoder, heads, x, y = problem(seed)
  jac = feature_jacobian(encoder, heads, x, y)
  if seed == 9:
    assert np.min(jac @ jac.sum(0)) < 0  # the plain sum conflicts with a task
  tx, step = mgda_step()
  _, _, state = step(tx.init(None), encoder, heads, x, y)
  direction = np.asarray(state.task_weights, np.float64) @ jac
  scale = np.max(np.sum(jac ** 2, axis=1))
  assert np.all(jac @ direction >= -1e-6 * scale)
  # MGDA's optimality: <d, J_s> >= ||d||^2 for every task.
  assert np.all(jac @ direction >= direction @ direction - 1e-5 * scale)


# (4) Task scalings before the aggregator: D G D, and d-scaled heads.

def test_loss_scaling_then_mgda():
  encoder, heads, x, y = problem(3)
  tx = mtl.chain(mtl.scale_by_realtime_loss(num_tasks=T),
                 mtl.mgda(num_tasks=T, tol=1e-9, max_iters=2000))
  step = jax.jit(mtl.value_and_representation_grad(encoder_fn, heads_fn, tx))
  losses, (enc_g, head_g), state = step(tx.init(None), encoder, heads, x, y)

  d = 1.0 / np.asarray(losses, np.float64)
  jac = feature_jacobian(encoder, heads, x, y)
  scaled = d[:, None] * jac
  alpha = min_norm_by_hand(scaled @ scaled.T)
  np.testing.assert_allclose(state[0].task_weights, d, rtol=1e-5)
  np.testing.assert_allclose(state[1].task_weights, alpha, atol=2e-4)
  np.testing.assert_allclose(mtl.applied_weights(state), d * alpha, rtol=1e-3,
                             atol=1e-4 * np.max(d))
  want_enc, want_heads = weighted_loss_grads(encoder, heads, x, y,
                                             mtl.applied_weights(state), d)
  assert_trees_close(enc_g, want_enc)
  assert_trees_close(head_g, want_heads)  # heads: d_t times their own gradient


# Every method of the library: with the identity as encoder the features are
# the encoder's parameters, so the path is the stacked path with shared= the
# encoder, member by member, state included.

def identity_encoder(p, x):
  del x
  return p


def identity_heads(h, z, x):
  pred = x @ z["v"] + z["u"][None, :]
  return jnp.stack([jnp.mean((pred @ h["a"] - 1.0) ** 2),
                    jnp.mean((pred @ h["b"] + 2.0) ** 2),
                    jnp.mean(jnp.sin(pred) @ h["c"]) + jnp.sum(z["u"] ** 2)])


def encoder_mask(params):
  del params
  return {"enc": True, "heads": False}


METHODS = {
    "pcgrad": lambda m: mtl.pcgrad(seed=3, num_tasks=T, shared=m),
    "cagrad": lambda m: mtl.cagrad(0.4, num_tasks=T, shared=m),
    "gradnorm": lambda m: mtl.gradnorm(num_tasks=T, shared=m),
    "uncertainty_weighting": lambda m: mtl.uncertainty_weighting(num_tasks=T, shared=m),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_identity_encoder_matches_the_stacked_path(name):
  keys = jax.random.split(jax.random.key(7), 5)
  enc = {"u": jax.random.normal(keys[0], (2,)), "v": jax.random.normal(keys[1], (3, 2))}
  heads = {k: jax.random.normal(key, (2,)) for k, key in zip("abc", keys[2:])}
  x = jax.random.normal(jax.random.key(8), (6, 3))
  tx, reference = METHODS[name](None), METHODS[name](encoder_mask)
  params = {"enc": enc, "heads": heads}

  @jax.jit
  def stacked(state):
    losses, task_grads = mtl.value_and_jacobian(
        lambda p: identity_heads(p["heads"], p["enc"], x))(params)
    updates, state = reference.update(task_grads, state, params, losses=losses)
    if reference.kind == "scaling":  # alone, the scaled gradients are summed
      updates = jax.tree.map(lambda g: g.sum(0), updates)
    return updates, state

  step = jax.jit(mtl.value_and_representation_grad(identity_encoder, identity_heads, tx))
  state, ref_state = tx.init(None), reference.init(params)
  for _ in range(2):  # the states evolve alike
    _, (enc_g, head_g), state = step(state, enc, heads, None, x)
    updates, ref_state = stacked(ref_state)
    assert_trees_close(enc_g, updates["enc"], rtol=1e-4, atol=1e-5)
    assert_trees_close(head_g, updates["heads"], rtol=1e-4, atol=1e-5)
    assert_trees_close(state, ref_state, rtol=1e-4, atol=1e-5)


def test_loss_weighting_matches_one_backward_pass():
  encoder, heads, x, y = problem(4)
  tx = mtl.scale_by_uncertainty(num_tasks=T)
  aux_heads = lambda h, z, y: (heads_fn(h, z, y), {"z_mean": jnp.mean(z)})
  step = mtl.value_and_representation_grad(encoder_fn, aux_heads, tx, has_aux=True)
  (losses, aux), (enc_g, head_g), state = step(
      tx.init(None), encoder, heads, x, y)
  one = mtl.value_and_weighted_grad(
      lambda e, h: heads_fn(h, encoder_fn(e, x), y), tx, argnums=(0, 1))
  want_losses, (want_enc, want_heads), want_state = one(tx.init(None), encoder, heads)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
  np.testing.assert_allclose(aux["z_mean"], jnp.mean(encoder_fn(encoder, x)), rtol=1e-6)
  assert_trees_close(enc_g, want_enc)
  assert_trees_close(head_g, want_heads)
  assert_trees_close(state, want_state)


# (5) Flax NNX: BatchNorm and Dropout in the encoder advance once.

class Encoder(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(3, 6, rngs=rngs)
    self.norm = nnx.BatchNorm(6, rngs=rngs)
    self.drop = nnx.Dropout(0.3, rngs=rngs)

  def __call__(self, x):
    return self.drop(nnx.tanh(self.norm(self.linear(x))))


class Heads(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Linear(6, 1, rngs=rngs)
    self.b = nnx.Linear(6, 1, rngs=rngs)

  def __call__(self, z):
    return self.a(z)[:, 0], self.b(z)[:, 0]


def call_encoder(encoder, x):
  return encoder(x)


def nnx_head_losses(heads, z, y):
  a, b = heads(z)
  return jnp.stack([jnp.mean((a - y) ** 2), jnp.mean((b + y) ** 2)])


def nnx_problem():
  rngs = nnx.Rngs(0)
  encoder, heads = Encoder(rngs), Heads(rngs)
  x = jax.random.normal(jax.random.key(1), (16, 3))
  return encoder, heads, x, jnp.sum(x, axis=1)


def non_params(module):
  unwrap = lambda v: (jax.random.key_data(v)
                      if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v)
  return [np.asarray(unwrap(v)) for v in
          jax.tree.leaves(nnx.state(module, nnx.Not(nnx.Param)))]


def test_nnx_modules_with_batchnorm_and_dropout_eager_and_jit():
  encoder, heads, x, y = nnx_problem()
  # Clones: the step updates the modules' variables in place.
  enc_def, enc_state = nnx.split(nnx.clone(encoder))
  head_def, head_state = nnx.split(nnx.clone(heads))
  fresh = lambda: (nnx.merge(enc_def, enc_state, copy=True),
                   nnx.merge(head_def, head_state, copy=True))

  # Reference by hand on copies of the same state: one forward pass (the same
  # Dropout mask), the feature Jacobian, the min-norm weights, nnx.grad.
  @nnx.jit
  def forward_and_jacobian(e, hd):
    z = e(x)
    return jax.jacrev(lambda z: nnx_head_losses(hd, z, y))(z)

  @nnx.jit
  def weighted_grads(e, hd, w):
    return nnx.grad(lambda e, hd: jnp.sum(w * nnx_head_losses(hd, e(x), y)),
                    argnums=(0, 1))(e, hd)

  def weighted(w):
    return weighted_grads(*fresh(), jnp.asarray(w, jnp.float32))

  once, h = fresh()
  jac = np.asarray(forward_and_jacobian(once, h), np.float64).reshape(2, -1)
  alpha = min_norm_by_hand(jac @ jac.T)
  assert np.all(alpha > 1e-3)

  tx = mtl.mgda(num_tasks=2)
  step = mtl.value_and_representation_grad(call_encoder, nnx_head_losses, tx)
  results = []
  for fn in (step, nnx.jit(step)):  # (6) eager and under nnx.jit
    enc, hd = fresh()
    losses, (enc_g, head_g), state = fn(tx.init(None), enc, hd, x, y)
    assert isinstance(enc_g, nnx.State) and isinstance(head_g, nnx.State)
    np.testing.assert_allclose(state.task_weights, alpha, atol=1e-4)
    want_enc, _ = weighted(state.task_weights)
    _, want_heads = weighted(np.ones(2))
    assert_trees_close(enc_g, nnx.state(want_enc, nnx.Param), rtol=1e-4, atol=1e-6)
    assert_trees_close(head_g, nnx.state(want_heads, nnx.Param), rtol=1e-4, atol=1e-6)
    # BatchNorm statistics and the Dropout RNG advanced exactly once.
    for a, b in zip(non_params(enc), non_params(once)):
      np.testing.assert_allclose(a, b, rtol=1e-6)
    assert float(jnp.abs(enc.norm.mean[...]).sum()) > 0
    results.append((losses, enc_g, head_g, state, non_params(enc), non_params(hd)))
  assert_trees_close(results[1], results[0], rtol=1e-5, atol=1e-6)


# (6) jit == eager.

def test_jit_matches_eager_for_pytrees():
  encoder, heads, x, y = problem(5)
  tx = mtl.chain(mtl.scale_by_realtime_loss(), mtl.mgda(num_tasks=2))
  two_tasks = lambda h, z, y: heads_fn(h, z, y)[:2]
  step = mtl.value_and_representation_grad(encoder_fn, two_tasks, tx)
  eager = step(tx.init(None), encoder, heads, x, y)
  jitted = jax.jit(step)(tx.init(None), encoder, heads, x, y)
  assert_trees_close(jitted, eager, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(eager[2][1].task_weights) > 0)


# (7) Errors.

def test_error_not_a_method():
  with pytest.raises(TypeError, match="must be one of optax_mtl's"):
    mtl.value_and_representation_grad(encoder_fn, heads_fn, optax.adam(1e-3))
  with pytest.raises(TypeError, match="no optimizer chained after it"):
    mtl.value_and_representation_grad(encoder_fn, heads_fn,
                                  optax.chain(mtl.mgda(), optax.adam(1e-3)))
  with pytest.raises(TypeError, match="heads_fn must be callable"):
    mtl.value_and_representation_grad(encoder_fn, mtl.mgda(), mtl.mgda())


@pytest.mark.parametrize("method", [
    mtl.mgda(shared=encoder_mask),
    mtl.dwa(num_tasks=T, shared=encoder_mask),
    mtl.chain(mtl.scale_by_realtime_loss(), mtl.pcgrad(shared=encoder_mask)),
])
def test_error_shared_mask(method):
  with pytest.raises(ValueError, match="encoder/heads split replaces the mask"):
    mtl.value_and_representation_grad(encoder_fn, heads_fn, method)


def test_error_statistics_over_a_layer():
  encoder, heads, x, y = problem()
  tx = mtl.chain(mtl.scale_by_gradnorm(num_tasks=T, layer=lambda z: True), mtl.sum())
  step = mtl.value_and_representation_grad(encoder_fn, heads_fn, tx)
  with pytest.raises(ValueError, match="own leaves"):
    step(tx.init(None), encoder, heads, x, y)


def test_error_state_missing_or_misplaced():
  encoder, heads, x, y = problem()
  tx = mtl.mgda()
  step = mtl.value_and_representation_grad(encoder_fn, heads_fn, tx)
  with pytest.raises(TypeError, match="first argument of the step must be the method's state"):
    step(encoder, heads, x, y)


def test_error_losses_not_a_vector():
  encoder, heads, x, y = problem()
  tx = mtl.mgda()
  scalar = mtl.value_and_representation_grad(
      encoder_fn, lambda h, z, y: jnp.sum(heads_fn(h, z, y)), tx)
  with pytest.raises(ValueError, match=r"shape \(T,\).*returned a scalar"):
    scalar(tx.init(None), encoder, heads, x, y)
  no_pair = mtl.value_and_representation_grad(encoder_fn, heads_fn, tx, has_aux=True)
  with pytest.raises(ValueError, match=r"has_aux=True.*\(losses, aux\)"):
    no_pair(tx.init(None), encoder, heads, x, y)


def test_error_wrong_number_of_tasks_and_integer_features():
  encoder, heads, x, y = problem()
  tx = mtl.mgda(num_tasks=2)
  step = mtl.value_and_representation_grad(encoder_fn, heads_fn, tx)
  with pytest.raises(ValueError, match="built for 2 tasks"):
    step(tx.init(None), encoder, heads, x, y)
  tx = mtl.mean()
  step = mtl.value_and_representation_grad(
      lambda p, x: (encoder_fn(p, x), jnp.argmax(x, axis=1)),
      lambda h, z, y: heads_fn(h, z[0], y), tx)
  with pytest.raises(ValueError, match=r"feature \[1\].*dtype int32.*head_args"):
    step(tx.init(None), encoder, heads, x, y)


def test_method_passed_through_nnx_jit_keeps_its_members():
  # nnx.jit rebuilds static pytree arguments: a method survives it.
  encoder, heads, x, y = problem()
  @nnx.jit(static_argnums=0)
  def build_inside(tx, x):
    step = mtl.value_and_representation_grad(encoder_fn, heads_fn, tx)
    return step(tx.init(None), encoder, heads, x, y)[0]
  np.testing.assert_allclose(build_inside(mtl.mean(), x),
                             heads_fn(heads, encoder_fn(encoder, x), y), rtol=1e-6)
