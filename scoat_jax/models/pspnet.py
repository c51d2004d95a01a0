"""PSPNet on a dilated ResNet-50 (Table II's "PSPNet" baseline).

Zhao, Shi, Qi, Wang and Jia, "Pyramid Scene Parsing Network", CVPR 2017
(Fig. 3): a pyramid pooling module on the last feature map of a dilated
ResNet, concatenated with that map, then a conv and the classifier:

    x (H x W x C_in)
    backbone    dilated ResNet-50 (resnet.py), f = layer4 at H/8, C = widths[4]
    ppm         for each bin b in `bins` (1, 2, 3, 6), branch `ppm/bin_{b}`:
                  adaptive avg-pool to b x b -> conv 1x1 C -> C // 4, no bias
                  -> bn -> ReLU -> bilinear up to f's size
                cat(f, bin_1, bin_2, bin_3, bin_6)          C + 4 (C // 4) = 2C
    head        conv 3x3 2C -> C // 4, no bias -> bn -> ReLU
    dropout     channel dropout, rate `dropout_rate` (the original's Dropout2d 0.1)
    classifier  conv 1x1 -> num_classes, with bias
    up          bilinear to H x W (align_corners=False)  -> logits

Adaptive pooling follows PyTorch's `AdaptiveAvgPool2d`: output bin i of a
length-n axis averages [floor(i n / b), ceil((i + 1) n / b)), so bins
overlap when b does not divide n (at 256 px the map is 32 x 32: bins 3 and 6
do not divide it), and a map smaller than b repeats pixels.

No torchvision reference exists. Trainable parameters at widths (64, 256,
512, 1024, 2048), one input channel, one class: 46,576,065 =
  backbone 23,501,760 (torchvision's resnet50 without fc, one-channel conv1)
  + ppm 4 x (2048 x 512 + 2 x 512) = 4,198,400
  + head 3 x 3 x 4096 x 512 + 2 x 512 = 18,875,392
  + classifier 512 + 1 = 513
as the authors' `semseg` PSPNet (hszhao/semseg, `PPM` reduction_dim =
2048 / len(bins) and `cls` conv 4096 -> 512) builds its head. Numerics
checked against a PyTorch model assembled for the purpose (torchvision's
backbone, `semseg`'s PPM and `cls` with align_corners=False), random weights
copied in: at 64 px (an 8 x 8 map, so bins 3 and 6 overlap and repeat
pixels) eval-mode logits agree to 3.5e-4 on values up to 171 (2e-6
relative), train mode to 8e-5 on values up to 0.8.

Design choices: the backbone is the torchvision-style ResNet-50 FCN and
DeepLabV3 use, so the three baselines differ only in their heads (`semseg`'s
ResNet has a deep stem of three 3x3 convs, and dilates every conv2 of layer3
by 2 and of layer4 by 4, block0 included, where torchvision's block0 keeps
the previous stage's dilation). Up-sampling uses
align_corners=False like the two torchvision models (the authors' `semseg`
code uses align_corners=True). The original's auxiliary head on layer3
(conv 3x3 1024 -> 256, BN, ReLU, dropout, 1x1, loss weight 0.4) is not
built: every Table II network is trained with the same single-output loss.
Dropout needs a 'dropout' rng in training (see fcn.py). Initialisation and BN follow the
project (resnet.py docstring).
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scoat_jax.models import resnet

ModuleDef = Any

NAME = "PSPNet"
DEFAULT_BINS = (1, 2, 3, 6)
ORIGINAL_DROPOUT = 0.1


def adaptive_pool_matrix(n: int, bins: int) -> np.ndarray:
  """(bins, n) averaging matrix of PyTorch's adaptive average pooling along one axis."""
  m = np.zeros((bins, n), np.float32)
  for i in range(bins):
    start, end = (i * n) // bins, -(-((i + 1) * n) // bins)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, bins: int) -> jax.Array:
  """NHWC adaptive average pooling to bins x bins (`nn.AdaptiveAvgPool2d(bins)`).

  Written as two small matrix products (rows, then columns), exact for any
  size: bins that overlap or repeat pixels need no special case.
  """
  _, h, w, _ = x.shape
  rows = jnp.asarray(adaptive_pool_matrix(h, bins), x.dtype)
  cols = jnp.asarray(adaptive_pool_matrix(w, bins), x.dtype)
  y = jnp.einsum("ph,bhwc->bpwc", rows, x)
  return jnp.einsum("qw,bpwc->bpqc", cols, y)


class PyramidPooling(nn.Module):
  """The pyramid pooling module: `bin_{b}` branches concatenated after the input.

  Attributes:
    features: channels of each branch.
    bins: output sizes of the adaptive pools.
    conv, norm: the network's convolution and batch norm.
  """
  features: int
  bins: Sequence[int]
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _, h, w, _ = x.shape
    branches = [x]
    for b in self.bins:
      y = resnet.ConvBNReLU(self.features, 1, self.conv, self.norm, name=f"bin_{b}")(
          adaptive_avg_pool(x, b))
      branches.append(resnet.resize_bilinear(y, h, w))
    return jnp.concatenate(branches, axis=-1)


class PSPNet(resnet.Segmenter):
  """PSPNet-ResNet-50 returning logits at the input resolution (no sigmoid/softmax).

  Attributes (and class facts) of `resnet.Segmenter`, each pyramid branch and
  the head widths[4] // 4 wide, and:
    bins: pyramid bin sizes (the paper's 1, 2, 3, 6).
    dropout_rate: dropout before the classifier in training (the original
      0.1; needs a 'dropout' rng when > 0).
  """
  bins: Sequence[int] = DEFAULT_BINS
  dropout_rate: float = 0.1

  NAME: ClassVar[str] = NAME

  def check_attributes(self, widths: tuple[int, ...]) -> None:
    bins = tuple(self.bins)
    if not bins or len(set(bins)) != len(bins) or min(bins) < 1:
      raise ValueError(f"{NAME}: bins must be distinct positive sizes, got {self.bins}")

  def head(self, features: jax.Array, widths: tuple[int, ...], conv: ModuleDef,
           norm: ModuleDef, train: bool) -> jax.Array:
    y = PyramidPooling(widths[4] // 4, tuple(self.bins), conv, norm, name="ppm")(features)
    y = resnet.ConvBNReLU(widths[4] // 4, 3, conv, norm, name="head")(y)
    # Dropout2d: one draw per channel of each slice, shared over the pixels.
    return nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2), deterministic=not train,
                      name="dropout")(y)
