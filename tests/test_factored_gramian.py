"""The all-tasks-at-once Gramian: dense-layer blocks from inputs and cotangents."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optax_mtl as mtl
from optax_mtl._src.paths import factored_gramian
from optax_mtl._src.paths import weight_products

import product_models

T = product_models.T
MODELS = product_models.MODELS
PRODUCTS = product_models.PRODUCTS
_normal = product_models.normal
_mse = product_models.mse


def _stacked(loss, params, x, y):
  _, task_grads = mtl.value_and_jacobian(loss)(params, x, y)
  return mtl.gramian(task_grads)


def _assert_same(got, want):
  np.testing.assert_allclose(got.scale, want.scale, rtol=1e-5)
  np.testing.assert_allclose(got.normalized, want.normalized, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(got.normalized, got.normalized.T)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_products_found(name):
  params, loss, x, y = MODELS[name]()
  losses, jvp = jax.linearize(lambda p: loss(p, x, y), params)
  transpose = jax.linear_transpose(jvp, params)
  analysis = weight_products.analyse(lambda c: jax.tree.leaves(transpose(c)), losses)
  names = sorted(params)  # a flat dict flattens in key order
  assert {names[i] for i in analysis.products} == PRODUCTS[name]


@pytest.mark.parametrize("factored", ["by_cost", "always"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_equals_stacked_gramian(name, factored, monkeypatch):
  if factored == "always":
    # Every product factored, whatever the cost rule picks at these sizes.
    monkeypatch.setattr(factored_gramian, "_factored_is_cheaper", lambda p, t: True)
  params, loss, x, y = MODELS[name]()
  losses, got = mtl.value_and_gramian(loss, chunk_size=None)(params, x, y)
  np.testing.assert_allclose(losses, loss(params, x, y), rtol=1e-6)
  _assert_same(got, _stacked(loss, params, x, y))


def test_jit_equals_eager_and_masked_sets():
  params, loss, x, y = MODELS["mlp"]()
  shared = {"w1": True, "b1": True, "w2": True, "heads": False}
  eager = mtl.value_and_gramian(loss, shared=shared, chunk_size=None)(params, x, y)[1]
  jitted = jax.jit(mtl.value_and_gramian(loss, shared=shared, chunk_size=None))(
      params, x, y)[1]
  _, task_grads = mtl.value_and_jacobian(loss)(params, x, y)
  _assert_same(eager, mtl.gramian(task_grads, shared))
  np.testing.assert_allclose(jitted.normalized, eager.normalized, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(jitted.scale, eager.scale, rtol=1e-6)


def test_bfloat16_weights_accumulate_in_float32():
  params, loss, x, y = MODELS["mlp"]()
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  _, got = mtl.value_and_gramian(loss, chunk_size=None)(params, x, y)
  want = _stacked(loss, params, x, y)
  assert got.normalized.dtype == jnp.float32
  np.testing.assert_allclose(got.scale, want.scale, rtol=2e-2)
  np.testing.assert_allclose(got.normalized, want.normalized, atol=2e-2)


def test_nnx_linear_layers():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.trunk = nnx.Linear(6, 8, rngs=rngs)
      self.heads = nnx.Linear(8, T, rngs=rngs)

    def __call__(self, x):
      return self.heads(nnx.relu(self.trunk(x)))

  model = Net(nnx.Rngs(0))
  x, y = _normal(1, (10, 6), 1.0), _normal(2, (10, T), 1.0)
  loss = lambda m, x, y: _mse(m(x), y)
  _, got = mtl.value_and_gramian(loss, chunk_size=None)(model, x, y)
  _assert_same(got, _stacked(loss, model, x, y))


def test_no_weight_gradient_is_formed():
  # A batch of 4 through a 48 x 40 layer: factored, so no [48, 40] product
  # (a task's weight gradient) is left in the compiled program.
  params = {"w": _normal(0, (48, 40)), "heads": _normal(1, (40, T))}
  x, y = _normal(2, (4, 48), 1.0), _normal(3, (4, T), 1.0)

  def loss(p, x, y):
    return _mse(jnp.tanh(x @ p["w"]) @ p["heads"], y)

  def blocks(p, x, y):
    losses, jvp = jax.linearize(lambda p: loss(p, x, y), p)
    transpose = jax.linear_transpose(jvp, p)
    analysis = weight_products.analyse(lambda c: jax.tree.leaves(transpose(c)), losses)
    blocks, _ = factored_gramian.leaf_blocks(analysis, [0, 1], jnp.float32)
    return blocks

  hlo = jax.jit(blocks).lower(params, x, y).compile().as_text()
  products = [line for line in hlo.splitlines() if " dot(" in line]
  assert products
  for line in products:
    assert not re.search(r"= f32\[(3,)?(48,40|40,48)\]", line), line
  _, task_grads = mtl.value_and_jacobian(loss)(params, x, y)
  got = blocks(params, x, y)
  for index, leaf in enumerate(jax.tree.leaves(task_grads)):
    flat = np.asarray(leaf, np.float64).reshape(T, -1)
    np.testing.assert_allclose(got[index], flat @ flat.T, rtol=1e-5, atol=1e-6)


def test_cost_rule():
  def product(batch, inputs, outputs):
    x = jax.ShapeDtypeStruct((batch, inputs), jnp.float32)
    d = jax.ShapeDtypeStruct((batch, outputs), jnp.float32)
    return weight_products.Product(_Var(x), _Var(d), (), (0,), (), (0,), True, {}, ())

  # MLP layers at a batch of 128: ~3.6x fewer multiply-adds factored.
  assert factored_gramian._factored_is_cheaper(product(128, 512, 512), 10)
  # 4096 positions through a 64 x 64 layer: the gradients are cheaper.
  assert not factored_gramian._factored_is_cheaper(product(4096, 64, 64), 10)


class _Var:
  """A stand-in for a jaxpr variable: what the cost rule reads of one."""

  def __init__(self, aval):
    self.aval = aval


def test_memory_below_the_stacked_path():
  width, tasks = 256, 8
  params = {"w": [_normal(i, (width, width)) for i in range(3)],
            "heads": _normal(9, (width, tasks))}
  x, y = _normal(10, (32, width), 1.0), _normal(11, (32, tasks), 1.0)

  def loss(p, x, y):
    h = x
    for w in p["w"]:
      h = jax.nn.relu(h @ w)
    return jnp.mean((h @ p["heads"] - y) ** 2, axis=0)

  def memory(fn):
    analysis = jax.jit(fn).lower(params, x, y).compile().memory_analysis()
    if analysis is None:
      pytest.skip("memory_analysis() returns None on this backend")
    return analysis.temp_size_in_bytes + analysis.output_size_in_bytes

  stacked = memory(lambda p, x, y: mtl.gramian(
      mtl.value_and_jacobian(loss)(p, x, y)[1]).normalized)
  factored = memory(lambda p, x, y: mtl.value_and_gramian(
      loss, chunk_size=None)(p, x, y)[1].normalized)
  grad_bytes = sum(l.nbytes for l in jax.tree.leaves(params))
  # The stacked path holds the 8 gradients; this one the 8 cotangents of
  # each layer's [32, 256] output, ~1/8 of a weight each, and their products
  # with the inputs' kernel.
  assert stacked > 6 * grad_bytes, stacked
  assert factored < 3 * grad_bytes, (factored, grad_bytes)
  assert factored < 0.3 * stacked, (factored, stacked)


@pytest.mark.parametrize("scale", [1e20, 1e-20])
def test_factored_block_in_range_for_huge_and_tiny_inputs(scale, monkeypatch):
  # Inputs of 1e20 (or 1e-20) and gradients of about 1: x x^T alone would
  # overflow (underflow), the block <x^T d_s, x^T d_t> is in range.
  monkeypatch.setattr(factored_gramian, "_factored_is_cheaper", lambda p, t: True)
  params = {"w": _normal(0, (4, 3))}
  x = scale * _normal(1, (5, 4), 1.0)
  mix = _normal(2, (3, T), 1.0)

  def loss(p, x, y):
    return jnp.mean((x @ p["w"]) @ mix, axis=0) / scale + 0.0 * y

  _, got = mtl.value_and_gramian(loss, chunk_size=None)(params, x, jnp.zeros(T))
  assert np.all(np.isfinite(got.normalized)) and float(got.scale) > 0
  _assert_same(got, _stacked(loss, params, x, jnp.zeros(T)))
