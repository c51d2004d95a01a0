"""Building blocks shared by the segmentation networks.

SCOAT-Net (Zhao et al., Pattern Recognition 119, 2021) is a UNet++ whose nodes
are residual blocks, with two attention modules added on the decoder:

* `ResBlock`: conv3x3-BN-ReLU-conv3x3-BN plus a conv1x1-BN shortcut, then ReLU.
* `SpatialAttention` (the paper's SAM): a one-channel gate computed from a
  same-row feature and the up-sampled deeper feature; it re-weights the
  up-sampled feature residually, `up + a * up`.
* `SqueezeExcitation` and `ChannelAttentionBlock` (the paper's CAM): SE
  re-weighting of the concatenated node input followed by a `ResBlock`.
* `upsample2x_align_corners`: bilinear x2 up-sampling with PyTorch's
  `align_corners=True` semantics, which the authors' model uses.

Initialisation follows the authors' PyTorch model: He-normal conv and dense
kernels (fan-in, ReLU gain), zero biases, BN scale ~ N(1, 0.02), BN bias 0.
BatchNorm matches PyTorch's defaults: epsilon 1e-5, running averages updated
with weight 0.1 for the new batch (Flax momentum 0.9). One documented
difference: PyTorch feeds the running variance the unbiased batch variance,
Flax the biased one (a factor n/(n-1), n = batch x height x width pixels).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from scoat_jax.models.conv import Conv

Dtype = Any
ModuleDef = Any

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # Flax convention; PyTorch's momentum=0.1.
SE_REDUCTION = 16

# PyTorch's kaiming_normal_ draws from an untruncated normal with variance
# 2 / fan_in; JAX's "normal" distribution here is that one (untruncated).
he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def bn_scale_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """BatchNorm scale ~ N(1, 0.02), as in the authors' initialisation."""
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def conv_def(conv: ModuleDef = Conv, *, dtype: Dtype) -> ModuleDef:
  """SCOAT-Net's convolution: stride 1, 'same', with bias, He-normal kernel, zero bias.

  Args:
    conv: the convolution module the network was given (e.g. `Conv` with a
      chosen CPU weight-gradient path); called as `conv(features, kernel_size,
      name=...)`.
    dtype: compute dtype.
  """
  return functools.partial(conv, dtype=dtype, kernel_init=he_normal,
                           bias_init=nn.initializers.zeros)


def norm_def(*, train: bool, dtype: Dtype) -> ModuleDef:
  """BatchNorm as in PyTorch's defaults (see the module docstring); called as `norm(name=...)`."""
  return functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
      scale_init=bn_scale_init, bias_init=nn.initializers.zeros,
      dtype=dtype, param_dtype=jnp.float32)


def check_input_shape(network: str, shape: Sequence[int], multiple: int, reason: str,
                      in_channels: int | None = None) -> None:
  """Raises ValueError unless `shape` is NHWC with height and width multiples of `multiple`.

  Args:
    network: the network's name for the message (e.g. 'SCOAT-Net').
    shape: the input's shape.
    multiple: height and width must divide by it.
    reason: why, e.g. 'four 2x2 max-pools'.
    in_channels: the channels the network expects (None: any).
  """
  if len(shape) != 4:
    raise ValueError(
        f"{network} takes NHWC input (batch, height, width, channels); got shape "
        f"{tuple(shape)}: add the missing axes (e.g. x[..., None] for channels).")
  height, width = shape[1], shape[2]
  if height % multiple or width % multiple:
    raise ValueError(
        f"{network} needs height and width divisible by {multiple} ({reason}); got "
        f"{height}x{width}: resize or pad the slice first (the input pipeline letterboxes "
        f"to config.data.image_size).")
  if in_channels is not None and shape[-1] != in_channels:
    raise ValueError(f"this {network} takes {in_channels} input channel(s), got input of "
                     f"shape {tuple(shape)}.")


def _upsample_axis(x: jax.Array, axis: int) -> jax.Array:
  """Doubles one axis of `x` by linear interpolation with aligned corners.

  Output sample o of a length-n axis sits at source coordinate
  s = o (n - 1) / (2n - 1), so the first and last samples of both grids
  coincide. Worked out per parity, the two source neighbours are fixed:

    o = 2i + 1:  s = i + (n - 1 - i) / (2n - 1)       between x[i] and x[i + 1]
    o = 2i:      s = i - 1 + (2n - 1 - i) / (2n - 1)  between x[i - 1] and x[i]

  (at the ends the weight of the missing neighbour is 0). So the result is
  two shifted copies of x blended with per-position weights, interleaved:
  slices and elementwise arithmetic that XLA fuses, and whose gradient is the
  same, where gathering the neighbours by index makes a scatter-add of the
  gradient (on the CPU, gather and scatter-add cost ~0.1 s of a 256-px
  train step).
  """
  n = x.shape[axis]
  first = lax.slice_in_dim(x, 0, 1, axis=axis)
  last = lax.slice_in_dim(x, n - 1, n, axis=axis)
  previous = jnp.concatenate([first, lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
  following = jnp.concatenate([lax.slice_in_dim(x, 1, n, axis=axis), last], axis=axis)
  i = np.arange(n, dtype=np.float64)
  shape = [1] * x.ndim
  shape[axis] = n
  weight = lambda w: jnp.asarray(w.astype(np.float32).reshape(shape), x.dtype)
  to_even = (2 * n - 1 - i) / (2 * n - 1)  # weight of x[i] in output 2i
  to_odd = (n - 1 - i) / (2 * n - 1)  # weight of x[i + 1] in output 2i + 1
  even = previous * weight(1 - to_even) + x * weight(to_even)
  odd = x * weight(1 - to_odd) + following * weight(to_odd)
  out = jnp.stack([even, odd], axis=axis + 1)
  return out.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 1:])


