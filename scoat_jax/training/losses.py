"""Segmentation losses of the SCOAT-Net paper (Table I), from logits.

Zhao et al., "SCOAT-Net: A Novel Network for Segmenting COVID-19 Lung
Opacification from CT Images", Pattern Recognition 119 (2021) 108109, compare
six losses on one-class (opacity) output; the paper trains with BCE-Dice.
All take logits, never probabilities: the sigmoid/softmax lives here so that
log-probabilities can be formed stably (``log sigmoid(x) = -softplus(-x)``).

Binary losses (p = sigmoid(logits), y in {0, 1}, eps = 1e-6):

* ``mae``: mean |p - y|.
* ``bce``: mean binary cross-entropy.
* ``dice``: 1 - mean_b (2 sum(p y) + eps) / (sum(p) + sum(y) + eps).
* ``iou``: 1 - mean_b (sum(p y) + eps) / (sum(p) + sum(y) - sum(p y) + eps).
* ``focal``: mean of -alpha_t (1 - p_t)^gamma log(p_t); gamma 2, alpha 0.25.
* ``bce_dice``: alpha * BCE + Dice, alpha 0.5.

Sums are per image (over height and width) and the ratio is averaged over the
batch, so an image with an empty target still scores close to 1 when the
prediction is empty too. Shapes: logits (B, H, W, 1) or (B, H, W); target
(B, H, W) or (B, H, W, 1); any numeric dtype holding 0/1.

Three classes (ours, not in the paper): ``ce_dice`` takes logits (B, H, W, C)
and an integer target (B, H, W) with values in [0, C); it is alpha * softmax
cross-entropy + (1 - mean foreground Dice), the Dice ratio averaged over the
classes 1..C-1 (GGO and consolidation for C = 3) and the batch, with the same
per-image sums and eps. Target values outside [0, C) cannot be checked under
`jax.jit`; they silently count as no class.

Every loss casts logits to float32 before computing, so a bfloat16 network
still gets a float32 loss and float32 gradients of the loss itself.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

EPS = 1e-6

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def _binary_inputs(logits, target, name: str) -> tuple[jax.Array, jax.Array]:
  """Checks shapes and returns float32 (logits, target), both (B, H, W)."""
  logits, target = jnp.asarray(logits), jnp.asarray(target)
  if logits.ndim == 4:
    if logits.shape[-1] != 1:
      raise ValueError(
          f"{name}: logits have shape {logits.shape} with {logits.shape[-1]} channels; "
          f"binary losses need one channel (use 'ce_dice' for multi-class logits).")
    logits = logits[..., 0]
  elif logits.ndim != 3:
    raise ValueError(f"{name}: logits must be (B, H, W, 1) or (B, H, W), got shape {logits.shape}.")
  if target.ndim == 4 and target.shape[-1] == 1:
    target = target[..., 0]
  elif target.ndim != 3:
    raise ValueError(f"{name}: target must be (B, H, W) or (B, H, W, 1), got shape {target.shape}.")
  if logits.shape != target.shape:
    raise ValueError(f"{name}: logits {logits.shape} and target {target.shape} disagree "
                     f"(after dropping a trailing channel of 1); pass matching (B, H, W).")
  return logits.astype(jnp.float32), target.astype(jnp.float32)


def _bce_elementwise(x: jax.Array, y: jax.Array) -> jax.Array:
  # -[y log p + (1 - y) log(1 - p)] with log p = -softplus(-x) and
  # log(1 - p) = -softplus(x): exact for large |x| where 1 - p underflows.
  return y * jax.nn.softplus(-x) + (1.0 - y) * jax.nn.softplus(x)


def _soft_dice_per_image(p: jax.Array, y: jax.Array) -> jax.Array:
  """Dice ratio per image (and per class, when p has a trailing class axis)."""
  axes = (1, 2)
  inter = jnp.sum(p * y, axis=axes)
  return (2.0 * inter + EPS) / (jnp.sum(p, axis=axes) + jnp.sum(y, axis=axes) + EPS)


def mae(logits: jax.Array, target: jax.Array) -> jax.Array:
  """Mean absolute error between sigmoid probabilities and the target.

  Shapes as in the module docstring; returns a float32 scalar.
  """
  x, y = _binary_inputs(logits, target, "mae")
  return jnp.mean(jnp.abs(jax.nn.sigmoid(x) - y))


def bce(logits: jax.Array, target: jax.Array) -> jax.Array:
  """Mean binary cross-entropy, computed from logits without overflow.

  Shapes as in the module docstring; returns a float32 scalar.
  """
  x, y = _binary_inputs(logits, target, "bce")
  return jnp.mean(_bce_elementwise(x, y))


def dice(logits: jax.Array, target: jax.Array) -> jax.Array:
  """Soft Dice loss: 1 - batch mean of the per-image Dice ratio.

  Shapes as in the module docstring; returns a float32 scalar.
  """
  x, y = _binary_inputs(logits, target, "dice")
  return 1.0 - jnp.mean(_soft_dice_per_image(jax.nn.sigmoid(x), y))


def iou(logits: jax.Array, target: jax.Array) -> jax.Array:
  """Soft Jaccard (IoU) loss: 1 - batch mean of the per-image IoU ratio.

  Shapes as in the module docstring; returns a float32 scalar.
  """
  x, y = _binary_inputs(logits, target, "iou")
  p = jax.nn.sigmoid(x)
  inter = jnp.sum(p * y, axis=(1, 2))
  union = jnp.sum(p, axis=(1, 2)) + jnp.sum(y, axis=(1, 2)) - inter
  return 1.0 - jnp.mean((inter + EPS) / (union + EPS))


def focal(logits: jax.Array, target: jax.Array, *, gamma: float = 2.0,
          alpha: float = 0.25) -> jax.Array:
  """Focal loss (Lin et al. 2017): mean of -alpha_t (1 - p_t)^gamma log(p_t).

  p_t is p where y = 1 and 1 - p where y = 0; alpha_t is alpha where y = 1
  and 1 - alpha where y = 0.

  Args:
    logits: (B, H, W, 1) or (B, H, W) logits, any float dtype.
    target: (B, H, W) or (B, H, W, 1) target in {0, 1}.
    gamma: focusing exponent, >= 0.
    alpha: weight of the positive class, in [0, 1].

  Returns:
    Scalar float32 loss.
  """
  if not gamma >= 0:
    raise ValueError(f"focal: gamma={gamma} must be >= 0.")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"focal: alpha={alpha} must lie in [0, 1].")
  x, y = _binary_inputs(logits, target, "focal")
  # 1 - p_t as a sigmoid of its own (sigmoid(-x) for y = 1, sigmoid(x) for
  # y = 0) keeps it accurate near 0, where the modulating factor matters.
  q = y * jax.nn.sigmoid(-x) + (1.0 - y) * jax.nn.sigmoid(x)
  # q ** gamma has an infinite derivative at q = 0 for gamma < 1; route the
  # saturated pixels (exact zeros) around the power so gradients stay finite.
  positive = q > 0
  modulating = jnp.where(positive, jnp.where(positive, q, 1.0) ** gamma, 0.0 if gamma > 0 else 1.0)
  alpha_t = alpha * y + (1.0 - alpha) * (1.0 - y)
  return jnp.mean(alpha_t * modulating * _bce_elementwise(x, y))


def bce_dice(logits: jax.Array, target: jax.Array, *, alpha: float = 0.5) -> jax.Array:
  """The paper's loss: alpha * BCE + Dice loss.

  Args:
    logits: (B, H, W, 1) or (B, H, W) logits, any float dtype.
    target: (B, H, W) or (B, H, W, 1) target in {0, 1}.
    alpha: weight of the BCE term.

  Returns:
    Scalar float32 loss.
  """
  return alpha * bce(logits, target) + dice(logits, target)


def ce_dice(logits: jax.Array, target: jax.Array, *, alpha: float = 1.0) -> jax.Array:
  """Multi-class loss (ours): alpha * softmax CE + (1 - mean foreground Dice).

  Args:
    logits: (B, H, W, C) logits with C >= 2, any float dtype.
    target: (B, H, W) or (B, H, W, 1) integer labels in [0, C).
    alpha: weight of the cross-entropy term.

  Returns:
    Scalar float32 loss.
  """
  logits, target = jnp.asarray(logits), jnp.asarray(target)
  if logits.ndim != 4 or logits.shape[-1] < 2:
    raise ValueError(f"ce_dice: logits must be (B, H, W, C) with C >= 2, got shape "
                     f"{logits.shape} (use a binary loss such as 'bce_dice' for one channel).")
  if target.ndim == 4 and target.shape[-1] == 1:
    target = target[..., 0]
  if target.shape != logits.shape[:3]:
    raise ValueError(f"ce_dice: target shape {target.shape} must be (B, H, W) = "
                     f"{logits.shape[:3]} (or with a trailing 1).")
  if not jnp.issubdtype(target.dtype, jnp.integer):
    raise ValueError(f"ce_dice: target dtype {target.dtype} must be an integer class index "
                     f"map; cast it with .astype(jnp.int32).")
  num_classes = logits.shape[-1]
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  one_hot = jax.nn.one_hot(target, num_classes, dtype=jnp.float32)
  ce = -jnp.mean(jnp.sum(one_hot * log_p, axis=-1))
  fg_dice = _soft_dice_per_image(jnp.exp(log_p)[..., 1:], one_hot[..., 1:])  # (B, C - 1)
  return alpha * ce + (1.0 - jnp.mean(fg_dice))


def opacity_logit(logits: jax.Array) -> jax.Array:
  """Logit of P(any opacity), (B, H, W), float32: the one channel, or for C classes
  logsumexp(classes 1..C-1) - logit of class 0 (so sigmoid of it is 1 - P(background))."""
  logits = jnp.asarray(logits).astype(jnp.float32)
  if logits.ndim == 3:
    return logits
  if logits.ndim != 4:
    raise ValueError(f"logits must be (B, H, W, C) or (B, H, W), got shape {logits.shape}.")
  if logits.shape[-1] == 1:
    return logits[..., 0]
  return jax.nn.logsumexp(logits[..., 1:], axis=-1) - logits[..., 0]


def soft_bce_dice(logits: jax.Array, soft: jax.Array, *, alpha: float = 0.5,
                  min_confidence: float = 0.0, hard: bool = False) -> jax.Array:
  """BCE-Dice against a teacher's probabilities (semi-supervised training, ours).

  The student's P(opacity) (`opacity_logit`: any number of classes) is
  compared with the soft target p in [0, 1], or with p > 0.5 when `hard`.
  Pixels whose confidence |2p - 1| is below `min_confidence` carry no loss:
  they are left out of the BCE mean and of both Dice sums.

  Args:
    logits: (B, H, W, C) or (B, H, W) logits.
    soft: (B, H, W) teacher probabilities.
    alpha: weight of the BCE term.
    min_confidence: in [0, 1).
    hard: threshold the target at 0.5.

  Returns:
    Scalar float32: alpha * weighted BCE + (1 - batch mean of the weighted soft Dice).
  """
  x = opacity_logit(logits)
  p = jnp.asarray(soft, jnp.float32)
  if p.shape != x.shape:
    raise ValueError(f"soft_bce_dice: soft target {p.shape} and logits {x.shape} disagree.")
  w = (jnp.abs(2.0 * p - 1.0) >= min_confidence).astype(jnp.float32)
  y = (p > 0.5).astype(jnp.float32) if hard else p
  bce_term = jnp.sum(w * _bce_elementwise(x, y)) / jnp.maximum(jnp.sum(w), 1.0)
  q = jax.nn.sigmoid(x) * w
  yw = y * w
  ratio = (2.0 * jnp.sum(q * yw, axis=(1, 2)) + EPS) / (
      jnp.sum(q, axis=(1, 2)) + jnp.sum(yw, axis=(1, 2)) + EPS)
  return alpha * bce_term + (1.0 - jnp.mean(ratio))


BINARY_LOSSES: dict[str, LossFn] = {
    "mae": mae, "bce": bce, "dice": dice, "iou": iou, "focal": focal, "bce_dice": bce_dice}
MULTICLASS_LOSSES: dict[str, LossFn] = {"ce_dice": ce_dice}
LOSSES: dict[str, LossFn] = {**BINARY_LOSSES, **MULTICLASS_LOSSES}


def get_loss(name: str, **kwargs) -> LossFn:
  """Returns the loss called `name`, with keyword options bound.

  Args:
    name: one of 'mae', 'bce', 'dice', 'iou', 'focal', 'bce_dice' (one-class
      logits) or 'ce_dice' (multi-class logits).
    **kwargs: the loss's keyword options ('focal': gamma, alpha; 'bce_dice'
      and 'ce_dice': alpha).

  Returns:
    A function `(logits, target) -> scalar float32 loss`.
  """
  if name not in LOSSES:
    raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}.")
  fn = LOSSES[name]
  options = [p.name for p in inspect.signature(fn).parameters.values()
             if p.kind is inspect.Parameter.KEYWORD_ONLY]
  unknown = sorted(set(kwargs) - set(options))
  if unknown:
    raise ValueError(f"loss {name!r} has no option(s) {unknown} (config.loss_kwargs); its "
                     f"options: {options or 'none'}. --config=scoat_jax/configs/default.py:{name} "
                     "starts from that loss's options.")
  return functools.partial(fn, **kwargs) if kwargs else fn


def default_kwargs(name: str) -> dict:
  """The keyword options of loss `name` with their default values (for configs)."""
  if name not in LOSSES:
    raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}.")
  return {p.name: p.default for p in inspect.signature(LOSSES[name]).parameters.values()
          if p.kind is inspect.Parameter.KEYWORD_ONLY}


DEEP_SUPERVISION_MODES = ("mean", "last", "none")


def deep_supervision_loss(loss_fn: LossFn, logits: jax.Array | Sequence[jax.Array],
                          target: jax.Array, mode: str) -> jax.Array:
  """Applies `loss_fn` to one head or to the deep-supervision heads.

  Args:
    loss_fn: `(logits, target) -> scalar`, e.g. from `get_loss`.
    logits: a single logits array for mode 'none'; a non-empty list or
      tuple of same-shaped logits arrays (the heads, shallow to deep) for
      modes 'mean' and 'last'.
    target: the target every head is compared with.
    mode: 'mean' (equal-weight mean of the per-head losses), 'last' (the
      deepest, i.e. last, head only) or 'none' (a single head).

  Returns:
    Scalar float32 loss.
  """
  if mode not in DEEP_SUPERVISION_MODES:
    raise ValueError(f"deep supervision mode {mode!r}; use one of {DEEP_SUPERVISION_MODES}.")
  is_list = isinstance(logits, (list, tuple))
  if mode == "none":
    if is_list:
      raise ValueError(f"deep supervision mode 'none' expects one logits array, got a "
                       f"{type(logits).__name__} of {len(logits)}; use mode 'mean' or 'last'.")
    return loss_fn(logits, target)
  if not is_list:
    raise ValueError(f"deep supervision mode {mode!r} expects a list of head logits, got one "
                     f"array of shape {jnp.shape(logits)}; build the model with deep "
                     f"supervision or use mode 'none'.")
  if not logits:
    raise ValueError(f"deep supervision mode {mode!r}: the list of head logits is empty.")
  shapes = {tuple(jnp.shape(h)) for h in logits}
  if len(shapes) != 1:
    raise ValueError(f"deep supervision heads have different shapes {sorted(shapes)}; "
                     f"every head must match the target.")
  if mode == "last":
    return loss_fn(logits[-1], target)
  return sum(loss_fn(h, target) for h in logits) / len(logits)
