"""From a network's logits to probabilities and labels (validation and inference alike).

One class: sigmoid, label = P > 0.5 (any opacity). Three classes (background,
ground-glass opacity, consolidation): softmax, label = argmax. A configured
`threshold` t (`config.predict_threshold`) labels opacity where P(opacity) > t
instead (three classes: 1 - P(background) > t, then the likelier of GGO and
consolidation). A model with
deep supervision returns one logits array per head; the last head decides
unless the heads' probabilities are averaged.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def probabilities(logits, *, num_classes: int, average_heads: bool = False) -> jax.Array:
  """Logits (or the list of deep-supervision logits) -> class probabilities (B, H, W, C).

  Sigmoid for one class, softmax for three. With `average_heads` the heads'
  probabilities are averaged; otherwise the last head (x_0_4) decides.
  """
  act = jax.nn.sigmoid if num_classes == 1 else functools.partial(jax.nn.softmax, axis=-1)
  if isinstance(logits, (list, tuple)):
    if average_heads:
      return jnp.mean(jnp.stack([act(l) for l in logits]), axis=0)
    logits = logits[-1]
  return act(logits)


def labels_from_probabilities(probs: jax.Array, threshold: float | None = None) -> jax.Array:
  """(B, H, W, C) probabilities -> uint8 labels.

  threshold None: P > 0.5 for one class, argmax for three; a number t: opacity
  where P(opacity) > t (three classes: 1 - P(background), labelled GGO or
  consolidation by the larger of the two).
  """
  if probs.shape[-1] == 1:
    return (probs[..., 0] > (0.5 if threshold is None else threshold)).astype(jnp.uint8)
  if threshold is None:
    return jnp.argmax(probs, axis=-1).astype(jnp.uint8)
  kind = 1 + jnp.argmax(probs[..., 1:], axis=-1)
  return jnp.where(1.0 - probs[..., 0] > threshold, kind, 0).astype(jnp.uint8)


def check_threshold(threshold) -> float | None:
  """`config.predict_threshold` validated: None, or a number strictly between 0 and 1."""
  if threshold is None:
    return None
  try:
    t = float(threshold)
  except (TypeError, ValueError):
    t = float("nan")
  if not 0.0 < t < 1.0:
    raise ValueError(f"config.predict_threshold={threshold!r} must be None (0.5, or argmax for "
                     "three classes) or a number strictly between 0 and 1")
  return t


def predict_labels(logits, *, num_classes: int, average_heads: bool = False,
                   threshold: float | None = None) -> jax.Array:
  """Logits (or a list of deep-supervision logits) -> integer labels (B, H, W)."""
  return labels_from_probabilities(
      probabilities(logits, num_classes=num_classes, average_heads=average_heads), threshold)
