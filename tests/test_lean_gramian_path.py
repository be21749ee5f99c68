"""The memory-lean Gramian path gives the stacked path's Gramian, weights, update and state."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_mtl as mtl

T = 4
SHARED = {"trunk": True, "heads": False}


def init_params(key=0, in_dim=5, hidden=8, tasks=T):
  k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
  return {"trunk": {"w": 0.6 * jax.random.normal(k1, (in_dim, hidden)),
                    "b": 0.1 * jax.random.normal(k2, (hidden,))},
          "heads": 0.6 * jax.random.normal(k3, (hidden, tasks))}


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params["trunk"]["w"] + params["trunk"]["b"][None, :])
  pred = h @ params["heads"]
  # Task losses of different scales; every task reaches the trunk.
  return jnp.mean((pred - y) ** 2, axis=0) * jnp.array([1.0, 4.0, 0.3, 2.0])


def batch(i, n=12, in_dim=5, tasks=T):
  kx, ky = jax.random.split(jax.random.fold_in(jax.random.key(7), i))
  return jax.random.normal(kx, (n, in_dim)), jax.random.normal(ky, (n, tasks))


def close(a, b, rtol=2e-4, atol=1e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype == np.uint32:  # PRNG key data: exactly equal
      np.testing.assert_array_equal(x, y)
    else:
      np.testing.assert_allclose(x.astype(np.float64), y.astype(np.float64),
                                 rtol=rtol, atol=atol)


# name -> (method factory, chunk_size). They run vmapped over the tasks
# (chunk_size=None: eagerly, a lax.map would be compiled at every call); the
# lax.map and chunked loops are covered by the Gramian and jit tests.
METHODS = {
    "mgda_shared": (lambda: mtl.mgda(num_tasks=T, shared=SHARED), None),
    "mgda_l2": (lambda: mtl.mgda("l2", num_tasks=T), None),
    "pcgrad_shared": (lambda: mtl.pcgrad(seed=3, num_tasks=T, shared=SHARED), None),
    "cagrad": (lambda: mtl.cagrad(0.5, num_tasks=T), None),
    "mean_shared": (lambda: mtl.mean(num_tasks=T, shared=SHARED), None),
    "chain_loss_scaling_cagrad": (lambda: mtl.chain(
        mtl.scale_by_realtime_loss(num_tasks=T),
        mtl.cagrad(num_tasks=T, shared=SHARED)), None),
    # Members reading their statistics over different leaves: the scaling
    # over all of them (or its own layer=), the aggregator over the trunk.
    "chain_norms_mgda_shared": (lambda: mtl.chain(
        mtl.normalize_gradients(num_tasks=T),
        mtl.mgda(num_tasks=T, shared=SHARED)), None),
    "chain_gradnorm_layer_pcgrad": (lambda: mtl.chain(
        mtl.scale_by_gradnorm(num_tasks=T, layer={"trunk": {"w": True, "b": False},
                                                  "heads": False}),
        mtl.pcgrad(seed=1, num_tasks=T, shared=SHARED)), None),
    "gradnorm_alias_shared": (lambda: mtl.gradnorm(num_tasks=T, shared=SHARED), None),
    "loss_only_uncertainty": (lambda: mtl.chain(
        mtl.scale_by_uncertainty(num_tasks=T, learning_rate=0.1),
        mtl.sum(shared=SHARED)), None),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_matches_stacked_path_over_steps(name):
  # Eager: the solvers are jitted per shape and shared by both paths, so
  # each is compiled once for the whole suite. jit == eager is tested below.
  factory, chunk_size = METHODS[name]
  tx = factory()
  lean = mtl.value_and_gramian_grad(loss_fn, tx, chunk_size=chunk_size)
  params = init_params()
  a = b = (params, tx.init(params))
  for i in range(2):
    x, y = batch(i)
    losses, task_grads = mtl.value_and_jacobian(loss_fn)(a[0], x, y)
    update_a, state_a = tx.update(task_grads, a[1], a[0], losses=losses)
    losses_b, update_b, state_b = lean(b[1], b[0], x, y)
    np.testing.assert_allclose(losses_b, losses, rtol=1e-6)
    close(update_b, update_a)
    # The new states (task_weights = the applied weights, PRNG keys,
    # learned weights and their optimizer) are the stacked path's.
    close(state_b, state_a)
    a = (optax.apply_updates(a[0], jax.tree.map(lambda u: -0.05 * u, update_a)), state_a)
    b = (optax.apply_updates(b[0], jax.tree.map(lambda u: -0.05 * u, update_b)), state_b)
  close(b[0], a[0])


def test_gramian_equals_stacked_gramian():
  params = init_params()
  x, y = batch(0)
  _, task_grads = mtl.value_and_jacobian(loss_fn)(params, x, y)
  mask = {"trunk": {"w": True, "b": True}, "heads": False}
  for shared, leaf_mask, chunks in ((None, None, (1, None)), (SHARED, mask, (3,))):
    want = mtl.gramian(task_grads, leaf_mask)
    for chunk in chunks:
      losses, got = mtl.value_and_gramian(loss_fn, shared=shared, chunk_size=chunk)(
          params, x, y)
      np.testing.assert_allclose(losses, loss_fn(params, x, y), rtol=1e-6)
      np.testing.assert_allclose(got.scale, want.scale, rtol=1e-5)
      np.testing.assert_allclose(got.normalized, want.normalized, rtol=1e-4, atol=1e-6)
      assert float(jnp.max(jnp.diagonal(got.normalized))) == 1.0
      np.testing.assert_array_equal(got.normalized, got.normalized.T)


@pytest.mark.parametrize("factor", [1e20, 1e-20])
def test_gramian_in_range_for_huge_and_tiny_gradients(factor):
  # G ~ 1e40 (overflows float32) or 1e-40 (underflows): the normalized
  # matrix and the scale are still those of the unscaled problem.
  params = init_params()
  x, y = batch(0)
  _, ref = mtl.value_and_gramian(loss_fn, chunk_size=None)(params, x, y)
  _, got = mtl.value_and_gramian(lambda p, x, y: factor * loss_fn(p, x, y),
                             chunk_size=None)(params, x, y)
  assert np.all(np.isfinite(got.normalized))
  np.testing.assert_allclose(got.normalized, ref.normalized, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got.scale, factor * ref.scale, rtol=1e-4)
  _, task_grads = mtl.value_and_jacobian(lambda p, x, y: factor * loss_fn(p, x, y))(
      params, x, y)
  want = mtl.gramian(task_grads)
  np.testing.assert_allclose(got.normalized, want.normalized, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got.scale, want.scale, rtol=1e-4)


@jax.custom_vjp
def _tanh(v):
  return jnp.tanh(v)


_tanh.defvjp(lambda v: (jnp.tanh(v), v), lambda v, g: (g / jnp.cosh(v) ** 2,))


def _reverse_only_loss(params, x, y):
  # loss_fn through a jax.custom_vjp activation: no forward-mode rule.
  h = _tanh(x @ params["trunk"]["w"] + params["trunk"]["b"][None, :])
  scales = jnp.array([1.0, 4.0, 0.3, 2.0])
  return jnp.mean((h @ params["heads"] - y) ** 2, axis=0) * scales


@pytest.mark.parametrize("factor", [1.0, 1e20, 1e-20])
def test_all_at_once_needs_reverse_mode_only(factor):
  # chunk_size=None takes VJPs only, also when a Gramian out of float32's
  # range is computed again from the unit gradients: a jax.custom_vjp
  # function is fine there, at any scale, with members reading two sets.
  scaled = lambda p, x, y: factor * _reverse_only_loss(p, x, y)
  params = init_params()
  x, y = batch(0)
  _, task_grads = mtl.value_and_jacobian(scaled)(params, x, y)
  mask = {"trunk": {"w": True, "b": True}, "heads": False}
  want = mtl.gramian(task_grads, mask)
  _, got = mtl.value_and_gramian(scaled, shared=SHARED, chunk_size=None)(params, x, y)
  assert np.all(np.isfinite(got.normalized))
  np.testing.assert_allclose(got.normalized, want.normalized, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got.scale, want.scale, rtol=1e-4)
  tx = mtl.chain(mtl.normalize_gradients(num_tasks=T),
                 mtl.mgda(num_tasks=T, shared=SHARED))
  losses, update, state = mtl.value_and_gramian_grad(scaled, tx, chunk_size=None)(
      tx.init(params), params, x, y)
  expected, expected_state = tx.update(task_grads, tx.init(params), params, losses=losses)
  close(jax.tree.map(lambda u: u / factor, update),
        jax.tree.map(lambda u: u / factor, expected), rtol=1e-3)
  close(state, expected_state, rtol=1e-3)


def test_zero_gradients_give_no_nan():
  # T = 4 tasks, as elsewhere: the solvers compiled for that shape are reused.
  w = jnp.array([1.0, -2.0, 0.5])
  one_zero = lambda w: jnp.stack([jnp.sum(w ** 2), 0.0 * jnp.sum(w), jnp.sum(w),
                                  jnp.sum(jnp.sin(w))])
  _, gram = mtl.value_and_gramian(one_zero, chunk_size=None)(w)
  _, task_grads = mtl.value_and_jacobian(one_zero)(w)
  want = mtl.gramian(task_grads)
  np.testing.assert_allclose(gram.normalized, want.normalized, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(gram.scale, want.scale, rtol=1e-6)
  assert np.all(gram.normalized[1] == 0) and np.all(gram.normalized[:, 1] == 0)

  all_zero = lambda w: jnp.stack([0.0 * jnp.sum(w), jnp.sum(jnp.zeros_like(w)),
                                  jnp.zeros(()), 0.0 * w[0]])
  _, gram = mtl.value_and_gramian(all_zero, chunk_size=None)(w)
  np.testing.assert_array_equal(gram.normalized, np.zeros((4, 4)))
  assert float(gram.scale) == 0.0
  for tx in (mtl.mgda(), mtl.pcgrad(), mtl.cagrad(), mtl.mgda("l2")):
    _, grads, _ = mtl.value_and_gramian_grad(all_zero, tx, chunk_size=None)(tx.init(w), w)
    np.testing.assert_array_equal(grads, np.zeros(3))


def test_non_finite_gradient_gives_a_non_finite_scale():
  # As on the stacked path: NaN, never the scale 0 of all-zero gradients.
  w = jnp.array([1.0, -2.0, 0.5])
  losses = lambda w: jnp.stack([jnp.sum(w ** 2), jnp.inf * jnp.sum(w),
                                jnp.sum(jnp.sin(w)), jnp.sum(w)])
  _, task_grads = mtl.value_and_jacobian(losses)(w)
  assert np.isnan(mtl.gramian(task_grads).scale)
  for chunk_size in (1, None):
    _, gram = mtl.value_and_gramian(losses, chunk_size=chunk_size)(w)
    assert np.isnan(gram.scale), chunk_size


def test_only_heads_no_shared_leaves():
  # Every leaf is a head: the Gramian is over nothing, heads are summed.
  tx = mtl.mgda(shared=lambda p: jax.tree.map(lambda _: False, p))
  params, (x, y) = init_params(), batch(0)
  _, grads, _ = mtl.value_and_gramian_grad(loss_fn, tx, chunk_size=None)(
      tx.init(params), params, x, y)
  close(grads, jax.grad(lambda p: loss_fn(p, x, y).sum())(params), rtol=1e-5, atol=1e-7)


def _memory(fn, *args):
  analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
  if analysis is None:
    pytest.skip("memory_analysis() returns None on this backend")
  # Temporaries plus the outputs: the gradients are an output (the summed-loss
  # step writes them straight there), so temp alone would favour it. The
  # arguments (params, batch, a small state) are the same for the three.
  return analysis.temp_size_in_bytes + analysis.output_size_in_bytes


def test_peak_memory_well_below_stacked_and_near_summed_loss():
  tasks, width, depth = 16, 512, 4
  keys = jax.random.split(jax.random.key(0), depth + 1)
  params = {"trunk": [{"w": jax.random.normal(k, (width, width)) / width ** 0.5,
                       "b": jnp.zeros(width)} for k in keys[:-1]],
            "heads": jax.random.normal(keys[-1], (width, tasks)) / width ** 0.5}
  x = jnp.zeros((64, width))
  y = jnp.zeros((64, tasks))

  def mlp_losses(p, x, y):
    h = x
    for layer in p["trunk"]:
      h = jax.nn.relu(h @ layer["w"] + layer["b"][None, :])
    return jnp.mean((h @ p["heads"] - y) ** 2, axis=0)

  # A rule reading the full Gramian but cheap to compile (no solver loop):
  # the memory is the gradients', the T x T solve adds nothing measurable.
  inverse_norms = mtl.Weighting(
      name="inverse_norms", reads={"gramian"},
      rule=lambda inputs, state: (1.0 / jnp.maximum(inputs.norms, 1e-12), state))
  tx = mtl.aggregator(inverse_norms, shared={"trunk": True, "heads": False})
  state = tx.init(params)

  def summed(p, x, y):
    return jax.grad(lambda p: mlp_losses(p, x, y).sum())(p)

  def stacked(p, s, x, y):
    losses, task_grads = mtl.value_and_jacobian(mlp_losses)(p, x, y)
    return tx.update(task_grads, s, p, losses=losses)

  lean = mtl.value_and_gramian_grad(mlp_losses, tx)

  def lean_step(p, s, x, y):
    return lean(s, p, x, y)[1:]

  grad_bytes = sum(l.nbytes for l in jax.tree.leaves(params))  # 4.2 MB
  ls_mem = _memory(summed, params, x, y)
  stacked_mem = _memory(stacked, params, state, x, y)
  lean_mem = _memory(lean_step, params, state, x, y)
  # Measured on CPU (jax 0.10): LS 4.9 MB, stacked 88 MB (16 gradient copies
  # and their Gramian products), lean 12.7 MB (the output, g_t, its unit
  # vector, and the two weighted rows of the last VJP).
  assert stacked_mem > 10 * grad_bytes
  assert lean_mem < 0.2 * stacked_mem, (lean_mem, stacked_mem)
  assert lean_mem < 3 * ls_mem, (lean_mem, ls_mem)


class Net(nnx.Module):
  """A trunk with BatchNorm and Dropout, and T heads."""

  def __init__(self, rngs):
    self.trunk = nnx.Linear(5, 8, rngs=rngs)
    self.norm = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.3, rngs=rngs)
    self.heads = nnx.Linear(8, T, rngs=rngs)

  def __call__(self, x):
    return self.heads(self.drop(nnx.relu(self.norm(self.trunk(x)))))


def net_losses(model, x, y):
  return jnp.mean((model(x) - y) ** 2, axis=0) * jnp.array([1.0, 3.0, 0.5, 2.0])


def test_nnx_module_matches_stacked_path():
  tx = mtl.pcgrad(seed=1, num_tasks=T, shared={"trunk": True, "norm": True,
                                                "heads": False})
  model = Net(nnx.Rngs(0))
  reference = nnx.clone(model)
  x, y = batch(0)

  params = nnx.state(reference, nnx.Param)
  losses_a, task_grads = mtl.value_and_jacobian(net_losses)(reference, x, y)
  want, state_a = tx.update(task_grads, tx.init(params), params, losses=losses_a)

  losses_b, grads, state_b = mtl.value_and_gramian_grad(net_losses, tx, chunk_size=None)(
      tx.init(params), model, x, y)
  assert isinstance(grads, nnx.State)
  np.testing.assert_allclose(losses_b, losses_a, rtol=1e-6)
  close(grads, want)
  close(state_b, state_a)
  # BatchNorm statistics and the Dropout RNG advanced once, as on the stacked path.
  unwrap = lambda v: (jax.random.key_data(v)
                      if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v)
  close(jax.tree.map(unwrap, nnx.state(model, nnx.Not(nnx.Param))),
        jax.tree.map(unwrap, nnx.state(reference, nnx.Not(nnx.Param))))


def test_jit_equals_eager_with_aux_and_argnums_tuple():
  def fn(trunk, heads, x, y):
    losses = loss_fn({"trunk": trunk, "heads": heads}, x, y)
    return losses, {"total": losses.sum()}

  # Norms only (no solver to compile twice); chunk_size=3 with T=4: a lax.map
  # over one chunk of 3 and a remainder of 1.
  tx = mtl.chain(mtl.normalize_gradients(num_tasks=T), mtl.weighted(
      jnp.array([1.0, 0.5, 2.0, 1.0])))
  step = mtl.value_and_gramian_grad(fn, tx, argnums=(0, 1), has_aux=True, chunk_size=3)
  params, (x, y) = init_params(), batch(1)
  args = (tx.init(params), params["trunk"], params["heads"], x, y)
  eager = step(*args)
  jitted = jax.jit(step)(*args)
  close(jitted, eager, rtol=1e-5, atol=1e-6)
  (losses, aux), (g_trunk, g_heads), _ = eager
  assert isinstance(g_trunk, dict) and g_heads.shape == params["heads"].shape
  np.testing.assert_allclose(aux["total"], losses.sum(), rtol=1e-6)
  # Same as the stacked path with a tuple argnums.
  _, task_grads = mtl.value_and_jacobian(fn, argnums=(0, 1), has_aux=True)(
      params["trunk"], params["heads"], x, y)
  want, _ = tx.update(task_grads, tx.init(params), losses=losses)
  close((g_trunk, g_heads), want)


def test_method_args_reach_the_method():
  tx = mtl.chain(mtl.scale_by_dtp(2.0, num_tasks=T), mtl.mgda(num_tasks=T))
  kpis = jnp.array([0.3, 0.6, 0.9, 0.5])
  params, (x, y) = init_params(), batch(2)
  losses, task_grads = mtl.value_and_jacobian(loss_fn)(params, x, y)
  want, want_state = tx.update(task_grads, tx.init(params), params, losses=losses,
                               kpis=kpis)
  _, grads, state = mtl.value_and_gramian_grad(loss_fn, tx, chunk_size=None)(
      tx.init(params), params, x, y, method_args={"kpis": kpis})
  close(grads, want)
  close(state, want_state)


def test_errors():
  with pytest.raises(TypeError, match="optax_mtl"):
    mtl.value_and_gramian_grad(loss_fn, optax.adam(1e-3))
  with pytest.raises(TypeError, match="optax_mtl"):
    mtl.value_and_gramian_grad(loss_fn, optax.chain(mtl.mgda(), optax.sgd(0.1)))
  with pytest.raises(ValueError, match="chunk_size"):
    mtl.value_and_gramian_grad(loss_fn, mtl.mgda(), chunk_size=0)
  params, (x, y) = init_params(), batch(0)
  tx = mtl.mgda()
  with pytest.raises(ValueError, match=r"vector of shape \(T,\).*scalar"):
    mtl.value_and_gramian_grad(lambda p, x, y: loss_fn(p, x, y).sum(), tx)(
        tx.init(params), params, x, y)
  with pytest.raises(ValueError, match=r"vector of shape \(T,\)"):
    mtl.value_and_gramian(lambda p, x, y: jnp.ones((2, 2)) * loss_fn(p, x, y)[0])(
        params, x, y)
  with pytest.raises(ValueError, match="no entry for gradient leaf"):
    bad = mtl.mgda(shared={"trunk": True, "head": False})
    mtl.value_and_gramian_grad(loss_fn, bad)(bad.init(params), params, x, y)

  @jax.custom_vjp
  def square(v):
    return v ** 2
  square.defvjp(lambda v: (v ** 2, v), lambda v, g: (2 * v * g,))
  with pytest.raises(TypeError, match="forward mode.*chunk_size=None.*custom_jvp"):
    mtl.value_and_gramian_grad(lambda w: jnp.stack([square(w).sum(), w.sum()]), tx)(
        tx.init(None), jnp.ones(2))


def test_all_at_once_update_reuses_held_kernel_gradients():
  # With chunk_size=None the convolution kernels' T gradients are computed for
  # their Gramian blocks; the update takes them (sum_t w_t g_t) instead of a
  # weighted backward pass through the convolutions: the compiled step holds
  # exactly the Gramian's convolutions, and gives the same update.
  k = jax.random.split(jax.random.key(3), 5)
  params = {"trunk": {"k1": 0.5 * jax.random.normal(k[0], (3, 3, 2, 4)),
                      "k2": 0.5 * jax.random.normal(k[1], (3, 3, 4, 4))},
            "heads": 0.5 * jax.random.normal(k[2], (4, T))}
  x, y = jax.random.normal(k[3], (3, 6, 6, 2)), jax.random.normal(k[4], (3, T))

  def conv(h, kernel):
    return jax.lax.conv_general_dilated(h, kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def losses_fn(p, x, y):
    h = jnp.tanh(conv(jnp.tanh(conv(x, p["trunk"]["k1"])), p["trunk"]["k2"]))
    return jnp.mean((h.mean(axis=(1, 2)) @ p["heads"] - y) ** 2, axis=0)

  tx = mtl.mgda(num_tasks=T, shared=SHARED)
  lean = jax.jit(mtl.value_and_gramian_grad(losses_fn, tx, chunk_size=None))
  jacobian = jax.jit(mtl.value_and_jacobian(losses_fn))
  _, update, state = lean(tx.init(params), params, x, y)
  losses, task_grads = jacobian(params, x, y)
  expected, expected_state = tx.update(task_grads, tx.init(params), params, losses=losses)
  close(update, expected)
  close(state, expected_state)

  def convolutions(fn, *args):
    hlo = fn.lower(*args).compile().as_text()
    # XLA's, or the compiled CPU kernel's.
    return len(re.findall(r' convolution\(|custom_call_target="optax_mtl_convolution', hlo))
  # The forward pass (2), then per task the second layer's input gradient
  # and both kernel gradients (3 T).
  assert convolutions(jacobian, params, x, y) == 2 + 3 * T
  gramian = jax.jit(mtl.value_and_gramian(losses_fn, shared=SHARED, chunk_size=None))
  # The Gramian's passes, and its one-task-at-a-time rescue from overflow.
  assert convolutions(lean, tx.init(params), params, x, y) == convolutions(
      gramian, params, x, y)
