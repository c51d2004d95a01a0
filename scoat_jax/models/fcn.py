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
from typing import Any, ClassVar

import flax.linen as nn
import jax

from scoat_jax.models import resnet

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


class FCN(resnet.Segmenter):
  """FCN-ResNet-50 returning logits at the input resolution (no sigmoid/softmax).

  Attributes (and class facts) of `resnet.Segmenter`, the head's inner width
  widths[4] // 4, and:
    dropout_rate: dropout before the classifier in training (torchvision 0.1;
      needs a 'dropout' rng when > 0).
  """
  dropout_rate: float = 0.1

  NAME: ClassVar[str] = NAME

  def head(self, features: jax.Array, widths: tuple[int, ...], conv: ModuleDef,
           norm: ModuleDef, train: bool) -> jax.Array:
    y = resnet.ConvBNReLU(widths[4] // 4, 3, conv, norm, name="head")(features)
    return nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout")(y)
