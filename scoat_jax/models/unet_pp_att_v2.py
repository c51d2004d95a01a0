"""UNet++ with Attention U-Net gates on its skip connections (paper Table III, variant V2).

Attention module: Oktay, Schlemper, Le Folgoc, Lee, Heinrich, Misawa, Mori,
McDonagh, Hammerla, Kainz, Glocker and Rueckert, "Attention U-Net: Learning
Where to Look for the Pancreas", MIDL 2018. The network is `UNetPlusPlus`
(unet_pp.py) whose decoder nodes on rows 1-3 (x_1_1, x_2_1, x_3_1, x_1_2,
x_2_2, x_1_3, where SCOAT-Net attends) gate their skip connections. The
SCOAT-Net paper names the variant but gives no wiring; the choices below are
ours.

Node `x_{i}_{j}` (`AttentionGateNode`), u = up(x_{i+1}_{j-1}) the gating signal g:

    x_{i}_0     ─ gate_0     ─┐     (one gate per same-row skip x_{i}_k,
    x_{i}_1     ─ gate_1     ─┤      each gated by g = u)
      ...                     ├─ cat(gated skips, u) ─ block (VGGBlock) ─ x_{i}_{j}
    x_{i}_{j-1} ─ gate_{j-1} ─┤
    u ────────────────────────┘

    gate_k (`AttentionGate`, Attention U-Net's additive attention gate, Fig. 2):
      q     = psi(ReLU(W_x x + W_g g))     W_x: W_x_conv-W_x_bn, x = x_{i}_k -> F_int
                                           W_g: W_g_conv-W_g_bn, g = u       -> F_int
                                           psi: psi_conv-psi_bn              -> 1
      alpha = sigmoid(q)                   (B, h, w, 1)
      x_hat = alpha * x

  * One gate per skip, not one on their concatenation: in Attention U-Net
    every skip connection has its own gate, and UNet++'s same-row skips come
    from different depths of processing (x_{i}_0 is an encoder feature,
    x_{i}_{k>0} decoder features), so each gets its own map; a gate that
    closes (alpha = 0) then removes exactly one skip. Nodes x_{i}_1 have one
    gate, x_{i}_2 two, x_1_3 three: ten gates, ten maps.
  * Gating signal: the up-sampled deeper node u, already at the skip's
    resolution, so W_x has stride 1 and alpha needs no resampling (the
    original gates the skip with the coarser g through a strided W_x and
    up-samples alpha). u itself enters the block ungated, as in Attention U-Net.
  * Gate layers as in the common PyTorch Attention U-Net (and MONAI's
    `AttentionBlock`): 1x1 conv (bias) + BN for W_x, W_g and psi, F_int = half
    the skip's channels, no output transform; the original's extra
    conv1x1-BN on the gated skip is left out. This is the gate SCOAT-Net's
    SAM is built from (`layers.SpatialAttention`), applied to the skip instead
    of u and without the residual `1 + alpha`.
  * The block after the gates is the plain node, `VGGBlock(cat(x_hat_0 ..
    x_hat_{j-1}, u))`: alpha = 1 everywhere gives back UNet++.
  * Sown map: alpha, (B, h, w, 1) in (0, 1), at
    `intermediates/x_{i}_{j}/gate_{k}/attention` for every gate.
  * Sizes: no constraint beyond UNet++'s (inputs multiple of 16).

Trainable parameters at widths (32, 64, 128, 256, 512), 1 input channel,
1 class (counted with `count_params` on this module; no reference
implementation exists): 9,375,263 with one head, 9,375,362 with the four
deep-supervision heads (UNet++: 9,162,753 / 9,162,852; the ten gates add
212,510).
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from scoat_jax.models import unet_blocks
from scoat_jax.models.unet_blocks import VGGBlock
from scoat_jax.models.unet_pp import UNetPlusPlus

ModuleDef = Any

# (row, column) of the six gated nodes; node x_{i}_{j} has gates gate_0 .. gate_{j-1}.
ATTENDED_NODES = ((1, 1), (2, 1), (3, 1), (1, 2), (2, 2), (1, 3))


class AttentionGate(nn.Module):
  """Additive attention gate: x * sigmoid(psi(ReLU(W_x x + W_g g))), all 1x1 conv + BN.

  Attributes:
    conv: the network's convolution (`layers.conv_def`).
    norm: the network's batch norm (`layers.norm_def`).
    inter_features: F_int; None (the default) uses half the skip's channels.
  """
  conv: ModuleDef
  norm: ModuleDef
  inter_features: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array, g: jax.Array) -> jax.Array:
    """Returns the gated skip `alpha * x` and sows alpha.

    Args:
      x: the skip connection, (B, H, W, C_x).
      g: the gating signal at the same resolution, (B, H, W, C_g).
    """
    if x.shape[:3] != g.shape[:3]:
      raise ValueError(f"attention gate: skip {tuple(x.shape)} and gating signal "
                       f"{tuple(g.shape)} must share batch, height and width.")
    inter = self.inter_features or max(1, x.shape[-1] // 2)
    conv, norm = self.conv, self.norm
    theta = norm(name="W_x_bn")(conv(inter, 1, name="W_x_conv")(x))
    phi = norm(name="W_g_bn")(conv(inter, 1, name="W_g_conv")(g))
    q = norm(name="psi_bn")(conv(1, 1, name="psi_conv")(nn.relu(theta + phi)))
    alpha = nn.sigmoid(q)
    self.sow("intermediates", "attention", alpha.astype(jnp.float32))
    return alpha * x


class AttentionGateNode(unet_blocks.Node):
  """A UNet++ node whose same-row skips are each gated by u: VGGBlock(cat(gated skips, u)).

  Attributes and interface of `unet_blocks.Node`.
  """

  @nn.compact
  def __call__(self, same_row: Sequence[jax.Array], up: jax.Array) -> jax.Array:
    """Args: same_row: nodes x_{i}_0 .. x_{i}_{j-1}; up: the up-sampled x_{i+1}_{j-1}."""
    gated = [AttentionGate(conv=self.conv, norm=self.norm, name=f"gate_{k}")(skip, up)
             for k, skip in enumerate(same_row)]
    x = jnp.concatenate(gated + [up], axis=-1)
    return VGGBlock(self.features, conv=self.conv, norm=self.norm, name="block")(x)


class UNetPlusPlusAttentionGates(UNetPlusPlus):
  """UNet++ whose six attended nodes gate each same-row skip (see the module docstring).

  Attributes and class facts as `UNetPlusPlus`; `attention_maps` lists the
  ten gates, `x_{i}_{j}/gate_{k}` gating skip x_{i}_{k} of node x_{i}_{j}.
  """
  node: ModuleDef = AttentionGateNode

  attention_maps: ClassVar[tuple[str, ...]] = tuple(
      f"x_{i}_{j}/gate_{k}" for i, j in ATTENDED_NODES for k in range(j))
