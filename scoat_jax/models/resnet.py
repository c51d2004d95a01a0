"""The dilated ResNet-50 backbone shared by FCN, PSPNet and DeepLabV3 (Table II).

He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016; the bottleneck is torchvision's `resnet50` ("v1.5": the stride of
a down-sampling block sits on its 3x3 conv, not on the first 1x1), and the
last two stages trade their stride for dilation as torchvision's
segmentation models build it (`replace_stride_with_dilation=(False, True,
True)`; Chen et al.'s "atrous" ResNet), so the output stride is 8:

    x (H x W x C_in)
    stem:    conv 7x7/2 -> bn -> ReLU -> max-pool 3x3/2 (pad 1)     widths[0]   H/4
    layer1:  block0..block2, stride 1, dilation 1                   widths[1]   H/4
    layer2:  block0..block3, block0 stride 2, dilation 1            widths[2]   H/8
    layer3:  block0..block5, stride 1; block0 dilation 1, rest 2    widths[3]   H/8
    layer4:  block0..block2, stride 1; block0 dilation 2, rest 4    widths[4]   H/8

    block{k} (Bottleneck, inner width = out // 4):
      conv1 1x1 -> bn1 -> ReLU -> conv2 3x3 (stride, dilation) -> bn2 -> ReLU
      -> conv3 1x1 -> bn3, + shortcut, ReLU
      shortcut = downsample (conv 1x1 with the block's stride -> bn) on block0
      of every stage (its width or resolution changes), the identity elsewhere.

The first block of a dilated stage keeps the previous stage's dilation (as
torchvision's `_make_layer` passes `previous_dilation` to it); its shortcut
conv then has stride 1. Every conv has no bias and a BN after it. The max
pool pads with -inf (PyTorch's `MaxPool2d(3, 2, padding=1)`).

`ResNet` returns every stage output in a dict (`stem`, `layer1` .. `layer4`);
the heads read `layer4` (an auxiliary head would read `layer3`). Trainable
parameters at widths (64, 256, 512, 1024, 2048), one input channel:
23,501,760, equal to torchvision's `resnet50` without `fc` and with a
one-channel `conv1` (the `backbone` of `fcn_resnet50(weights=None,
weights_backbone=None, num_classes=1, aux_loss=False)` with `backbone.conv1 =
Conv2d(1, 64, 7, 2, 3, bias=False)`).

The backbone's numerics are checked through the heads (fcn.py, deeplabv3.py:
torchvision's weights copied in, same logits to float32 rounding).

Initialisation is the project's (`layers.conv_def`, `layers.norm_def`):
He-normal fan-in kernels and BN scale ~ N(1, 0.02); torchvision draws
He-normal fan-out kernels and BN scale 1. The networks here train from
scratch (no ImageNet weights can be downloaded on the training machines).

Torchvision -> Flax names (`torchvision_to_flax` converts a state dict; the
backbone map is `torchvision_backbone_map()`, a network adds its head's map):

    torchvision (segmentation model)          Flax (params / batch_stats)
    backbone.conv1 / backbone.bn1             backbone/stem/conv / backbone/stem/bn
    backbone.layer{i}.{k}.conv{j} / .bn{j}    backbone/layer{i}/block{k}/conv{j} / bn{j}
    backbone.layer{i}.0.downsample.0 / .1     backbone/layer{i}/block0/downsample/conv / bn

(an ImageNet `resnet50` state dict has the same names without `backbone.`:
pass `torch_prefix=""`, and drop its `fc`). Arrays: conv `weight` (out, in,
kh, kw) -> `kernel` (kh, kw, in, out), `bias` -> `bias`; BN `weight` ->
`scale`, `bias` -> `bias` (params), `running_mean` -> `mean`, `running_var`
-> `var` (batch_stats); `num_batches_tracked` is dropped. ImageNet's `conv1`
takes three channels; for one-channel CT sum its kernel over the input axis
before loading.

Also here, for the three heads: `Segmenter`, what the three networks share
(attributes, input checks, backbone, classifier, up-sampling; each writes its
`head`), `ConvBNReLU` and `resize_bilinear` (PyTorch's
`F.interpolate(mode='bilinear', align_corners=False)`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scoat_jax.models import base

Dtype = Any
ModuleDef = Any

DEFAULT_WIDTHS = (64, 256, 512, 1024, 2048)  # stem, layer1 .. layer4 outputs
STAGE_SIZES = (3, 4, 6, 3)  # ResNet-50
REPLACE_STRIDE_WITH_DILATION = (False, True, True)  # layer2, layer3, layer4
OUTPUT_STRIDE = 8
BOTTLENECK_EXPANSION = 4  # inner width = out // 4


def check_widths(network: str, widths: Sequence[int]) -> tuple[int, ...]:
  """The widths as a tuple; raises ValueError unless five, each stage's divisible by 4."""
  widths = tuple(widths)
  if len(widths) != 5 or any(w <= 0 for w in widths):
    raise ValueError(f"{network}: widths must give the stem and layer1..layer4 output widths "
                     f"(five positive numbers, ResNet-50: {DEFAULT_WIDTHS}), got {widths}")
  if any(w % BOTTLENECK_EXPANSION for w in widths[1:]):
    raise ValueError(f"{network}: layer widths must divide by {BOTTLENECK_EXPANSION} (the "
                     f"bottleneck's inner width is out // {BOTTLENECK_EXPANSION}), got {widths}")
  return widths


