"""UNet++ with residual attention at SCOAT-Net's six nodes (paper Table III, variant V1).

Attention module: Wang, Jiang, Qian, Yang, Li, Zhang, Wang and Tang,
"Residual Attention Network for Image Classification", CVPR 2017. The network
is `UNetPlusPlus` (unet_pp.py) whose decoder nodes on rows 1-3 (x_1_1, x_2_1,
x_3_1, x_1_2, x_2_2, x_1_3, where SCOAT-Net attends) are attention modules.
The SCOAT-Net paper names the variant but gives no wiring; the choices below
are ours.

Node `x_{i}_{j}` (`ResidualAttentionNode`), with x = cat(x_{i}_0 .. x_{i}_{j-1},
u) and u = up(x_{i+1}_{j-1}) as in a plain UNet++ node:

    x ──┬── trunk: T = VGGBlock(x)                        (the plain node, h x w)
        │
        └── mask:  max_pool2x                              (h/2 x w/2)
                   bottom (VGGBlock)                       (h/2 x w/2, widths[i])
                   up (bilinear x2, align corners)         (h x w)
                   conv1-bn1-ReLU, conv2-bn2 (1x1)
                   M = sigmoid(.)                          (h x w x widths[i])

    x_{i}_{j} = (1 + M) * T

  * Trunk branch T: exactly the plain UNet++ node, conv3x3-BN-ReLU twice
    (submodule `trunk`, a `VGGBlock`), so M = 0 gives back UNet++.
  * Soft mask branch M (submodule `mask`, `SoftMaskBranch`): RAN's bottom-up
    top-down structure. RAN pools until the map is about 7x7, so its stage-3
    module (14x14 maps) has a single max-pool with 2r = 2 units at the lowest
    resolution, then one interpolation back (a widely used PyTorch port adds
    the trunk output to the interpolated mask there; the paper does not, nor
    do we). Our deepest attended nodes (row 3) are 1/8 of the input (4x4 at
    32 px), so every node uses that one-level shape: one 2x2 max-pool, a
    `VGGBlock` (two conv3x3-BN-ReLU units, the network's own unit in place of
    RAN's pre-activation residual units) at half resolution, bilinear
    align-corners x2 up-sampling, then RAN's two 1x1 convolutions as
    conv1x1-BN-ReLU, conv1x1-BN (post-activation, like the rest of the net)
    and a sigmoid. With one level there is no skip connection inside the mask
    (RAN's skips join the levels between two pools). The mask has widths[i]
    channels: RAN's mixed attention (a sigmoid per channel and position, its
    best variant), computed from the same input x as the trunk.
  * Attention residual learning: x_{i}_{j} = (1 + M) * T (RAN's H = (1 + M) F).
  * Sown map: the channel mean of M, (B, h, w, 1) in (0, 1), float32, at
    `intermediates/x_{i}_{j}/mask/attention` for each of the six nodes.
  * Sizes: the mask pools once, so a node needs an even height and width
    (ValueError otherwise); inputs multiple of 16 (UNet++'s four pools) give
    row-3 nodes of even size (2x2 at 16 px, 4x4 at 32 px).
  * All convolutions have biases (as UNet++'s port); init and BN as
    `layers.conv_def` / `layers.norm_def`.

Trainable parameters at widths (32, 64, 128, 256, 512), 1 input channel,
1 class (counted with `count_params` on this module; no reference
implementation exists): 13,631,745 with one head, 13,631,844 with the four
deep-supervision heads (UNet++: 9,162,753 / 9,162,852; the six mask
branches add 4,468,992).
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from scoat_jax.models import layers, unet_blocks
from scoat_jax.models.unet_blocks import VGGBlock
from scoat_jax.models.unet_pp import UNetPlusPlus

ModuleDef = Any

ATTENDED_NODES = ("x_1_1", "x_2_1", "x_3_1", "x_1_2", "x_2_2", "x_1_3")


class SoftMaskBranch(nn.Module):
  """RAN's soft mask branch, one level deep: pool, VGGBlock, up-sample, 1x1 convs, sigmoid.

  Returns M of shape (B, H, W, features) in (0, 1) and sows its channel mean
  as `attention`.

  Attributes:
    features: channels of the mask (the trunk's output width).
    conv: the network's convolution (`layers.conv_def`).
    norm: the network's batch norm (`layers.norm_def`).
  """
  features: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    height, width = x.shape[1:3]
    if height % 2 or width % 2:
      raise ValueError(
          f"the residual-attention mask branch max-pools its {height}x{width} input once and "
          "needs an even height and width: give the network inputs that are multiples of 16.")
    m = layers.max_pool2x(x)
    m = VGGBlock(self.features, conv=self.conv, norm=self.norm, name="bottom")(m)
    m = layers.upsample2x_align_corners(m)
    m = nn.relu(self.norm(name="bn1")(self.conv(self.features, 1, name="conv1")(m)))
    m = nn.sigmoid(self.norm(name="bn2")(self.conv(self.features, 1, name="conv2")(m)))
    self.sow("intermediates", "attention",
             jnp.mean(m.astype(jnp.float32), axis=-1, keepdims=True))
    return m


class ResidualAttentionNode(unet_blocks.Node):
  """A UNet++ node as a residual attention module: (1 + M(x)) * T(x), x = cat(same_row, up).

  Attributes and interface of `unet_blocks.Node`.
  """

  @nn.compact
  def __call__(self, same_row: Sequence[jax.Array], up: jax.Array) -> jax.Array:
    """Args: same_row: nodes x_{i}_0 .. x_{i}_{j-1}; up: the up-sampled x_{i+1}_{j-1}."""
    x = jnp.concatenate(list(same_row) + [up], axis=-1)
    trunk = VGGBlock(self.features, conv=self.conv, norm=self.norm, name="trunk")(x)
    mask = SoftMaskBranch(self.features, conv=self.conv, norm=self.norm, name="mask")(x)
    return (1 + mask) * trunk


class UNetPlusPlusResidualAttention(UNetPlusPlus):
  """UNet++ whose six attended nodes are residual attention modules (see the module docstring).

  Attributes and class facts as `UNetPlusPlus`; `attention_maps` lists the
  six soft mask branches (each sows the channel mean of its mask).
  """
  node: ModuleDef = ResidualAttentionNode

  attention_maps: ClassVar[tuple[str, ...]] = tuple(f"{n}/mask" for n in ATTENDED_NODES)
