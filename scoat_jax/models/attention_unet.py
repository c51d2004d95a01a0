"""Attention U-Net: a U-Net whose skip connections pass through additive attention gates.

Oktay, Schlemper, Le Folgoc, Lee, Heinrich, Misawa, Mori, McDonagh, Hammerla,
Kainz, Glocker and Rueckert, "Attention U-Net: Learning Where to Look for the
Pancreas", MIDL 2018.

Nodes named as in the U-Net grid (row i = depth, widths 32, 64, 128, 256, 512):

    x_0_0 --> gate_0 --> x_0_4 -> head (1x1 conv)
      x_1_0 --> gate_1 --> x_1_3       gate_{i}: a = sigmoid(BN(psi(ReLU(BN(W_g up_{i}) + BN(W_x x_{i}_0)))))
        x_2_0 --> gate_2 --> x_2_2                 gated skip = a * x_{i}_0
          x_3_0 --> gate_3 --> x_3_1   up_{i}: transposed conv of the node below, widths[i+1] -> widths[i]
                x_4_0                  x_{i}_{4-i} = merge(cat(gate_{i} output, up_{i}))

* encoder `x_{i}_0`: conv3x3-BN-ReLU-conv3x3-BN-ReLU (`VGGBlock`), the first
  conv with stride 2 for i >= 1 (no pooling);
* `up_{i}`: 3x3 transposed conv, stride 2 (exactly 2x the size), BN, ReLU;
* `gate_{i}`: the additive gate, gating signal `up_{i}`, inner width
  widths[i] // 2, every 1x1 conv with bias; its map `a` (one channel) is sown
  as `intermediates/gate_{i}/attention`;
* decoder `x_{i}_{4-i}` ("merge"): conv3x3(bias), InstanceNorm (no affine),
  PReLU (one slope, init 0.25);
* `head`: 1x1 conv with bias.

Reference: MONAI 1.6 `monai.networks.nets.AttentionUnet(spatial_dims=2,
in_channels=1, out_channels=1, channels=(32, 64, 128, 256, 512),
strides=(2, 2, 2, 2))`, dropout 0 (its Dropout(p=0) layers are omitted). Its
`model.0` is our x_0_0, each nested `AttentionLayer` at depth i holds our
x_{i+1}_0 (`submodule.0`), gate_{i} (`attention`), up_{i} (`upconv`) and
x_{i}_{4-i} (`merge`), the bottom layer's `submodule` is x_4_0; `model.2` is
`head`. Trainable parameters at 1 input channel, 1 class: 7,939,745, equal to
MONAI's. With MONAI's random weights copied in (transposed-conv kernels
flipped: ours[h, w, i, o] = torch[i, o, 2 - h, 2 - w]; random BN statistics),
the logits agree to 4e-6 in eval mode and 1.3e-5 in train mode (max abs
difference, logits of magnitude ~1.5, batch 2, 64 px, float32, CPU).

Design choices: MONAI's (the paper gates a 3D U-Net with grid-based gating
signals taken one level deeper and resampled; MONAI, and we, gate each skip
with the already up-sampled decoder feature at the skip's resolution). The
weights start He-normal (fan-in) with zero biases like the other networks, not
with PyTorch's default initialisation.
"""
from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from scoat_jax.models import base, layers
from scoat_jax.models.unet_blocks import VGGBlock

Dtype = Any
ModuleDef = Any

DEPTH = base.GRID_DEPTH  # Four stride-2 convolutions: inputs must be multiples of 2**4.
PRELU_INIT = 0.25  # PyTorch's nn.PReLU default.