def stage_plan(replace_stride_with_dilation: Sequence[bool] = REPLACE_STRIDE_WITH_DILATION
               ) -> list[tuple[int, int, int]]:
  """(stride, dilation of block0, dilation of the other blocks) for layer1 .. layer4.

  torchvision's `ResNet._make_layer`: a dilated stage multiplies the running
  dilation by its stride and takes stride 1; its block0 keeps the previous
  dilation. With (False, True, True): [(1,1,1), (2,1,1), (1,1,2), (1,2,4)].
  """
  if len(replace_stride_with_dilation) != 3:
    raise ValueError("replace_stride_with_dilation takes three flags (layer2..layer4), got "
                     f"{replace_stride_with_dilation}")
  plan, dilation = [(1, 1, 1)], 1
  for dilate in replace_stride_with_dilation:
    previous = dilation
    stride = 2
    if dilate:
      dilation *= stride
      stride = 1
    plan.append((stride, previous, dilation))
  return plan


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
  """NHWC bilinear resize, PyTorch's `F.interpolate(mode='bilinear', align_corners=False)`.

  Half-pixel sample centres, the source coordinate clamped at the borders and
  no anti-aliasing: `jax.image.resize` with `antialias=False` computes that,
  for up- and down-sampling (at a border it renormalises the weights of the
  in-range neighbours, which is the clamp; checked against PyTorch to 1e-6
  and against `tests/test_models_resnet.py`'s NumPy formula).
  """
  b, h, w, c = x.shape
  if (h, w) == (height, width):
    return x
  return jax.image.resize(x, (b, height, width, c), "bilinear", antialias=False)


class ConvBNReLU(nn.Module):
  """conv (no bias) -> bn -> ReLU; submodules `conv` and `bn`.

  Attributes:
    features: output channels.
    kernel_size: odd kernel size.
    dilation: kernel dilation (padding = dilation * (k // 2), 'same').
    conv: the network's convolution (`layers.conv_def`).
    norm: the network's batch norm (`layers.norm_def`).
  """
  features: int
  kernel_size: int
  conv: ModuleDef
  norm: ModuleDef
  dilation: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(self.features, self.kernel_size, dilation=self.dilation, use_bias=False,
                  name="conv")(x)
    return nn.relu(self.norm(name="bn")(x))


class Stem(nn.Module):
  """conv 7x7/2 -> bn -> ReLU -> max-pool 3x3/2 with padding 1 (-inf)."""
  features: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(self.features, 7, strides=2, use_bias=False, name="conv")(x)
    x = nn.relu(self.norm(name="bn")(x))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class Downsample(nn.Module):
  """The projection shortcut: conv 1x1 with the block's stride -> bn."""
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(self.features, 1, strides=self.strides, use_bias=False, name="conv")(x)
    return self.norm(name="bn")(x)


