"""mtl.value_and_jacobian on plain pytrees and Flax NNX modules."""

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import optax_mtl as mtl
from optax_mtl._src.paths import jacobian
from optax_mtl._src.paths import weight_products

import product_models


def quadratic_losses(params, x):
  w, b = params["w"], params["b"]
  return jnp.stack([jnp.sum((x @ w + b[None, :]) ** 2), jnp.sum(w ** 3), jnp.sum(b)])


def test_matches_per_task_grad():
  params = {"w": jnp.arange(6.0).reshape(3, 2) / 6, "b": jnp.array([0.5, -1.0])}
  x = jnp.ones((4, 3))
  losses, task_grads = mtl.value_and_jacobian(quadratic_losses)(params, x)
  np.testing.assert_allclose(losses, quadratic_losses(params, x), rtol=1e-6)
  for t in range(3):
    g = jax.grad(lambda p: quadratic_losses(p, x)[t])(params)
    for k in params:
      np.testing.assert_allclose(task_grads[k][t], g[k], rtol=1e-6)


def test_argnums_tuple_and_has_aux():
  def fn(a, b):
    return jnp.stack([jnp.sum(a * b), jnp.sum(a ** 2)]), {"aux": a.sum()}
  a, b = jnp.array([1.0, 2.0]), jnp.array([3.0, 5.0])
  (losses, aux), (ga, gb) = mtl.value_and_jacobian(fn, argnums=(0, 1),
                                                   has_aux=True)(a, b)
  np.testing.assert_allclose(losses, [13.0, 5.0])
  assert float(aux["aux"]) == 3.0
  np.testing.assert_allclose(ga, [[3.0, 5.0], [2.0, 4.0]])
  np.testing.assert_allclose(gb, [[1.0, 2.0], [0.0, 0.0]])


def test_list_of_scalar_losses_is_stacked():
  fn = lambda w: [jnp.sum(w), jnp.sum(2 * w)]
  losses, g = mtl.value_and_jacobian(fn)(jnp.ones(3))
  np.testing.assert_allclose(losses, [3.0, 6.0])
  np.testing.assert_allclose(g, [[1.0] * 3, [2.0] * 3])


def test_works_under_jit():
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  x = jnp.ones((4, 3))
  eager = mtl.value_and_jacobian(quadratic_losses)(params, x)
  jitted = jax.jit(mtl.value_and_jacobian(quadratic_losses))(params, x)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_error_scalar_loss():
  with pytest.raises(ValueError, match=r"shape \(T,\).*returned a scalar"):
    mtl.value_and_jacobian(lambda w: jnp.sum(w))(jnp.ones(2))


def test_error_has_aux_without_pair():
  with pytest.raises(ValueError, match=r"has_aux=True.*\(losses, aux\)"):
    mtl.value_and_jacobian(lambda w: w, has_aux=True)(jnp.ones(2))


def test_error_bad_argnums():
  with pytest.raises(ValueError, match=r"argnums=3.*1 positional"):
    mtl.value_and_jacobian(lambda w: w, argnums=3)(jnp.ones(2))


def test_error_integer_parameters():
  with pytest.raises(ValueError, match="floating point"):
    mtl.value_and_jacobian(lambda w: jnp.stack([w.sum() * 1.0]))(jnp.ones(2, jnp.int32))


class Net(nnx.Module):
  """A trunk with BatchNorm and Dropout and two heads."""

  def __init__(self, rngs):
    self.trunk = nnx.Linear(3, 8, rngs=rngs)
    self.norm = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head_a = nnx.Linear(8, 1, rngs=rngs)
    self.head_b = nnx.Linear(8, 1, rngs=rngs)

  def __call__(self, x):
    h = self.drop(nnx.relu(self.norm(self.trunk(x))))
    return self.head_a(h)[:, 0], self.head_b(h)[:, 0]


def net_losses(model, x, y):
  a, b = model(x)
  return jnp.stack([jnp.mean((a - y) ** 2), jnp.mean(jnp.abs(b + y))])


