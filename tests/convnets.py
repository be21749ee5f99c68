"""A small strided convolutional network with three regression tasks, for the
tests of the paths through convolutions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def losses(params, x):
  """[3] task losses: two stride-2 convolutions, ReLU, mean pool, a head."""
  h = x
  for kernel in params["convs"]:
    h = jax.nn.relu(lax.conv_general_dilated(
        h, kernel, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  z = jnp.mean(h, axis=(1, 2))
  return jnp.mean((z @ params["head"]) ** 2, axis=0)


def problem():
  """``(params, x)``: kernels 2 -> 4 -> 6 channels, a batch of five 8x8 images."""
  keys = jax.random.split(jax.random.key(4), 4)
  params = {"convs": [jax.random.normal(keys[0], (3, 3, 2, 4)) / 4,
                      jax.random.normal(keys[1], (3, 3, 4, 6)) / 6],
            "head": jax.random.normal(keys[2], (6, 3))}
  return params, jax.random.normal(keys[3], (5, 8, 8, 2))
