"""Blocks shared by the U-Net family baselines (U-Net, UNet++ and its variants).

The baselines of the paper's Table II follow the public PyTorch port
"pytorch-nested-unet" (4uiiurz1, archs.py), whose node is a VGG-style block:

* `VGGBlock`: conv3x3(bias)-BN-ReLU-conv3x3(bias)-BN-ReLU. The port's block
  has a middle width (output of the first conv); every network here uses the
  output width for it, which is the default. A stride on the first conv makes
  it MONAI's Attention U-Net `ConvBlock` (which down-samples that way).
* `VGGNode`: a UNet++ decoder node, `VGGBlock(cat(same_row + [up]))`. It is
  the default `node` of `UNetPlusPlus`, which attention variants replace by
  a module with the same call signature.

Initialisation and BatchNorm settings come from `layers.conv_def` and
`layers.norm_def` (He-normal kernels, zero biases, PyTorch's BN defaults).
Re-exported for the networks: `layers.upsample2x_align_corners` (the port's
`nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True)`) and
`layers.max_pool2x` (its `nn.MaxPool2d(2, 2)`).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from scoat_jax.models import layers

Dtype = Any
ModuleDef = Any

upsample2x_align_corners = layers.upsample2x_align_corners
max_pool2x = layers.max_pool2x


class VGGBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN-ReLU, both convolutions with bias.

  Attributes:
    features: output channels.
    conv: the network's convolution (`layers.conv_def`).
    norm: the network's batch norm (`layers.norm_def`), in train or eval mode.
    middle: channels after the first conv; None (the default) uses `features`.
    strides: stride of the first conv (1: same resolution; 2: halves it).
  """
  features: int
  conv: ModuleDef
  norm: ModuleDef
  middle: int | None = None
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    middle = self.features if self.middle is None else self.middle
    y = self.conv(middle, 3, strides=self.strides, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.features, 3, name="conv2")(y)
    return nn.relu(self.norm(name="bn2")(y))


class Node(nn.Module):
  """The interface every UNet++ decoder node (`UNetPlusPlus.node`) follows.

  Built as `node(features, conv=conv, norm=norm, dtype=dtype, name=f"x_{i}_{j}")`
  and called as `node(same_row, up)` (same_row: the nodes x_{i}_0 .. x_{i}_{j-1};
  up: the up-sampled x_{i+1}_{j-1}), returning `features` channels.

  Attributes:
    features: output channels.
    conv: the network's convolution (`layers.conv_def`).
    norm: the network's batch norm (`layers.norm_def`).
    dtype: compute dtype (the convolutions carry it; nodes with modules of
      their own pass it on).
  """
  features: int
  conv: ModuleDef
  norm: ModuleDef
  dtype: Dtype = jnp.float32

  def __call__(self, same_row: Sequence[jax.Array], up: jax.Array) -> jax.Array:
    raise NotImplementedError(f"{type(self).__name__} computes its node")


class VGGNode(Node):
  """A plain UNet++ decoder node: `VGGBlock(cat(same_row + [up]))` (interface: `Node`)."""

  @nn.compact
  def __call__(self, same_row: Sequence[jax.Array], up: jax.Array) -> jax.Array:
    """Args: same_row: nodes x_{i}_0 .. x_{i}_{j-1}; up: the up-sampled x_{i+1}_{j-1}."""
    x = jnp.concatenate(list(same_row) + [up], axis=-1)
    return VGGBlock(self.features, conv=self.conv, norm=self.norm, name="block")(x)
