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

from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from scoat_jax.models import layers
from scoat_jax.models.conv import Conv
from scoat_jax.models.unet_blocks import VGGBlock

Dtype = Any
ModuleDef = Any

DEFAULT_WIDTHS = (32, 64, 128, 256, 512)
DEPTH = 4  # Four 2x2 max-pools: inputs must be multiples of 2**4.


class UNet(nn.Module):
  """U-Net returning logits (no sigmoid/softmax inside).

  Attributes:
    num_classes: output channels.
    widths: channels of rows 0..4.
    dtype: compute dtype (float32 or bfloat16); parameters and logits float32.
    in_channels: expected input channels; None accepts any.
    conv: the convolution module every node uses.

  Class facts:
    input_multiple: height and width must be multiples of this.
    attention_maps: none.
  """
  num_classes: int = 1
  widths: Sequence[int] = DEFAULT_WIDTHS
  dtype: Dtype = jnp.float32
  in_channels: int | None = None
  conv: ModuleDef = Conv

  input_multiple: ClassVar[int] = 2**DEPTH
  attention_maps: ClassVar[tuple[str, ...]] = ()

  def inference_bytes_per_slice(self, size: int) -> int:
    """Rough peak activation bytes of one size x size slice in inference.

    Row i holds size^2 / 4^i pixels of widths[i] channels; the encoder output
    of each row stays alive for its skip, plus a concatenation and the block's
    intermediates at the peak: about 6 such arrays (an estimate).
    """
    pixels_x_channels = sum(w * size * size / 4**i for i, w in enumerate(self.widths))
    return int(6 * jnp.dtype(self.dtype).itemsize * pixels_x_channels)

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
    layers.check_input_shape("U-Net", x.shape, self.input_multiple, "four 2x2 max-pools",
                             in_channels=self.in_channels)
    if len(self.widths) != DEPTH + 1:
      raise ValueError(f"widths must give {DEPTH + 1} row widths, got {self.widths}")
    widths, dtype = tuple(self.widths), self.dtype
    conv = layers.conv_def(self.conv, dtype=dtype)
    norm = layers.norm_def(train=train, dtype=dtype)

    y = x.astype(dtype)
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
