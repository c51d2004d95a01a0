"""DeepLabV3 on a dilated ResNet-50 (Table II's "DeepLabV3" baseline).

Chen, Papandreou, Schroff and Adam, "Rethinking Atrous Convolution for
Semantic Image Segmentation", arXiv:1706.05587, 2017, in the form of
torchvision's `deeplabv3_resnet50`: atrous spatial pyramid pooling (ASPP)
with image-level features on the last map of a dilated ResNet-50.

    x (H x W x C_in)
    backbone   dilated ResNet-50 (resnet.py), f = layer4 at H/8, C = widths[4]
    aspp       five branches on f, A = C // 8 channels each (256 at full widths):
                 aspp/conv1x1      conv 1x1 -> bn -> ReLU
                 aspp/atrous_{k}   conv 3x3, dilation atrous_rates[k-1] (12, 24, 36)
                                   -> bn -> ReLU, k = 1, 2, 3
                 aspp/image_pool   global avg-pool -> conv 1x1 -> bn -> ReLU
                                   -> bilinear up (a broadcast) to f's size
               cat (5A) -> aspp/project conv 1x1 -> A -> bn -> ReLU
               -> dropout `dropout_rate` (torchvision's 0.5)
    head       conv 3x3 A -> A -> bn -> ReLU
    classifier conv 1x1 -> num_classes, with bias
    up         bilinear to H x W (align_corners=False)  -> logits

All convs but the classifier have no bias. Reference: torchvision 0.29
`deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=1,
aux_loss=False)` with `backbone.conv1 = Conv2d(1, 64, 7, 2, 3, bias=False)`:
39,627,457 trainable parameters (backbone 23,501,760, head 16,125,697), ours
the same, with the same parameter tree and shapes. Numerics checked against
it: a random-initialised model (BN parameters and statistics randomised too)
copied in with `from_torchvision` gives the same logits at 64 px, batch 2,
to float32 rounding: eval mode max abs difference 1.2e-5 on logits up to 4.7;
train mode (batch statistics, dropout 0) 2.7e-4 on logits up to 0.9 (Flax's
one-pass batch variance, here also over the image-pooling branch's two
samples).

Design choices: torchvision's auxiliary FCN head on layer3 is not built (its
default `aux_loss=None` builds none). The image-pooling branch normalises a
1 x 1 map: in training BN's statistics are over the batch alone, and with
batch 1 PyTorch raises ("Expected more than 1 value per channel when
training"); Flax computes it, the normalised value is then 0 and the branch
outputs ReLU(bn bias), a constant. Dropout needs a 'dropout' rng in
training (see fcn.py). At
256 px the map is 32 x 32, so the rate-24 and rate-36 taps off the centre
fall mostly on padding, as in the paper's remark on large rates (hence the
image-level branch). Initialisation and BN follow the project (resnet.py).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from scoat_jax.models import resnet

ModuleDef = Any

NAME = "DeepLabV3"
DEFAULT_ATROUS_RATES = (12, 24, 36)
TORCHVISION_DROPOUT = 0.5


def torchvision_head_map(num_rates: int = len(DEFAULT_ATROUS_RATES)) -> dict[str, str]:
  """torchvision `classifier.*` module names -> Flax module paths (DeepLabHead)."""
  aspp = "classifier.0"
  names = {f"{aspp}.convs.0.0": "aspp/conv1x1/conv", f"{aspp}.convs.0.1": "aspp/conv1x1/bn"}
  for k in range(1, num_rates + 1):
    names[f"{aspp}.convs.{k}.0"] = f"aspp/atrous_{k}/conv"
    names[f"{aspp}.convs.{k}.1"] = f"aspp/atrous_{k}/bn"
  pool = f"{aspp}.convs.{num_rates + 1}"  # AdaptiveAvgPool2d, conv, BN, ReLU
  names[f"{pool}.1"], names[f"{pool}.2"] = "aspp/image_pool/conv", "aspp/image_pool/bn"
  names[f"{aspp}.project.0"], names[f"{aspp}.project.1"] = "aspp/project/conv", "aspp/project/bn"
  names.update({"classifier.1": "head/conv", "classifier.2": "head/bn",
                "classifier.4": "classifier"})
  return names


def from_torchvision(state_dict: Mapping[str, Any]) -> dict:
  """Flax variables from the state dict of torchvision's `deeplabv3_resnet50` (no aux head)."""
  return resnet.torchvision_to_flax(
      state_dict, {**resnet.torchvision_backbone_map(), **torchvision_head_map()})


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling with image-level features, then the projection.

  Attributes:
    features: channels of every branch and of the projection.
    atrous_rates: dilations of the 3x3 branches `atrous_1 ..`.
    dropout_rate: dropout after the projection in training.
    train: dropout on.
    conv, norm: the network's convolution and batch norm.
  """
  features: int
  atrous_rates: Sequence[int]
  dropout_rate: float
  train: bool
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    block = lambda k, name, dilation=1: resnet.ConvBNReLU(
        self.features, k, self.conv, self.norm, dilation=dilation, name=name)
    branches = [block(1, "conv1x1")(x)]
    for k, rate in enumerate(self.atrous_rates, start=1):
      branches.append(block(3, f"atrous_{k}", rate)(x))
    pooled = block(1, "image_pool")(jnp.mean(x, axis=(1, 2), keepdims=True))
    # Bilinear up-sampling of a 1 x 1 map is a broadcast.
    branches.append(jnp.broadcast_to(pooled, x.shape[:3] + pooled.shape[3:]))
    y = block(1, "project")(jnp.concatenate(branches, axis=-1))
    return nn.Dropout(self.dropout_rate, deterministic=not self.train, name="dropout")(y)


class DeepLabV3(resnet.Segmenter):
  """DeepLabV3-ResNet-50 returning logits at the input resolution (no sigmoid/softmax).

  Attributes (and class facts) of `resnet.Segmenter`, ASPP and the head
  widths[4] // 8 wide, and:
    atrous_rates: dilations of ASPP's three 3x3 branches (12, 24, 36 at
      output stride 8).
    dropout_rate: dropout after ASPP's projection in training (torchvision
      0.5; needs a 'dropout' rng when > 0).
  """
  atrous_rates: Sequence[int] = DEFAULT_ATROUS_RATES
  dropout_rate: float = 0.5

  NAME: ClassVar[str] = NAME

  def check_attributes(self, widths: tuple[int, ...]) -> None:
    if widths[4] % 8:
      raise ValueError(f"{NAME}: widths[4] must divide by 8 (ASPP has widths[4] // 8 "
                       f"channels), got {widths}")
    if not self.atrous_rates or min(self.atrous_rates) < 1:
      raise ValueError(f"{NAME}: atrous_rates must be positive dilations, got "
                       f"{self.atrous_rates}")

  def head(self, features: jax.Array, widths: tuple[int, ...], conv: ModuleDef,
           norm: ModuleDef, train: bool) -> jax.Array:
    y = ASPP(widths[4] // 8, tuple(self.atrous_rates), self.dropout_rate, train, conv, norm,
             name="aspp")(features)
    return resnet.ConvBNReLU(widths[4] // 8, 3, conv, norm, name="head")(y)
