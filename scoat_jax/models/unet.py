"""U-Net, the paper's baseline, as in the PyTorch port the baselines follow.

Ronneberger, Fischer and Brox, "U-Net: Convolutional Networks for Biomedical
Image Segmentation", MICCAI 2015.

Nodes named as in the UNet++ grid (row i = depth, widths 32, 64, 128, 256,
512; column j = decoder step), each a `VGGBlock` (conv3x3-BN-ReLU twice):

    x_0_0 ------------------------------> x_0_4 -> head (1x1 conv)
       x_1_0 ----------------------> x_1_3
          x_2_0 --------------> x_2_2
             x_3_0 ------> x_3_1
                  x_4_0

Down: 2x2 max-pool before x_{i}_0 (i >= 1). Up: decoder node
x_{i}_{4-i} = VGGBlock(cat(x_{i}_0, up(x_{i+1}_{3-i}))), `up` the bilinear x2
up-sampling with align_corners=True.

Reference: `UNet` of the PyTorch port "pytorch-nested-unet" (4uiiurz1,
archs.py at commit 4e36fdd; its `convI_J` is our `x_{i}_{j}`, `final` our
`head`). Trainable parameters at 1 input channel, 1 class: 7,851,969, equal
to the port's `UNet` (input_channels=1, num_classes=1). With the weights of
a PyTorch reproduction of that class copied in (random BN statistics), the
logits agree to 6e-8 in eval mode (max abs difference, 32 px, float32, CPU).

Design choices (the port's, where the 2015 paper differs): 'same' padding
rather than valid convolutions and cropping, BatchNorm after each conv, conv
biases, bilinear up-sampling rather than up-convolutions, widths 32-512
rather than 64-1024, one 1x1 head.
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from scoat_jax.models import base, layers
from scoat_jax.models.unet_blocks import VGGBlock

DEPTH = base.GRID_DEPTH  # Four 2x2 max-pools: inputs must be multiples of 2**4.


class UNet(base.GridNetwork):
  """U-Net returning logits (no sigmoid/softmax inside).

  Attributes and class facts of `base.GridNetwork`: `widths` are the channels
  of rows 0..4; no attention maps.
  """
  NAME: ClassVar[str] = "U-Net"
  # Each row's encoder output stays alive for its skip, plus a concatenation and the
  # block's intermediates at the peak: about 6 row-sized arrays (an estimate).
  LIVE_ARRAYS: ClassVar[int] = 6

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
    encoder = []
    for i in range(DEPTH + 1):
      if i:
        y = layers.max_pool2x(y)
      y = VGGBlock(widths[i], conv=conv, norm=norm, name=f"x_{i}_0")(y)
      encoder.append(y)
    for i in reversed(range(DEPTH)):
      j = DEPTH - i
      y = jnp.concatenate([encoder[i], layers.upsample2x_align_corners(y)], axis=-1)
      y = VGGBlock(widths[i], conv=conv, norm=norm, name=f"x_{i}_{j}")(y)
    return conv(self.num_classes, 1, name="head")(y).astype(jnp.float32)
