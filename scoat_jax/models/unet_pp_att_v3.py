"""UNet++ with pyramid attention at SCOAT-Net's six nodes (paper Table III, variant V3).

Attention module: Wang, Zhao, Shen, Hoi and Borji, "Salient Object Detection
with Pyramid Attention and Salient Edges" (PAGE-Net), CVPR 2019. The network
is `UNetPlusPlus` (unet_pp.py) whose decoder nodes on rows 1-3 (x_1_1, x_2_1,
x_3_1, x_1_2, x_2_2, x_1_3, where SCOAT-Net attends) re-weight their input
with a pyramid attention module. The SCOAT-Net paper names the variant but
gives no wiring; the choices below are ours.

Node `x_{i}_{j}` (`PyramidAttentionNode`), X = cat(x_{i}_0 .. x_{i}_{j-1}, u),
u = up(x_{i+1}_{j-1}), X of size h x w x C:

    X ─┬─ X_1 = X                ─ scale_1_conv ─ softmax over h*w     = l_1
       ├─ X_2 = max_pool2x(X)    ─ scale_2_conv ─ softmax over h*w/4   = l_2
       └─ X_4 = max_pool2x^2(X)  ─ scale_4_conv ─ softmax over h*w/16  = l_4
       A = (l_1 + up(l_2) + up(up(l_4))) / 3        (h x w x 1; convs 1x1, C -> 1)
       Y = (1 + A) * X  ─ block (VGGBlock) ─ x_{i}_{j}

  * Pyramid attention (PAGE-Net): the feature is represented at several
    scales; at each scale n a 1x1 convolution w_n scores every position and a
    softmax over the positions of that scale gives a one-channel map l_n
    (summing to 1 per image); the maps are up-sampled to h x w and averaged,
    and the feature is re-weighted with the identity mapping (1 + A) * X
    (residual attention, so the attention cannot erase features). Here the
    scales are 1, 2 and 4 (`PYRAMID_SCALES`), down-sampled by 2x2 max-pools
    (the network's own down-sampling) and up-sampled by bilinear align-corners
    x2 steps (its own up-sampling). The score convolutions have no bias: a
    constant added to every position cancels in the softmax.
  * Applied to the node's input X (submodule `pyramid`), then the plain node
    `VGGBlock(Y)` (submodule `block`): the same place SCOAT-Net's channel
    attention re-weights (its SE acts on the node's concatenated input), so
    Table III compares the modules at one place, and the node's output, which
    later nodes and the row above reuse, stays a plain VGGBlock output.
    A = 0 gives back UNet++.
  * Magnitude (as in PAGE-Net): a softmax over P positions averages 1/P, so at
    initialisation (1 + A) is close to 1 and the coarsest scale weighs most;
    the scores must become peaked to re-weight strongly. The softmax, the
    up-sampling and A are float32 also when the network computes in bfloat16.
  * Sown map: A divided by its maximum over each image's positions, so
    (B, h, w, 1) in (0, 1] (the location attended most is 1), at
    `intermediates/x_{i}_{j}/pyramid/attention` for each of the six nodes.
  * Sizes: the coarsest scale needs node height and width divisible by 4; the
    row-3 nodes are 1/8 of the input, so inputs must be multiples of 32
    (`input_multiple`; 32 px gives 4x4 row-3 nodes whose scale-4 map is a
    single position, A's share from it then constant). Other sizes raise a
    ValueError, from the network check or from the module.

Trainable parameters at widths (32, 64, 128, 256, 512), 1 input channel,
1 class (counted with `count_params` on this module; no reference
implementation exists): 9,170,049 with one head, 9,170,148 with the four
deep-supervision heads (UNet++: 9,162,753 / 9,162,852; the six pyramids add
7,296: three 1x1 score convolutions of C weights per node, C = 192, 384, 768,
256, 512, 320 input channels).
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from scoat_jax.models import layers, unet_blocks
from scoat_jax.models.unet_blocks import VGGBlock
from scoat_jax.models.unet_pp import UNetPlusPlus

Dtype = Any
ModuleDef = Any

ATTENDED_NODES = ("x_1_1", "x_2_1", "x_3_1", "x_1_2", "x_2_2", "x_1_3")
PYRAMID_SCALES = (1, 2, 4)
DEEPEST_ATTENDED_ROW = 3  # x_3_1: 1/8 of the input


class PyramidAttention(nn.Module):
  """PAGE-Net's pyramid attention: X * (1 + mean over scales of up(softmax_positions(w_s X_s))).

  Attributes:
    conv: the network's convolution (`layers.conv_def`).
    scales: down-sampling factors of the pyramid, powers of 2.
    dtype: compute dtype of the returned feature.
  """
  conv: ModuleDef
  scales: Sequence[int] = PYRAMID_SCALES
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Returns (1 + A) * X for X of shape (B, H, W, C) and sows A / max(A)."""
    batch, height, width, _ = x.shape
    for s in self.scales:
      if s < 1 or s & (s - 1):
        raise ValueError(f"pyramid attention scales must be powers of 2, got {tuple(self.scales)}")
      if height % s or width % s:
        raise ValueError(
            f"pyramid attention down-samples its {height}x{width} input by {s} (scales "
            f"{tuple(self.scales)}): height and width must divide by {s}; give the network "
            f"inputs that are multiples of {s * 2**DEEPEST_ATTENDED_ROW}.")
    maps = []
    for s in self.scales:
      levels = s.bit_length() - 1
      xs = x
      for _ in range(levels):
        xs = layers.max_pool2x(xs)
      score = self.conv(1, 1, use_bias=False, name=f"scale_{s}_conv")(xs).astype(jnp.float32)
      h, w = score.shape[1:3]
      l = jax.nn.softmax(score.reshape(batch, h * w), axis=-1).reshape(batch, h, w, 1)
      for _ in range(levels):
        l = layers.upsample2x_align_corners(l)
      maps.append(l)
    attention = sum(maps) / len(maps)
    peak = jnp.max(attention, axis=(1, 2, 3), keepdims=True)
    # XLA may divide as a product with the reciprocal, 1 ulp above 1 at the peak.
    self.sow("intermediates", "attention", jnp.minimum(attention / peak, 1.0))
    return (1 + attention).astype(x.dtype) * x