class Bottleneck(nn.Module):
  """ResNet v1.5 bottleneck: 1x1 -> 3x3 (stride, dilation) -> 1x1, + shortcut, ReLU.

  Attributes:
    features: output channels; the inner width is features // 4.
    strides: stride of conv2 and of the shortcut.
    dilation: dilation of conv2.
    conv, norm: the network's convolution and batch norm.
  """
  features: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  dilation: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv, norm = self.conv, self.norm
    inner = self.features // BOTTLENECK_EXPANSION
    y = nn.relu(norm(name="bn1")(conv(inner, 1, use_bias=False, name="conv1")(x)))
    y = conv(inner, 3, strides=self.strides, dilation=self.dilation, use_bias=False,
             name="conv2")(y)
    y = nn.relu(norm(name="bn2")(y))
    y = norm(name="bn3")(conv(self.features, 1, use_bias=False, name="conv3")(y))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = Downsample(self.features, self.strides, conv, norm, name="downsample")(x)
    return nn.relu(y + shortcut)


class Stage(nn.Module):
  """`blocks` bottlenecks `block0 ..`; block0 has the stride and the first dilation."""
  features: int
  blocks: int
  strides: int
  first_dilation: int
  dilation: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for k in range(self.blocks):
      x = Bottleneck(self.features, self.conv, self.norm,
                     strides=self.strides if k == 0 else 1,
                     dilation=self.first_dilation if k == 0 else self.dilation,
                     name=f"block{k}")(x)
    return x


class ResNet(nn.Module):
  """Dilated ResNet-50 features (no pooling, no fc).

  Attributes:
    widths: stem and layer1 .. layer4 output widths.
    conv: the network's convolution (`layers.conv_def`).
    norm: the network's batch norm (`layers.norm_def`).
    stage_sizes: bottlenecks per stage (ResNet-50: 3, 4, 6, 3).
    replace_stride_with_dilation: for layer2 .. layer4, as torchvision.

  Returns a dict of the stage outputs `stem`, `layer1` .. `layer4`.
  """
  widths: Sequence[int]
  conv: ModuleDef
  norm: ModuleDef
  stage_sizes: Sequence[int] = STAGE_SIZES
  replace_stride_with_dilation: Sequence[bool] = REPLACE_STRIDE_WITH_DILATION

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    widths = tuple(self.widths)
    features = {"stem": Stem(widths[0], self.conv, self.norm, name="stem")(x)}
    x = features["stem"]
    for i, (blocks, (stride, first, dilation)) in enumerate(
        zip(self.stage_sizes, stage_plan(self.replace_stride_with_dilation)), start=1):
      x = Stage(widths[i], blocks, stride, first, dilation, self.conv, self.norm,
                name=f"layer{i}")(x)
      features[f"layer{i}"] = x
    return features