def test_nnx_module_with_batchnorm_and_dropout():
  model = Net(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (16, 3))
  y = jnp.sum(x, axis=1)

  # Reference: the same module state, each task differentiated by nnx.grad.
  graphdef, state = nnx.split(model)
  references = []
  for t in range(2):
    copy = nnx.merge(graphdef, state, copy=True)
    references.append(nnx.grad(lambda m: net_losses(m, x, y)[t])(copy))
  expected_stats = nnx.merge(graphdef, state, copy=True)
  _ = net_losses(expected_stats, x, y)  # one forward pass updates the stats

  losses, task_grads = mtl.value_and_jacobian(net_losses)(model, x, y)
  assert isinstance(task_grads, nnx.State)
  assert losses.shape == (2,)
  for t in range(2):
    got = jax.tree.map(lambda g: g[t], task_grads)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(references[t])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # BatchNorm statistics and the Dropout RNG advanced exactly once, as in one
  # forward pass.
  got_rest = nnx.state(model, nnx.Not(nnx.Param))
  want_rest = nnx.state(expected_stats, nnx.Not(nnx.Param))
  unwrap = lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  for a, b in zip(jax.tree.leaves(got_rest), jax.tree.leaves(want_rest)):
    np.testing.assert_allclose(unwrap(a), unwrap(b), rtol=1e-6)
  assert float(jnp.abs(model.norm.mean[...]).sum()) > 0


def test_nnx_train_step_under_nnx_jit():
  import optax
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(mtl.mean(), optax.adam(1e-2)),
                            wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (32, 3))
  y = jnp.sum(x, axis=1)

  @nnx.jit
  def step(model, optimizer, x, y):
    losses, grads = mtl.value_and_jacobian(net_losses)(model, x, y)
    optimizer.update(model, grads, losses=losses)
    return losses

  first = step(model, optimizer, x, y)
  for _ in range(30):
    last = step(model, optimizer, x, y)
  assert float(jnp.sum(last)) < float(jnp.sum(first))
  assert int(optimizer.step[...]) == 31


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7])
def test_chunked_backward_passes_give_the_same_jacobian(chunk_size):
  # T = 5: chunks of 2 and 3 leave a padded last chunk.
  def losses_fn(params, x):
    h = jnp.tanh(x @ params["w"])
    return jnp.mean(h, axis=0)[:5] * jnp.arange(1.0, 6.0) + jnp.sum(params["b"] ** 2)
  params = {"w": jax.random.normal(jax.random.key(0), (4, 6)), "b": jnp.ones(3)}
  x = jax.random.normal(jax.random.key(1), (8, 4))
  full = mtl.value_and_jacobian(losses_fn)(params, x)
  chunked = jax.jit(mtl.value_and_jacobian(losses_fn, chunk_size=chunk_size))(params, x)
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(chunked)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunk_size_must_be_a_positive_integer():
  with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
    mtl.value_and_jacobian(lambda p: jnp.stack([p, p]), chunk_size=0)


