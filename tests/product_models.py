"""Small models whose VJPs hold dense-layer weight products, and which leaves are one."""

from __future__ import annotations

import jax
import jax.numpy as jnp

T = 3


def normal(key, shape, scale=0.5):
  return scale * jax.random.normal(jax.random.key(key), shape)


def mse(pred, y):
  return jnp.mean((pred - y) ** 2, axis=tuple(range(pred.ndim - 1)))


# name -> (params, loss_fn(params, x, y), x, y). Each loss vector has T tasks.
def _mlp():
  params = {"w1": normal(0, (6, 7)), "b1": normal(1, (7,)),
            "w2": normal(2, (7, 5)), "heads": normal(3, (5, T))}

  def loss(p, x, y):
    h = jnp.tanh(x @ p["w1"] + p["b1"][None, :])
    return mse(jnp.tanh(h @ p["w2"]) @ p["heads"], y)
  return params, loss, normal(4, (9, 6), 1.0), normal(5, (9, T), 1.0)


def _tokens():
  # A token-wise layer: the product contracts the batch and the sequence.
  params = {"w": normal(0, (6, 4)), "heads": normal(1, (4, T))}

  def loss(p, x, y):
    h = jnp.tanh(jnp.einsum("bsi,ij->bsj", x, p["w"]))
    return mse(h.mean(axis=1) @ p["heads"], y)
  return params, loss, normal(2, (5, 8, 6), 1.0), normal(3, (5, T), 1.0)


def _heads_batch_dim():
  # A per-head weight [H, D, E]: the product has H as a batch dimension.
  params = {"w": normal(0, (2, 6, 3)), "heads": normal(1, (6, T))}

  def loss(p, x, y):
    h = jnp.tanh(jnp.einsum("bhd,hde->bhe", x, p["w"]))
    return mse(h.reshape(h.shape[0], -1) @ p["heads"], y)
  return params, loss, normal(2, (7, 2, 6), 1.0), normal(3, (7, T), 1.0)


def _weight_on_the_left():
  params = {"w": normal(0, (4, 6)), "heads": normal(1, (4, T))}

  def loss(p, x, y):
    h = jnp.tanh(jnp.einsum("ij,bj->bi", p["w"], x))
    return mse(h @ p["heads"], y)
  return params, loss, normal(2, (5, 6), 1.0), normal(3, (5, T), 1.0)


def _shared_weight():
  # One weight in two products: its gradient is a sum, not one product.
  params = {"w": normal(0, (5, 5)), "heads": normal(1, (5, T))}

  def loss(p, x, y):
    h = jnp.tanh(jnp.tanh(x @ p["w"]) @ p["w"])
    return mse(h @ p["heads"], y)
  return params, loss, normal(2, (6, 5), 1.0), normal(3, (6, T), 1.0)


def _convnet():
  params = {"k": normal(0, (3, 3, 2, 4)), "heads": normal(1, (4, T))}

  def loss(p, x, y):
    h = jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return mse(jnp.tanh(h).mean(axis=(1, 2)) @ p["heads"], y)
  return params, loss, normal(2, (4, 6, 6, 2), 1.0), normal(3, (4, T), 1.0)


def _jitted_layers():
  # Layers behind jax.jit: their equations are found inside the call.
  params = {"w1": normal(0, (6, 5)), "w2": normal(1, (5, T))}
  layer = jax.jit(lambda h, w: jnp.tanh(h @ w))

  def loss(p, x, y):
    return mse(layer(layer(x, p["w1"]), p["w2"]), y)
  return params, loss, normal(2, (8, 6), 1.0), normal(3, (8, T), 1.0)


MODELS = {"mlp": _mlp, "tokens": _tokens, "heads_batch_dim": _heads_batch_dim,
          "weight_on_the_left": _weight_on_the_left, "shared_weight": _shared_weight,
          "convnet": _convnet, "jitted_layers": _jitted_layers}

# Leaves (flattening order) each model's analysis finds as one product.
PRODUCTS = {"mlp": {"heads", "w1", "w2"}, "tokens": {"heads", "w"},
            "heads_batch_dim": {"heads", "w"}, "weight_on_the_left": {"heads", "w"},
            "shared_weight": {"heads"}, "convnet": {"heads"},
            "jitted_layers": {"w1", "w2"}}
