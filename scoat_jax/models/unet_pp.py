"""UNet++: a nested U-Net (the paper's baseline "SCOAT-Net without attention and residual blocks").

Zhou, Rahman Siddiquee, Tajbakhsh and Liang, "UNet++: A Nested U-Net
Architecture for Medical Image Segmentation", DLMIA (MICCAI workshop), 2018.

Nodes `x_{i}_{j}`: row i is the depth (0 full resolution, 4 deepest, widths
32, 64, 128, 256, 512), column j the decoder step; `x_{i}_0` is the encoder,
each step down a 2x2 max-pool. A decoder node concatenates every earlier node
of its row with the bilinearly up-sampled (align_corners) node below-left:

    x_0_0 - x_0_1 - x_0_2 - x_0_3 - x_0_4      x_{i}_{j} = node(cat(x_{i}_0 .. x_{i}_{j-1},
       x_1_0 - x_1_1 - x_1_2 - x_1_3                              up(x_{i+1}_{j-1})))
          x_2_0 - x_2_1 - x_2_2
             x_3_0 - x_3_1                      heads: 1x1 conv `head_{j}` on x_0_{j}
                x_4_0

Every node is a `VGGBlock` (conv3x3-BN-ReLU twice). The six decoder nodes of
rows 1-3 (x_1_1, x_2_1, x_3_1, x_1_2, x_2_2, x_1_3: where SCOAT-Net attends)
are built by the `node` attribute, `VGGNode` by default, which subclasses
replace (the attention variants of Table III):

    class V(UNetPlusPlus):
      node: ModuleDef = SomeNode     # SomeNode(features, conv=, norm=, dtype=, name=)(same_row, up)
      attention_maps: ClassVar[tuple[str, ...]] = ("x_1_1/gate", ...)

Row 0 decoder nodes x_0_1 .. x_0_4 are always plain `VGGBlock`s on the
concatenation. With the default node, rows 1-3 add one nesting level to the
parameter tree (`x_1_1/block/conv1`, but `x_0_1/conv1`).

Reference: `NestedUNet` of the PyTorch port "pytorch-nested-unet" (4uiiurz1,
archs.py at commit 4e36fdd; its `convI_J` is our `x_{i}_{j}`, `finalJ`/`final`
our `head_{j}`). Trainable parameters at 1 input channel, 1 class: 9,162,753
without deep supervision, 9,162,852 with it (four heads), equal to the port's
`NestedUNet` (input_channels=1, num_classes=1, deepsupervision False / True).
With the weights of a PyTorch reproduction of that class copied in (random BN
statistics), the four deep-supervision logits agree to 9e-8 in eval mode (max
abs difference, 32 px, float32, CPU).

Design choices the paper leaves open: the port's, i.e. conv biases before BN,
1x1 heads, bilinear align_corners up-sampling; without deep supervision the
single head on x_0_4 is named `head_4` (as in SCOAT-Net). Nodes are evaluated
column by column as the network grows (each new encoder node x_{d}_0 lets the
diagonal x_{d-1}_1 .. x_0_{d} be computed), as scoat_net.py does.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from scoat_jax.models import base, layers
from scoat_jax.models.unet_blocks import VGGBlock, VGGNode

ModuleDef = Any

DEPTH = base.GRID_DEPTH  # Four 2x2 max-pools: inputs must be multiples of 2**4.


class UNetPlusPlus(base.GridNetwork):
  """UNet++ returning logits (no sigmoid/softmax inside).

  Attributes of `base.GridNetwork` (`widths`: the channels of rows 0..4), and:
    deep_supervision: if True, return the logits of the four heads on
      `x_0_1 .. x_0_4` as a list (shallow to deep); otherwise those of `x_0_4`.
    node: the module computing the decoder nodes of rows 1-3, called as
      `node(widths[i], conv=, norm=, dtype=, name=f"x_{i}_{j}")(same_row, up)`
      with same_row = [x_{i}_0 .. x_{i}_{j-1}], up = up(x_{i+1}_{j-1}).

  Class facts of `base.GridNetwork`; error messages name the class.
  `attention_maps` is empty here; subclasses with attention nodes list theirs.
  The memory estimate (`LIVE_ARRAYS`, 12): the dense skip connections keep a
  row's nodes and one concatenation alive, as for SCOAT-Net (not measured for
  this network).
  """
  deep_supervision: bool = False
  node: ModuleDef = VGGNode

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False):
    """Segments a batch of slices.

    Args:
      x: float array (batch, height, width, channels); height and width
        multiples of `input_multiple` (16).
      train: use batch statistics in BatchNorm.

    Returns:
      Logits (batch, height, width, num_classes) in float32, or a list of four
      such arrays ordered `x_0_1 .. x_0_4` when `deep_supervision` is set.
    """
    x, widths, conv, norm = self.prepare(x, train=train)
    dtype = self.dtype
    up = layers.upsample2x_align_corners
    node: dict[tuple[int, int], jax.Array] = {}
    node[0, 0] = VGGBlock(widths[0], conv=conv, norm=norm, name="x_0_0")(x)
    for depth in range(1, DEPTH + 1):
      node[depth, 0] = VGGBlock(widths[depth], conv=conv, norm=norm, name=f"x_{depth}_0")(
          layers.max_pool2x(node[depth - 1, 0]))
      for j in range(1, depth + 1):
        i = depth - j
        same_row = [node[i, k] for k in range(j)]
        u = up(node[i + 1, j - 1])
        if i == 0:
          node[i, j] = VGGBlock(widths[i], conv=conv, norm=norm, name=f"x_{i}_{j}")(
              jnp.concatenate(same_row + [u], axis=-1))
        else:
          node[i, j] = self.node(widths[i], conv=conv, norm=norm, dtype=dtype,
                                 name=f"x_{i}_{j}")(same_row, u)

    head_columns = range(1, DEPTH + 1) if self.deep_supervision else (DEPTH,)
    logits = [
        conv(self.num_classes, 1, name=f"head_{j}")(node[0, j]).astype(jnp.float32)
        for j in head_columns
    ]
    return logits if self.deep_supervision else logits[0]