def upsample2x_align_corners(x: jax.Array) -> jax.Array:
  """Bilinear x2 up-sampling of an NHWC array, `align_corners=True` semantics.

  `jax.image.resize` places samples at half-pixel centres, a different function;
  parity with the authors' PyTorch model needs this one. Bilinear interpolation
  is separable, so rows and columns are interpolated one after the other.

  Args:
    x: array of shape (batch, height, width, channels).

  Returns:
    Array of shape (batch, 2 * height, 2 * width, channels).
  """
  return _upsample_axis(_upsample_axis(x, 1), 2)


def max_pool2x(x: jax.Array) -> jax.Array:
  """2x2 max-pool with stride 2 (height and width must be even).

  Written as a max over a reshaped axis pair rather than a reduce-window: the
  gradient is then an elementwise mask, where XLA's CPU backend differentiates
  a windowed max through four index arrays the size of the input (on a 256-px
  train step that argmax cost more than the pool itself). A window whose
  maximum is tied shares the gradient among the tied inputs; after a ReLU the
  only ties are zeros, whose gradient the ReLU stops anyway.
  """
  b, h, w, c = x.shape
  if h % 2 or w % 2:
    raise ValueError(f"max_pool2x needs an even height and width, got {h}x{w}")
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class ResBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN + conv1x1-BN shortcut, added, then ReLU.

  The shortcut projection is always present, also when input and output widths
  agree: that is how the authors' model is built, and its parameters count.

  Attributes:
    features: output channels (the middle width equals it).
    conv: the network's convolution (`conv_def`).
    norm: the network's batch norm (`norm_def`), in train or eval mode.
  """
  features: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv, norm = self.conv, self.norm
    y = conv(self.features, 3, name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = conv(self.features, 3, name="conv2")(y)
    y = norm(name="bn2")(y)
    shortcut = conv(self.features, 1, name="shortcut_conv")(x)
    shortcut = norm(name="shortcut_bn")(shortcut)
    return nn.relu(y + shortcut)


class SpatialAttention(nn.Module):
  """The spatial attention module (SAM) of SCOAT-Net.

  a = sigmoid(BN(conv1x1->1(ReLU(BN(conv1x1(lateral)) + BN(conv1x1(up))))))

  The map gates the up-sampled deeper feature residually, `up + a * up`
  (Attention U-Net gates the skip connection instead; SCOAT-Net does not).
  The map is sown as `intermediates/<this module>/attention` for inspection
  (paper Fig. 5): apply with `mutable=['intermediates']` to collect it.

  Attributes:
    conv: the network's convolution (`conv_def`).
    norm: the network's batch norm (`norm_def`).
  """
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, lateral: jax.Array, up: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns `(up + a * up, a)`; `a` has one channel, values in (0, 1).

    Args:
      lateral: the most recent node of the same row, (B, H, W, C_lat).
      up: the up-sampled deeper node, (B, H, W, C_up).
    """
    width = lateral.shape[-1]
    conv, norm = self.conv, self.norm
    theta = norm(name="lateral_bn")(conv(width, 1, name="lateral_conv")(lateral))
    phi = norm(name="up_bn")(conv(width, 1, name="up_conv")(up))
    psi = conv(1, 1, name="psi_conv")(nn.relu(theta + phi))
    attention = nn.sigmoid(norm(name="psi_bn")(psi))
    self.sow("intermediates", "attention", attention)
    return up + attention * up, attention


class SqueezeExcitation(nn.Module):
  """Channel re-weighting: x * sigmoid(W2 ReLU(W1 avgpool(x))), no biases.

  Attributes:
    reduction: W1 maps C channels to C // reduction.
    dtype: compute dtype; parameters stay float32.
  """
  reduction: int = SE_REDUCTION
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    if channels < self.reduction:
      raise ValueError(
          f"channel attention needs at least {self.reduction} input channels "
          f"(reduction {self.reduction}), got {channels}: use wider `widths`.")
    dense = functools.partial(
        nn.Dense, use_bias=False, kernel_init=he_normal, dtype=self.dtype,
        param_dtype=jnp.float32)
    squeezed = jnp.mean(x, axis=(1, 2))
    hidden = nn.relu(dense(channels // self.reduction, name="fc1")(squeezed))
    weights = nn.sigmoid(dense(channels, name="fc2")(hidden))
    return x * weights[:, None, None, :].astype(x.dtype)


class ChannelAttentionBlock(nn.Module):
  """The channel attention module (CAM): SE on the input, then a ResBlock.

  The ResBlock's shortcut also takes the re-weighted input, as in the
  authors' model.

  Attributes:
    features: output channels.
    conv: the network's convolution (`conv_def`).
    norm: the network's batch norm (`norm_def`).
    dtype: compute dtype of the squeeze-excitation; parameters stay float32.
  """
  features: int
  conv: ModuleDef
  norm: ModuleDef
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = SqueezeExcitation(dtype=self.dtype, name="se")(x)
    return ResBlock(self.features, conv=self.conv, norm=self.norm, name="res")(x)