@pytest.mark.parametrize("num_tasks", [3, 70])
def test_convolution_jacobian_matches_per_task_grad(num_tasks):
  # On CPU, up to 64 tasks run unrolled and more are vmapped: both give each
  # task's own gradient, also under vmap over a batch of models.
  def losses_fn(params, x):
    h = jax.lax.conv_general_dilated(x, params["k"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    z = jnp.mean(jax.nn.relu(h), axis=(1, 2)) @ params["head"]
    return jnp.mean(z, axis=0) * jnp.arange(1.0, num_tasks + 1.0)

  keys = jax.random.split(jax.random.key(0), 3)
  params = {"k": jax.random.normal(keys[0], (3, 3, 2, 4)),
            "head": jax.random.normal(keys[1], (4, num_tasks))}
  x = jax.random.normal(keys[2], (2, 5, 5, 2))
  losses, task_grads = jax.jit(mtl.value_and_jacobian(losses_fn))(params, x)
  assert task_grads["k"].shape == (num_tasks, 3, 3, 2, 4)
  for t in (0, num_tasks - 1):
    expected = jax.grad(lambda p: losses_fn(p, x)[t])(params)
    for got, want in zip(jax.tree.leaves(task_grads), jax.tree.leaves(expected)):
      np.testing.assert_allclose(got[t], want, rtol=1e-5, atol=1e-5)
  batched = jax.vmap(mtl.value_and_jacobian(losses_fn), in_axes=(None, 0))(
      params, jnp.stack([x, 2.0 * x]))
  np.testing.assert_allclose(batched[1]["k"][0], task_grads["k"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(batched[0][0], losses, rtol=1e-6)


def _per_task(loss, params, x, y):
  num_tasks = loss(params, x, y).shape[0]
  return [jax.grad(lambda p, t=t: loss(p, x, y)[t])(params) for t in range(num_tasks)]


@pytest.mark.parametrize("batched", ["by_memory", "never"])
@pytest.mark.parametrize("name", sorted(product_models.MODELS))
def test_weight_products_give_each_tasks_gradient(name, batched, monkeypatch):
  # Dense-layer weights come from one batched product; every other leaf from
  # the backward passes. Both ways give task t's own gradient, in the layout
  # of the parameters.
  if batched == "never":
    monkeypatch.setattr(jacobian, "_batched_is_lean", lambda analysis, index: False)
  params, loss, x, y = product_models.MODELS[name]()
  losses, task_grads = jax.jit(mtl.value_and_jacobian(loss))(params, x, y)
  np.testing.assert_allclose(losses, loss(params, x, y), rtol=1e-6)
  for t, want in enumerate(_per_task(loss, params, x, y)):
    for got, expected in zip(jax.tree.leaves(task_grads), jax.tree.leaves(want)):
      assert got.shape == (product_models.T,) + expected.shape
      np.testing.assert_allclose(got[t], expected, rtol=1e-5, atol=1e-6)


def test_weight_gradients_come_out_of_one_batched_product():
  # A [48, 40] weight's T gradients: one dot with the tasks as a batch
  # dimension writes them; no per-task [48, 40] product is stacked.
  params = {"w": product_models.normal(0, (48, 40)),
            "heads": product_models.normal(1, (40, product_models.T))}
  x = product_models.normal(2, (4, 48), 1.0)
  y = product_models.normal(3, (4, product_models.T), 1.0)

  def loss(p, x, y):
    return product_models.mse(jnp.tanh(x @ p["w"]) @ p["heads"], y)

  hlo = jax.jit(mtl.value_and_jacobian(loss)).lower(params, x, y).compile().as_text()
  dots = [line for line in hlo.splitlines() if " dot(" in line]
  assert any(re.search(r"= f32\[3,48,40\].* dot\(.*lhs_batch_dims=\{0\}", line)
             for line in dots), dots
  assert not any(re.search(r"= f32\[(48,40|40,48)\]", line) for line in dots), dots


def test_token_wise_layer_over_many_tokens_is_not_batched():
  # 64 tokens through a 6 x 4 weight: the T cotangents [T, 5, 64, 4] and the
  # broadcast input outweigh the T gradients [T, 6, 4], so the backward passes
  # give this leaf (and still each task's gradient).
  def analysis_of(params, loss, x, y):
    losses, vjp = jax.vjp(lambda p: loss(p, x, y), params)
    return weight_products.analyse(lambda c: jax.tree.leaves(vjp(c)[0]), losses)

  params, loss, _, y = product_models.MODELS["tokens"]()
  x = product_models.normal(2, (5, 64, 6), 1.0)
  analysis = analysis_of(params, loss, x, y)
  names = sorted(params)
  assert names.index("w") in analysis.products
  assert not jacobian._batched_is_lean(analysis, names.index("w"))
  _, task_grads = mtl.value_and_jacobian(loss)(params, x, y)
  for t, want in enumerate(_per_task(loss, params, x, y)):
    np.testing.assert_allclose(task_grads["w"][t], want["w"], rtol=1e-5, atol=1e-6)


def test_batched_weight_products_under_vmap_and_in_bfloat16():
  params, loss, x, y = product_models.MODELS["mlp"]()
  fn = mtl.value_and_jacobian(loss)
  _, task_grads = fn(params, x, y)
  _, batched = jax.vmap(fn, in_axes=(None, 0, None))(params, jnp.stack([x, 2.0 * x]), y)
  _, doubled = fn(params, 2.0 * x, y)
  for one, two, got in zip(jax.tree.leaves(task_grads), jax.tree.leaves(doubled),
                           jax.tree.leaves(batched)):
    np.testing.assert_allclose(got[0], one, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], two, rtol=1e-5, atol=1e-6)
  low = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  _, low_grads = fn(low, x.astype(jnp.bfloat16), y.astype(jnp.bfloat16))
  for got, want in zip(jax.tree.leaves(low_grads), jax.tree.leaves(task_grads)):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0.1, atol=0.05)


@pytest.mark.parametrize("mesh_context", [False, True])
@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_sharded_jacobian_equals_single_device(axis_type, mesh_context):
  # The batch sharded over the 4 devices (data parallel): without a mesh
  # context the batched weight products are partitioned by XLA; within one
  # (explicit or auto axes) the backward passes give every leaf. Both give
  # the single-device Jacobian.
  params, loss, x, y = product_models.MODELS["mlp"]()
  x = jnp.concatenate([x] * 4)[:32]
  y = jnp.concatenate([y] * 4)[:32]
  fn = jax.jit(mtl.value_and_jacobian(loss))
  want_losses, want = fn(params, x, y)
  mesh = jax.make_mesh((4,), ("d",), axis_types=(axis_type,))
  batch = NamedSharding(mesh, P("d"))
  placed = jax.device_put(params, NamedSharding(mesh, P()))
  xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
  with jax.set_mesh(mesh) if mesh_context else contextlib.nullcontext():
    losses, got = fn(placed, xs, ys)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
