"""Reference losses for :func:`scale_by_initial_loss` and :func:`scale_by_prior_loss`.

* Expected initial loss: a freshly initialised network outputs (close to)
  zero, so a K-class softmax predicts the uniform distribution (cross-entropy
  ``log K``) and a regression predicts 0 (L2 loss ``E||y||^2``).
* Prior loss: the loss of a model that learned only the label distribution:
  the entropy of the class frequencies, the variance of the labels.

These run on concrete data, outside ``jit``, once before training; each
returns a Python float.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _targets(targets: Any, name: str) -> np.ndarray:
  array = np.asarray(targets, dtype=np.float64)
  if array.ndim == 0 or array.shape[0] == 0:
    raise ValueError(f"{name}: targets must be an array of shape (N, ...) with "
                     f"at least one example, got shape {array.shape}.")
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{name}: targets hold non-finite values.")
  return array.reshape(array.shape[0], -1)


def _check_reduction(reduction: str, name: str) -> None:
  if reduction not in ("sum", "mean"):
    raise ValueError(f"{name}: reduction must be 'sum' (squared error summed "
                     f"over the output dimensions) or 'mean' (averaged, as "
                     f"optax.l2_loss(...).mean() or MSE), got {reduction!r}.")


def _per_example(squared: np.ndarray, reduction: str) -> float:
  per_example = squared.sum(1) if reduction == "sum" else squared.mean(1)
  return float(per_example.mean())


def cross_entropy_initial_loss(num_classes: int) -> float:
  """Expected initial cross-entropy of a K-class classifier: ``log K``.

  .. math:: L^{(0)} = -\\log \\tfrac1K = \\log K

  Args:
    num_classes: K >= 2.

  Returns:
    ``log K`` as a float.

  Example:
    >>> import optax_mtl as mtl
    >>> round(mtl.cross_entropy_initial_loss(10), 4)
    2.3026

  References:
    Jianlin Su, "Multi-task learning notes (1): in the name of loss", 2022,
    https://spaces.ac.cn/archives/8896.
  """
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
      or num_classes < 2:
    raise ValueError("mtl.cross_entropy_initial_loss: num_classes must be an "
                     f"int >= 2, got {num_classes!r}.")
  return float(np.log(num_classes))


def l2_initial_loss(targets: Any, *, reduction: str = "sum") -> float:
  """Expected initial L2 loss of a regression predicting 0: ``E||y||^2``.

  .. math:: L^{(0)} = \\mathbb{E}_y \\|y\\|^2

  Args:
    targets: [N, ...] regression targets (a sample of the training set).
    reduction: ``"sum"`` over the output dimensions (``||y||^2``) or
      ``"mean"`` over them (mean squared error), to match the loss used.

  Returns:
    The mean over examples as a float.

  Example:
    >>> import numpy as np, optax_mtl as mtl
    >>> mtl.l2_initial_loss(np.array([[1.0, 1.0], [3.0, 1.0]]))
    6.0

  References:
    Jianlin Su, "Multi-task learning notes (1): in the name of loss", 2022,
    https://spaces.ac.cn/archives/8896.
  """
  name = "mtl.l2_initial_loss"
  _check_reduction(reduction, name)
  return _per_example(_targets(targets, name) ** 2, reduction)


def cross_entropy_prior_loss(*, labels: Any = None, num_classes: int | None = None,
                             frequencies: Any = None) -> float:
  """Entropy of the class frequencies: the loss of predicting the prior.

  .. math:: L^{(\\mathrm{prior})} = -\\sum_{k=1}^K p_k \\log p_k

  Args:
    labels: integer class labels in ``[0, num_classes)`` (a sample of the
      training set); or
    num_classes: K, with ``labels``.
    frequencies: class counts or probabilities (normalised here), instead of
      ``labels``.

  Returns:
    The entropy (nats) as a float.

  Raises:
    ValueError: neither or both of ``labels`` / ``frequencies``; labels out
      of range; negative frequencies; a single class (entropy 0, so its
      reciprocal is not a usable weight).

  Example:
    >>> import optax_mtl as mtl
    >>> round(mtl.cross_entropy_prior_loss(frequencies=[1, 1, 2]), 4)
    1.0397

  References:
    Jianlin Su, "Multi-task learning notes (1): in the name of loss", 2022,
    https://spaces.ac.cn/archives/8896.
  """
  name = "mtl.cross_entropy_prior_loss"
  if (labels is None) == (frequencies is None):
    raise ValueError(f"{name}: pass either labels= (with num_classes=) or "
                     f"frequencies= (class counts or probabilities).")
  if labels is not None:
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"{name}: labels must be integers, got {labels.dtype}.")
    if num_classes is None:
      raise ValueError(f"{name}: pass num_classes= with labels=.")
    if labels.size == 0 or labels.min() < 0 or labels.max() >= num_classes:
      raise ValueError(f"{name}: labels must be non-empty and lie in "
                       f"[0, {num_classes}).")
    counts = np.bincount(labels.ravel(), minlength=num_classes).astype(np.float64)
  else:
    counts = np.asarray(frequencies, np.float64).ravel()
    if counts.size == 0 or not np.all(np.isfinite(counts) & (counts >= 0)) \
        or counts.sum() <= 0:
      raise ValueError(f"{name}: frequencies must be non-negative, finite and "
                       f"not all zero, got {counts.tolist()}.")
  probs = counts / counts.sum()
  present = probs[probs > 0]
  entropy = float(-np.sum(present * np.log(present)))
  if entropy <= 0:
    raise ValueError(f"{name}: only one class occurs, so the prior loss is 0 "
                     f"and 1 / prior loss is undefined; this task needs no "
                     f"learning, or the sample of labels is too small.")
  return entropy


def l2_prior_loss(targets: Any, *, reduction: str = "sum") -> float:
  """Label variance: the L2 loss of predicting the label mean.

  .. math:: L^{(\\mathrm{prior})} = \\mathbb{E}_y \\|y - \\mu\\|^2, \\quad
     \\mu = \\mathbb{E}_y\\, y

  Args:
    targets: [N, ...] regression targets (a sample of the training set).
    reduction: ``"sum"`` or ``"mean"`` over the output dimensions, to match
      the loss used.

  Returns:
    The variance as a float.

  Raises:
    ValueError: constant targets (variance 0).

  Example:
    >>> import numpy as np, optax_mtl as mtl
    >>> mtl.l2_prior_loss(np.array([[1.0], [3.0]]))
    1.0

  References:
    Jianlin Su, "Multi-task learning notes (1): in the name of loss", 2022,
    https://spaces.ac.cn/archives/8896.
  """
  name = "mtl.l2_prior_loss"
  _check_reduction(reduction, name)
  flat = _targets(targets, name)
  variance = _per_example((flat - flat.mean(0)) ** 2, reduction)
  if variance <= 0:
    raise ValueError(f"{name}: the targets are constant, so the prior loss is "
                     f"0 and 1 / prior loss is undefined.")
  return variance
