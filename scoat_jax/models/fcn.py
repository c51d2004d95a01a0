"""FCN on a dilated ResNet-50 (Table II's "FCN" baseline).

Long, Shelhamer and Darrell, "Fully Convolutional Networks for Semantic
Segmentation", CVPR 2015, in the form of torchvision's `fcn_resnet50`:

    x (H x W x C_in)
    backbone   dilated ResNet-50 (resnet.py: stem, layer1 .. layer4), layer4 at H/8
    head       conv 3x3 widths[4] -> widths[4] // 4, no bias -> bn -> ReLU
    dropout    rate `dropout_rate` (torchvision's 0.1)
    classifier conv 1x1 -> num_classes, with bias
    up         bilinear to H x W (align_corners=False)  -> logits

Reference: torchvision 0.29 `fcn_resnet50(weights=None, weights_backbone=None,
num_classes=1, aux_loss=False)` with `backbone.conv1 = Conv2d(1, 64, 7, 2, 3,
bias=False)`: 32,940,481 trainable parameters (backbone 23,501,760, head
9,437,184 + 1,024 + 513), ours the same, with the same parameter tree and
shapes. Numerics checked against it: a random-initialised model (BN
parameters and statistics randomised too) copied in with `from_torchvision`
gives the same logits at 64 px, batch 2, to float32 rounding: eval mode max
abs difference 2.8e-4 on logits up to 208 (1.3e-6 relative); train mode
(batch statistics, dropout 0) 7e-5 on logits up to 1.3 (Flax computes the
batch variance in one pass, E[x^2] - E[x]^2).

Why this FCN and not the paper's FCN-8s on VGG16: the three ResNet baselines
(FCN, PSPNet, DeepLabV3) then share one backbone, so Table II compares their
heads; torchvision's model is a reference implementation whose parameter
count and outputs can be matched exactly; and FCN-8s carries 134M parameters
(VGG16's fc6/fc7 as 7x7 and 1x1 convs), four times this one, for a one-class
CT problem.

Design choices: torchvision's auxiliary FCN head on layer3 (`aux_loss=True`)
is not built (torchvision's default `aux_loss=None` builds none either).
Dropout needs a 'dropout' rng in training: `apply(..., train=True,
rngs={'dropout': key})`, as `training.optimization.train_step` does (a new
key every step).
Initialisation and BN follow the project (resnet.py docstring).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from scoat_jax.models import layers, resnet
from scoat_jax.models.conv import Conv

Dtype = Any
ModuleDef = Any

NAME = "FCN"
TORCHVISION_DROPOUT = 0.1

# torchvision `classifier.{i}` -> Flax module (FCNHead: conv, BN, ReLU, Dropout, conv).
TORCHVISION_HEAD = {"classifier.0": "head/conv", "classifier.1": "head/bn",
                    "classifier.4": "classifier"}


def from_torchvision(state_dict: Mapping[str, Any]) -> dict:
  """Flax variables from the state dict of torchvision's `fcn_resnet50` (no aux head)."""
  return resnet.torchvision_to_flax(
      state_dict, {**resnet.torchvision_backbone_map(), **TORCHVISION_HEAD})


class FCN(nn.Module):
  """FCN-ResNet-50 returning logits at the input resolution (no sigmoid/softmax).

  Attributes:
    num_classes: output channels.
    widths: stem and layer1..layer4 output widths (ResNet-50: 64, 256, 512,
      1024, 2048); the head's inner width is widths[4] // 4.
    dtype: compute dtype (float32 or bfloat16); parameters and logits float32.
    in_channels: expected input channels; None accepts any.
    conv: the convolution module every layer uses.
    dropout_rate: dropout before the classifier in training (torchvision 0.1;
      needs a 'dropout' rng when > 0).

  Class facts:
    input_multiple: height and width must be multiples of this (output stride 8).
    attention_maps: none.
  """
  num_classes: int = 1
  widths: Sequence[int] = resnet.DEFAULT_WIDTHS
  dtype: Dtype = jnp.float32
  in_channels: int | None = None
  conv: ModuleDef = Conv
  dropout_rate: float = 0.1

  input_multiple: ClassVar[int] = resnet.OUTPUT_STRIDE
  attention_maps: ClassVar[tuple[str, ...]] = ()

  def inference_bytes_per_slice(self, size: int) -> int:
    """About how much memory one size x size slice takes in an inference forward pass.

    See `resnet.inference_bytes_per_slice` (measured: about 50 MB per 256-px
    slice in float32 at full widths).
    """
    widths = resnet.check_widths(NAME, self.widths)
    return resnet.inference_bytes_per_slice(widths, size, self.dtype)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Segments a batch of slices.

    Args:
      x: float array (batch, height, width, in_channels), height and width
        multiples of 8.
      train: batch statistics in BatchNorm (update with `mutable=['batch_stats']`)
        and dropout on.

    Returns:
      Logits (batch, height, width, num_classes), float32.
    """
    layers.check_input_shape(NAME, x.shape, self.input_multiple, "output stride 8",
                             in_channels=self.in_channels)
    widths, dtype = resnet.check_widths(NAME, self.widths), self.dtype
    conv = layers.conv_def(self.conv, dtype=dtype)
    norm = layers.norm_def(train=train, dtype=dtype)

    features = resnet.ResNet(widths, conv, norm, name="backbone")(x.astype(dtype))["layer4"]
    y = resnet.ConvBNReLU(widths[4] // 4, 3, conv, norm, name="head")(features)
    y = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout")(y)
    logits = conv(self.num_classes, 1, name="classifier")(y).astype(jnp.float32)
    return resnet.resize_bilinear(logits, x.shape[1], x.shape[2])
