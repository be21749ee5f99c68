"""Pure-JAX multi-task models for the speed benchmarks: a CNN and an MLP trunk with T heads.

Parameters are plain pytrees ``{"trunk": ..., "heads": ...}`` (no Flax), so
the same definitions serve ``jax.value_and_grad``, every gradient path of
``optax_mtl`` and a comparison script that rebuilds them in another
framework. Every model has the same API:

* ``<model>_init(key, num_tasks, ...) -> params``;
* ``<model>_features(params["trunk"], x) -> z``, the shared features, [B, C];
* ``head_losses(params["heads"], z, y) -> losses``, [T], for every model.

Tasks: T scalar regressions. Head t is a linear map of the features to one
number; its loss is the mean squared error against the targets ``y[:, t]``
(:func:`head_losses`). The heads are one ``[C, T]`` matrix and a ``[T]``
bias, so task t's loss reaches only column t: with
``shared={"trunk": True, "heads": False}`` every head gets its own task's
gradient.

The CNN is a plain (residual-free, normalisation-free) ResNet-style stack of
3x3 convolutions with ReLU and 'SAME' padding, in NHWC layout, that halves
the resolution (stride 2) wherever the width grows, as ResNet's stages do,
then global average pooling. :data:`CNN_WIDTHS`, eight layers of 64, 64, 128,
128, 256, 256, 512, 512 channels (strides 2 at the 3rd, 5th and 7th), has
4.7M trunk parameters for 3 input channels; :data:`RESNET18_WIDTHS`, the 17
3x3 convolutions of ResNet-18's layout (a 3x3 stem, then four stages of four),
has 11.0M, ResNet-18's size.

Weights are drawn by numpy from a generator seeded by the key, as float32:
``jax.device_get(params)`` gives the same values to any other framework.

Example::

  import jax, models
  params = models.cnn_init(jax.random.key(0), num_tasks=10)
  x = jax.numpy.zeros((64, 64, 64, 3))
  y = jax.numpy.zeros((64, 10))
  z = models.cnn_features(params["trunk"], x)          # [64, 512]
  losses = models.head_losses(params["heads"], z, y)   # [10]
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Params = Any

CNN_WIDTHS: tuple[int, ...] = (64, 64, 128, 128, 256, 256, 512, 512)
RESNET18_WIDTHS: tuple[int, ...] = (64,) * 5 + (128,) * 4 + (256,) * 4 + (512,) * 4


def _check_positive(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")
  return value


def _check_widths(widths: Sequence[int]) -> tuple[int, ...]:
  widths = tuple(widths)
  if not widths:
    raise ValueError("widths must name at least one layer, e.g. "
                     "models.CNN_WIDTHS.")
  for w in widths:
    _check_positive("every width", w)
  return widths


def _generator(key) -> np.random.Generator:
  """A numpy generator seeded by a JAX key (typed or raw) or an int seed."""
  if isinstance(key, int):
    return np.random.default_rng(key)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return np.random.default_rng(np.asarray(key).ravel())


def _normal(rng: np.random.Generator, shape, std: float) -> jax.Array:
  # Drawn by numpy: no compilation, and the same values in any framework.
  return jnp.asarray((std * rng.standard_normal(shape)).astype(np.float32))


def _zeros(n: int) -> jax.Array:
  return jnp.asarray(np.zeros((n,), np.float32))


def _heads_init(rng, width: int, num_tasks: int) -> Params:
  return {"w": _normal(rng, (width, num_tasks), 1 / np.sqrt(width)),
          "b": _zeros(num_tasks)}


def head_losses(heads: Params, z: jax.Array, y: jax.Array) -> jax.Array:
  """[T] mean squared errors of the T linear heads ``z @ w + b`` against y [B, T].

  The ``heads_fn`` of the representation path.
  """
  predictions = z @ heads["w"] + heads["b"][None, :]
  if predictions.shape != y.shape:
    raise ValueError(f"targets y must have the predictions' shape [batch, "
                     f"num_tasks] = {predictions.shape}, got {y.shape}.")
  return jnp.mean((predictions - y) ** 2, axis=0)


def cnn_init(key, num_tasks: int, in_channels: int = 3,
             widths: Sequence[int] = CNN_WIDTHS) -> Params:
  """Parameters of the CNN of this module's docstring, He-normal initialised.

  Args:
    key: a JAX PRNG key (typed or raw) or an int seed; it seeds numpy's
      generator, which draws the weights.
    num_tasks: T, the number of heads.
    in_channels: channels of the input images.
    widths: output channels of each 3x3 convolution, in order; the stride is
      2 where the width grows from the previous layer's (not at the first).

  Returns:
    ``{"trunk": [{"w": [3, 3, c_in, c_out], "b": [c_out]}, ...],
    "heads": {"w": [widths[-1], T], "b": [T]}}``.
  """
  _check_positive("num_tasks", num_tasks)
  _check_positive("in_channels", in_channels)
  widths = _check_widths(widths)
  rng = _generator(key)
  trunk = [{"w": _normal(rng, (3, 3, c_in, c_out), np.sqrt(2.0 / (9 * c_in))),
            "b": _zeros(c_out)}
           for c_in, c_out in zip((in_channels,) + widths[:-1], widths)]
  return {"trunk": trunk, "heads": _heads_init(rng, widths[-1], num_tasks)}


def cnn_strides(widths: Sequence[int]) -> tuple[int, ...]:
  """Each layer's stride: 2 where the width grows from the previous layer's
  (ResNet halves the resolution where a stage widens the features), else 1."""
  return tuple(2 if i > 0 and w > widths[i - 1] else 1 for i, w in enumerate(widths))


def cnn_features(trunk: Params, x: jax.Array) -> jax.Array:
  """Shared features of the CNN: [B, H, W, C_in] images to [B, widths[-1]]."""
  if x.ndim != 4 or x.shape[-1] != trunk[0]["w"].shape[2]:
    raise ValueError(f"x must be NHWC images [batch, height, width, "
                     f"{trunk[0]['w'].shape[2]}], got shape {x.shape}.")
  h = x
  strides = cnn_strides([layer["w"].shape[-1] for layer in trunk])
  for layer, stride in zip(trunk, strides):
    h = jax.lax.conv_general_dilated(
        h, layer["w"], window_strides=(stride, stride), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(h + layer["b"][None, None, None, :])
  return jnp.mean(h, axis=(1, 2))


def mlp_init(key, num_tasks: int, in_dim: int, width: int = 512,
             depth: int = 4) -> Params:
  """Parameters of an MLP trunk (``depth`` ReLU layers of ``width``) and T heads.

  Args:
    key: a JAX PRNG key (typed or raw) or an int seed; it seeds numpy's
      generator, which draws the weights.
    num_tasks: T, the number of heads.
    in_dim: input features (images are flattened: height * width * channels).
    width: units of every hidden layer.
    depth: hidden layers.

  Returns:
    ``{"trunk": [{"w": [d_in, width], "b": [width]}, ...],
    "heads": {"w": [width, T], "b": [T]}}``.
  """
  for name, value in (("num_tasks", num_tasks), ("in_dim", in_dim),
                      ("width", width), ("depth", depth)):
    _check_positive(name, value)
  rng = _generator(key)
  dims = (in_dim,) + (width,) * depth
  trunk = [{"w": _normal(rng, (a, b), np.sqrt(2.0 / a)), "b": _zeros(b)}
           for a, b in zip(dims[:-1], dims[1:])]
  return {"trunk": trunk, "heads": _heads_init(rng, width, num_tasks)}


def mlp_features(trunk: Params, x: jax.Array) -> jax.Array:
  """Shared features of the MLP: x [B, ...] (flattened) to [B, width]."""
  h = x.reshape(x.shape[0], -1)
  if h.shape[1] != trunk[0]["w"].shape[0]:
    raise ValueError(f"x has {h.shape[1]} features per example once "
                     f"flattened; the trunk was built with in_dim="
                     f"{trunk[0]['w'].shape[0]}.")
  for layer in trunk:
    h = jax.nn.relu(h @ layer["w"] + layer["b"][None, :])
  return h


def num_params(params: Params) -> int:
  """Number of scalars in a pytree of parameters."""
  return int(sum(leaf.size for leaf in jax.tree.leaves(params)))
