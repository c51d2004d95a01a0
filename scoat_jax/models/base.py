"""What every network declares: its five attributes, its class facts and its input checks.

`Network` is the base of the ten segmenters. Its dataclass fields are the
attributes `create_model` sets from the top level of a config (`num_classes`
from the task, `dtype`, `conv` and `in_channels` from the run), so each network
writes only what is its own: its blocks, its default `widths` and the facts
below. `GridNetwork` adds what the U-Net family shares: the UNet++ grid of
five rows (widths 32 ... 512 after the port the baselines follow), four 2x2
down-samplings, and the memory estimate of such a grid.

Class facts (read by inference and export code; not configurable):
  NAME: the network as error messages name it (None: its class name).
  DOWNSAMPLING: why height and width must divide by `input_multiple`.
  input_multiple: height and width must be multiples of this.
  attention_maps: intermediates `apply(..., mutable=['intermediates'])` can
    return, as `intermediates/<path>/attention` (or the path's own leaf).

A network's `__call__` starts with `x, widths, conv, norm = self.prepare(x,
train=train)`: the input shape, the widths and the network's own attributes
(`check_attributes`) are checked, and the convolution and batch norm every
layer uses are built (`layers.conv_def`, `layers.norm_def`).
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from scoat_jax.models import layers
from scoat_jax.models.conv import Conv

Dtype = Any
ModuleDef = Any

GRID_WIDTHS = (32, 64, 128, 256, 512)
GRID_DEPTH = 4  # Four 2x2 down-samplings: inputs must be multiples of 2**4.


class Network(nn.Module):
  """A segmenter returning logits (no sigmoid/softmax inside).

  Attributes:
    num_classes: output channels.
    widths: the network's channel widths (each network states what they are).
    dtype: compute dtype (float32 or bfloat16); parameters and logits float32.
    in_channels: expected input channels (1 = one slice, 3 = a 2.5D stack);
      None accepts any. Set, it is checked against the input.
    conv: the convolution module every layer uses (Flax's ImageNet example
      passes its `conv` the same way); `scoat_jax.models.create_model` gives
      `Conv` with the configured CPU weight-gradient path.
  """
  num_classes: int = 1
  widths: Sequence[int] = ()
  dtype: Dtype = jnp.float32
  in_channels: int | None = None
  conv: ModuleDef = Conv

  NAME: ClassVar[str | None] = None
  DOWNSAMPLING: ClassVar[str] = "its down-sampling"
  input_multiple: ClassVar[int] = 1
  attention_maps: ClassVar[tuple[str, ...]] = ()

  def check_widths(self) -> tuple[int, ...]:
    """`widths` as a tuple; raises ValueError where the network cannot be built from them."""
    return tuple(self.widths)

  def check_attributes(self, widths: tuple[int, ...]) -> None:
    """Raises ValueError for a network's own attributes that cannot build; none here."""

  def inference_bytes_per_slice(self, size: int) -> int:
    """Rough peak activation bytes of one size x size slice in an inference forward pass."""
    raise NotImplementedError(f"{type(self).__name__} states its memory estimate")

  def prepare(self, x: jax.Array, *, train: bool
              ) -> tuple[jax.Array, tuple[int, ...], ModuleDef, ModuleDef]:
    """Checks the input and the attributes; returns (x in the compute dtype, widths, conv, norm).

    Raises:
      ValueError: x is not NHWC with height and width multiples of
        `input_multiple` (or not of `in_channels` channels), or the widths or
        the network's own attributes cannot build.
    """
    layers.check_input_shape(self.NAME or type(self).__name__, x.shape, self.input_multiple,
                             self.DOWNSAMPLING, in_channels=self.in_channels)
    widths = self.check_widths()
    self.check_attributes(widths)
    conv = layers.conv_def(self.conv, dtype=self.dtype)
    norm = layers.norm_def(train=train, dtype=self.dtype)
    return x.astype(self.dtype), widths, conv, norm


class GridNetwork(Network):
  """A network of the UNet++ grid: five rows `x_{i}_{j}` (i = depth), four down-samplings.

  Attributes as `Network`; `widths` are the channels of rows 0..4.

  Class facts as `Network`, and:
    LIVE_ARRAYS: how many row-sized arrays are alive at the inference peak
      (each network's estimate, stated where it is set).
  """
  widths: Sequence[int] = GRID_WIDTHS

  DOWNSAMPLING: ClassVar[str] = "four 2x2 max-pools"
  input_multiple: ClassVar[int] = 2**GRID_DEPTH
  LIVE_ARRAYS: ClassVar[int] = 12

  def check_widths(self) -> tuple[int, ...]:
    if len(self.widths) != GRID_DEPTH + 1:
      raise ValueError(f"widths must give {GRID_DEPTH + 1} row widths, got {self.widths}")
    return tuple(self.widths)

  def inference_bytes_per_slice(self, size: int) -> int:
    """Rough peak activation bytes of one size x size slice in inference.

    Row i holds size^2 / 4^i pixels of widths[i] channels; `LIVE_ARRAYS` such
    arrays are alive at the peak.
    """
    pixels_x_channels = sum(w * size * size / 4**i for i, w in enumerate(self.widths))
    return int(self.LIVE_ARRAYS * jnp.dtype(self.dtype).itemsize * pixels_x_channels)