class UpConv(nn.Module):
  """3x3 transposed convolution, stride 2 (output exactly 2x), bias, then BN and ReLU.

  Equals PyTorch's ConvTranspose2d(k=3, stride=2, padding=1, output_padding=1):
  a stride-1 convolution of the input dilated by 2, padded by 1 before and 2
  after, with the spatially flipped kernel (kept unflipped here, see the
  module docstring for the weight mapping).

  Attributes:
    features: output channels.
    norm: the network's batch norm.
    dtype: compute dtype; parameters float32.
  """
  features: int
  norm: ModuleDef
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.ConvTranspose(self.features, (3, 3), strides=(2, 2), padding=((1, 2), (1, 2)),
                         kernel_init=layers.he_normal, bias_init=nn.initializers.zeros,
                         dtype=self.dtype, param_dtype=jnp.float32, name="conv")(x)
    return nn.relu(self.norm(name="bn")(y))


class AttentionGate(nn.Module):
  """Additive attention gate: skip * sigmoid(BN(psi(ReLU(BN(W_g g) + BN(W_x skip))))).

  The one-channel map is sown as `intermediates/<this module>/attention`.

  Attributes:
    features: inner width (MONAI: the skip's width // 2).
    conv: the network's convolution.
    norm: the network's batch norm.
  """
  features: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, gating: jax.Array, skip: jax.Array) -> jax.Array:
    conv, norm = self.conv, self.norm
    g = norm(name="gating_bn")(conv(self.features, 1, name="gating_conv")(gating))
    s = norm(name="skip_bn")(conv(self.features, 1, name="skip_conv")(skip))
    psi = conv(1, 1, name="psi_conv")(nn.relu(g + s))
    attention = nn.sigmoid(norm(name="psi_bn")(psi))
    self.sow("intermediates", "attention", attention)
    return skip * attention


class MergeBlock(nn.Module):
  """MONAI's merge convolution: conv3x3(bias), InstanceNorm without affine, PReLU.

  Attributes:
    features: output channels.
    conv: the network's convolution.
    dtype: compute dtype; the PReLU slope is a float32 parameter.
  """
  features: int
  conv: ModuleDef
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(self.features, 3, name="conv")(x)
    y = nn.InstanceNorm(epsilon=layers.BN_EPSILON, use_scale=False, use_bias=False,
                        dtype=self.dtype, param_dtype=jnp.float32, name="norm")(y)
    return nn.PReLU(param_dtype=jnp.float32, negative_slope_init=PRELU_INIT, name="prelu")(y)


class AttentionUNet(base.GridNetwork):
  """Attention U-Net returning logits (no sigmoid/softmax inside).

  Attributes and class facts of `base.GridNetwork`: `widths` are the channels
  of rows 0..4 (MONAI's `channels`), `conv` the module of every non-transposed
  conv; the gates are sown as `intermediates/gate_{i}/attention`.
  """
  NAME: ClassVar[str] = "Attention U-Net"
  DOWNSAMPLING: ClassVar[str] = "four stride-2 convolutions"
  attention_maps: ClassVar[tuple[str, ...]] = tuple(f"gate_{i}" for i in range(DEPTH))
  # The skips, the up-sampled feature, the gated skip and the concatenation of a row are
  # alive at its peak: about 8 row-sized arrays (an estimate).
  LIVE_ARRAYS: ClassVar[int] = 8

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Segments a batch of slices.

    Args:
      x: float array (batch, height, width, channels); height and width
        multiples of 16.
      train: use batch statistics in BatchNorm.

    Returns:
      Logits (batch, height, width, num_classes) in float32.
    """
    y, widths, conv, norm = self.prepare(x, train=train)
    dtype = self.dtype
    encoder = []
    for i in range(DEPTH + 1):
      y = VGGBlock(widths[i], conv=conv, norm=norm, strides=2 if i else 1, name=f"x_{i}_0")(y)
      encoder.append(y)
    for i in reversed(range(DEPTH)):
      up = UpConv(widths[i], norm=norm, dtype=dtype, name=f"up_{i}")(y)
      gated = AttentionGate(widths[i] // 2, conv=conv, norm=norm, name=f"gate_{i}")(
          up, encoder[i])
      y = MergeBlock(widths[i], conv=conv, dtype=dtype, name=f"x_{i}_{DEPTH - i}")(
          jnp.concatenate([gated, up], axis=-1))
    return conv(self.num_classes, 1, name="head")(y).astype(jnp.float32)