class PyramidAttentionNode(unet_blocks.Node):
  """A UNet++ node whose input is re-weighted by pyramid attention: VGGBlock((1 + A) * X).

  Attributes and interface of `unet_blocks.Node`.
  """

  @nn.compact
  def __call__(self, same_row: Sequence[jax.Array], up: jax.Array) -> jax.Array:
    """Args: same_row: nodes x_{i}_0 .. x_{i}_{j-1}; up: the up-sampled x_{i+1}_{j-1}."""
    x = jnp.concatenate(list(same_row) + [up], axis=-1)
    x = PyramidAttention(conv=self.conv, dtype=self.dtype, name="pyramid")(x)
    return VGGBlock(self.features, conv=self.conv, norm=self.norm, name="block")(x)


class UNetPlusPlusPyramidAttention(UNetPlusPlus):
  """UNet++ whose six attended nodes re-weight their input by pyramid attention (module docstring).

  Attributes as `UNetPlusPlus`. Class facts: `input_multiple` is 32 (the
  row-3 nodes, 1/8 of the input, are down-sampled by 4); `attention_maps`
  lists the six pyramid modules.
  """
  node: ModuleDef = PyramidAttentionNode

  input_multiple: ClassVar[int] = 2**DEEPEST_ATTENDED_ROW * max(PYRAMID_SCALES)
  DOWNSAMPLING: ClassVar[str] = (f"four 2x2 max-pools, and pyramid attention down-sampling "
                                 f"the 1/8-size row-3 nodes by {max(PYRAMID_SCALES)}")
  attention_maps: ClassVar[tuple[str, ...]] = tuple(f"{n}/pyramid" for n in ATTENDED_NODES)