class Segmenter(base.Network):
  """A dilated ResNet-50 segmenter: backbone, a network's head, classifier, up-sampling.

      x -> backbone (ResNet, layer4 at H/8) -> head -> classifier (conv 1x1, bias)
        -> bilinear to H x W -> logits (float32)

  FCN, PSPNet and DeepLabV3 subclass it and write `head` (layer4 features ->
  the classifier's input; its submodules are named there) and, for their own
  attributes, `check_attributes`. Their names, fields and docs are in fcn.py,
  pspnet.py and deeplabv3.py.

  Attributes of `base.Network`; `widths` are the stem and layer1..layer4
  output widths (ResNet-50: 64, 256, 512, 1024, 2048).

  Class facts of `base.Network`: `input_multiple` is the output stride, 8; no
  attention maps.
  """
  widths: Sequence[int] = DEFAULT_WIDTHS

  NAME: ClassVar[str] = "dilated ResNet-50"   # for error messages
  DOWNSAMPLING: ClassVar[str] = "output stride 8"
  input_multiple: ClassVar[int] = OUTPUT_STRIDE

  def check_widths(self) -> tuple[int, ...]:
    return check_widths(self.NAME, self.widths)

  def head(self, features: jax.Array, widths: tuple[int, ...], conv: ModuleDef,
           norm: ModuleDef, train: bool) -> jax.Array:
    """layer4 features -> the classifier's input (the network's own modules)."""
    raise NotImplementedError(f"{type(self).__name__} writes its head")

  def inference_bytes_per_slice(self, size: int) -> int:
    """About how much memory one size x size slice takes in an inference forward pass.

    See `inference_bytes_per_slice` (measured: about 50 MB per 256-px slice in
    float32 at full widths).
    """
    return inference_bytes_per_slice(self.check_widths(), size, self.dtype)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Segments a batch of slices.

    Args:
      x: float array (batch, height, width, in_channels), height and width
        multiples of 8.
      train: batch statistics in BatchNorm (update with `mutable=['batch_stats']`)
        and dropout on (needs a 'dropout' rng when a rate is > 0).

    Returns:
      Logits (batch, height, width, num_classes), float32.
    """
    height, width = x.shape[1:3]
    x, widths, conv, norm = self.prepare(x, train=train)
    features = ResNet(widths, conv, norm, name="backbone")(x)["layer4"]
    y = self.head(features, widths, conv, norm, train)
    logits = conv(self.num_classes, 1, name="classifier")(y).astype(jnp.float32)
    return resize_bilinear(logits, height, width)


def activation_elements(widths: Sequence[int], size: int) -> float:
  """Pixels x channels of the stem and the four stage outputs for a size x size input."""
  stem, l1, l2, l3, l4 = widths
  return size * size * ((stem + l1) / 16 + (l2 + l3 + l4) / 64)


def inference_bytes_per_slice(widths: Sequence[int], size: int, dtype: Dtype) -> int:
  """Rough peak activation bytes of one size x size slice, for the three heads alike.

  Three times the stage outputs (`activation_elements`): XLA's buffer
  assignment (CPU, full widths, batch 1 and 4 at 256 px, batch 1 at 512 px,
  `compile().memory_analysis().temp_size_in_bytes`) came to 2.1 of them for
  FCN and 2.5 for PSPNet and DeepLabV3 (42-50 MB per 256-px slice in float32).
  """
  return int(3 * jnp.dtype(dtype).itemsize * activation_elements(widths, size))


# ----------------------------------------------------------------- torchvision weights

def torchvision_backbone_map(stage_sizes: Sequence[int] = STAGE_SIZES, *,
                             torch_prefix: str = "backbone.",
                             flax_prefix: str = "backbone") -> dict[str, str]:
  """torchvision module name -> Flax module path of the backbone (see the module docstring)."""
  names = {f"{torch_prefix}conv1": f"{flax_prefix}/stem/conv",
           f"{torch_prefix}bn1": f"{flax_prefix}/stem/bn"}
  for i, blocks in enumerate(stage_sizes, start=1):
    for k in range(blocks):
      t, f = f"{torch_prefix}layer{i}.{k}", f"{flax_prefix}/layer{i}/block{k}"
      for j in (1, 2, 3):
        names[f"{t}.conv{j}"], names[f"{t}.bn{j}"] = f"{f}/conv{j}", f"{f}/bn{j}"
      if k == 0:
        names[f"{t}.downsample.0"] = f"{f}/downsample/conv"
        names[f"{t}.downsample.1"] = f"{f}/downsample/bn"
  return names


def torchvision_to_flax(state_dict: Mapping[str, Any], module_map: Mapping[str, str]
                        ) -> dict[str, dict]:
  """A torchvision state dict (NumPy arrays) as Flax variables {'params', 'batch_stats'}.

  Args:
    state_dict: torch name -> array (e.g. `torch_weights.read_state_dict(path)`).
    module_map: torch module name -> Flax module path ('/'-separated), e.g.
      `torchvision_backbone_map()` merged with a head's map.

  Raises:
    KeyError: a tensor whose module the map does not name.
  """
  params: dict = {}
  stats: dict = {}

  def put(tree, path, leaf, value):
    node = tree
    for part in path.split("/"):
      node = node.setdefault(part, {})
    node[leaf] = np.asarray(value, np.float32)

  for key, value in state_dict.items():
    module, _, leaf = key.rpartition(".")
    if leaf == "num_batches_tracked":
      continue
    if module not in module_map:
      raise KeyError(f"torchvision tensor {key!r} has no Flax counterpart in the name map")
    path, value = module_map[module], np.asarray(value)
    if leaf == "weight" and value.ndim == 4:  # conv (out, in, kh, kw) -> (kh, kw, in, out)
      put(params, path, "kernel", value.transpose(2, 3, 1, 0))
    elif leaf == "weight":  # BN
      put(params, path, "scale", value)
    elif leaf == "bias":
      put(params, path, "bias", value)
    elif leaf in ("running_mean", "running_var"):
      put(stats, path, leaf.removeprefix("running_"), value)
    else:
      raise KeyError(f"torchvision tensor {key!r}: unknown parameter {leaf!r}")
  return {"params": params, "batch_stats": stats}
