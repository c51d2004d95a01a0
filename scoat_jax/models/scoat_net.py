"""SCOAT-Net: spatial- and channel-attention UNet++ for lung opacification.

Zhao et al., "SCOAT-Net: A novel network for segmenting COVID-19 lung
opacification from CT images", Pattern Recognition 119 (2021) 108109.

The network is a grid of nodes `x_{i}_{j}` as in UNet++ (Zhou et al., 2018):
row i is the depth (0 at full resolution, 4 deepest), column j the decoder
step. The encoder is the first column, `x_{i}_0`. Decoder node `x_{i}_{j}`
concatenates every earlier node of its row with the up-sampled node
`x_{i+1}_{j-1}` below-left of it. On rows 1-3 the six decoder nodes are
attended:

    u       = up(x_{i+1}_{j-1})
    a       = SAM(lateral=x_{i}_{j-1}, up=u)          # sam_{i}_{j}
    x_{i}_{j} = CAM(cat(x_{i}_0, ..., x_{i}_{j-1}, u + a * u))

while the top row, `x_0_1 .. x_0_4`, uses plain residual blocks. A 3x3 conv
head maps `x_0_4` (or, with deep supervision, each of `x_0_1 .. x_0_4`) to
logits.

Trainable parameters at widths 32-512, 1 input channel, 1 class: 10,208,723
(10,209,590 with the four deep-supervision heads), equal to the authors'
PyTorch model; its weights load through `scoat_jax.models.torch_weights`.
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from scoat_jax.models import base, layers

DEPTH = base.GRID_DEPTH  # Four 2x2 max-pools: inputs must be multiples of 2**4.
# The spatial attention maps the paper shows (Fig. 5): the gates feeding
# x_1_1, x_2_2 and x_1_3, sown as intermediates/<name>/attention.
PAPER_ATTENTION_MAPS = ("sam_1_1", "sam_2_2", "sam_1_3")


class SCOATNet(base.GridNetwork):
  """SCOAT-Net returning logits (no sigmoid/softmax inside).

  Attributes of `base.GridNetwork`, and:
    num_classes: 1 (any opacity, sigmoid) or 3 (background, ground-glass
      opacity, consolidation; softmax).
    deep_supervision: if True, return the logits of the four heads on
      `x_0_1 .. x_0_4` as a list; otherwise the logits of `x_0_4` alone.
    widths: channels of rows 0..4; the paper's net uses (32, 64, 128, 256, 512).

  Class facts of `base.GridNetwork`; `attention_maps` are the gates of the
  paper's Fig. 5, sown as `intermediates/<name>/attention`.
  """
  deep_supervision: bool = False

  NAME: ClassVar[str] = "SCOAT-Net"
  attention_maps: ClassVar[tuple[str, ...]] = PAPER_ATTENTION_MAPS
  # With the nodes, concatenations and attention maps alive at the peak, about 12
  # row-sized arrays (XLA CPU, full widths at 512 px: 0.7-0.8 GB per slice of batch,
  # measured between batch 1, 4 and 8).
  LIVE_ARRAYS: ClassVar[int] = 12

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False):
    """Segments a batch of slices.

    Args:
      x: float array (batch, height, width, in_channels); height and width
        multiples of 16.
      train: use batch statistics in BatchNorm (and update the running ones,
        with `mutable=['batch_stats']`).

    Returns:
      Logits (batch, height, width, num_classes) in float32, or a list of four
      such arrays ordered `x_0_1 .. x_0_4` when `deep_supervision` is set.
    """
    x, widths, conv, norm = self.prepare(x, train=train)
    blocks = dict(conv=conv, norm=norm)
    up = layers.upsample2x_align_corners
    node: dict[tuple[int, int], jax.Array] = {}
    node[0, 0] = layers.ResBlock(widths[0], **blocks, name="x_0_0")(x)
    # Column by column, as UNet++ grows: each new encoder node x_{d}_0 lets
    # the diagonal x_{d-1}_1, x_{d-2}_2, ..., x_0_{d} be computed.
    for depth in range(1, DEPTH + 1):
      node[depth, 0] = layers.ResBlock(widths[depth], **blocks, name=f"x_{depth}_0")(
          layers.max_pool2x(node[depth - 1, 0]))
      for j in range(1, depth + 1):
        i = depth - j
        u = up(node[i + 1, j - 1])
        same_row = [node[i, k] for k in range(j)]
        if i == 0:
          node[i, j] = layers.ResBlock(widths[i], **blocks, name=f"x_{i}_{j}")(
              jnp.concatenate(same_row + [u], axis=-1))
        else:
          u_attended, _ = layers.SpatialAttention(**blocks, name=f"sam_{i}_{j}")(
              node[i, j - 1], u)
          node[i, j] = layers.ChannelAttentionBlock(
              widths[i], **blocks, dtype=self.dtype, name=f"x_{i}_{j}")(
                  jnp.concatenate(same_row + [u_attended], axis=-1))

    head_columns = range(1, DEPTH + 1) if self.deep_supervision else (DEPTH,)
    logits = [
        conv(self.num_classes, 3, name=f"head_{j}")(node[0, j]).astype(jnp.float32)
        for j in head_columns
    ]
    return logits if self.deep_supervision else logits[0]
