"""Segmentation networks, by name, built from a config.

>>> model = get_model('scoat_net', num_classes=1, deep_supervision=False)
>>> variables = model.init(jax.random.key(0), jnp.zeros((1, 512, 512, 1)))
>>> logits = model.apply(variables, x, train=False)

`create_model(config)` builds the network an experiment config describes:
`config.model_name` picks the entry, `config.model` holds its own keyword
arguments (big_vision's `get_model(name, **config.model)`), and the options
every network shares come from the top level: deep supervision, compute dtype
and the convolution (`Conv` with `config.cpu_weight_grad`). Adding a network
means a module in this folder, a line in `_REGISTRY` and a config.

Each network class states its own facts as class attributes: `input_multiple`
(height and width must divide by it) and `attention_maps` (the intermediates
it can export); `load_torch_weights` converts the authors' PyTorch weights
where a name map exists.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scoat_jax.models import conv as conv_lib

DTYPES = ("float32", "bfloat16")
DEEP_SUPERVISION = ("auto", "mean", "last", "none")


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """A registered network: where its linen class lives and, if any, its PyTorch weight converter.

  The class is imported on first use, so a command loads only the network it runs.
  """
  path: str  # "module:Class" below scoat_jax.models
  torch_weights: Callable[[str], dict] | None = None

  @property
  def module(self) -> type[nn.Module]:
    module, cls = self.path.split(":")
    return getattr(importlib.import_module(f"scoat_jax.models.{module}"), cls)


def _scoat_net_torch_weights(path: str) -> dict:
  from scoat_jax.models import torch_weights  # NumPy only; zip reading for .pth
  return torch_weights.load(path)


# Table II of the paper (SCOAT-Net and its six baselines), then Table III
# (UNet++ with three other attention modules at SCOAT-Net's six attended nodes).
_REGISTRY: dict[str, ModelEntry] = {
    "scoat_net": ModelEntry("scoat_net:SCOATNet", torch_weights=_scoat_net_torch_weights),
    "fcn": ModelEntry("fcn:FCN"),
    "unet": ModelEntry("unet:UNet"),
    "unet_pp": ModelEntry("unet_pp:UNetPlusPlus"),
    "pspnet": ModelEntry("pspnet:PSPNet"),
    "deeplabv3": ModelEntry("deeplabv3:DeepLabV3"),
    "attention_unet": ModelEntry("attention_unet:AttentionUNet"),
    "unet_pp_att_v1": ModelEntry("unet_pp_att_v1:UNetPlusPlusResidualAttention"),
    "unet_pp_att_v2": ModelEntry("unet_pp_att_v2:UNetPlusPlusAttentionGates"),
    "unet_pp_att_v3": ModelEntry("unet_pp_att_v3:UNetPlusPlusPyramidAttention"),
}


class ModelConfigError(ValueError):
  """A config that does not describe a network this version can build."""


def available_models() -> list[str]:
  return sorted(_REGISTRY)


def _entry(name: str) -> ModelEntry:
  if name not in _REGISTRY:
    raise ModelConfigError(f"unknown model {name!r}; choose one of {available_models()}")
  return _REGISTRY[name]


def model_class(name: str) -> type[nn.Module]:
  """The linen class registered as `name` (for its class facts, without building it)."""
  return _entry(name).module


def get_model(name: str, **kwargs) -> nn.Module:
  """Returns the linen Module registered as `name`, built with `kwargs`.

  Args:
    name: one of `available_models()`.
    **kwargs: the module's attributes, e.g. `num_classes`, `deep_supervision`,
      `widths`, `dtype`, `conv`.

  Raises:
    ModelConfigError: for an unknown name or an attribute the module does not have.
  """
  try:
    return _entry(name).module(**kwargs)
  except TypeError as e:
    raise ModelConfigError(f"bad arguments for model {name!r}: {e}") from None


def make_conv(cpu_weight_grad: str = "auto") -> Callable[..., nn.Module]:
  """The convolution a network is given: `Conv` with the CPU weight-gradient path chosen."""
  if cpu_weight_grad not in conv_lib.WEIGHT_GRADS:
    raise ModelConfigError(f"config.cpu_weight_grad={cpu_weight_grad!r}: use one of "
                           f"{conv_lib.WEIGHT_GRADS} ('auto': the native kernel where it is faster)")
  return functools.partial(conv_lib.Conv, weight_grad=cpu_weight_grad)


# Module fields every network shares, set from the top level of a config (not `config.model`).
_SHARED_FIELDS = ("parent", "name", "deep_supervision", "dtype", "conv", "in_channels", "node")


def has_heads(name: str) -> bool:
  """Whether network `name` has several heads to supervise (a `deep_supervision` field)."""
  return "deep_supervision" in {f.name for f in dataclasses.fields(model_class(name))}


def model_options(name: str) -> dict:
  """The network's own options with their defaults, for `config.model` (`default.py:NAME`).

  `num_classes` and `widths` are left out: every config has them (widths None
  means the network's default).
  """
  out = {}
  for field in dataclasses.fields(model_class(name)):
    if field.name in _SHARED_FIELDS + ("num_classes", "widths") or not field.init:
      continue
    value = field.default
    if isinstance(value, (bool, int, float, str, tuple)):
      out[field.name] = value
  return out


def deep_supervision_mode(config: Any) -> str:
  """`config.deep_supervision` resolved: 'auto' is 'mean' for networks with heads, else 'none'.

  Raises:
    ModelConfigError: an unknown mode, or 'mean'/'last' for a network with one head.
  """
  mode = config.deep_supervision
  if mode not in DEEP_SUPERVISION:
    raise ModelConfigError(f"config.deep_supervision={mode!r}: use one of {DEEP_SUPERVISION}")
  heads = has_heads(config.model_name)
  if mode == "auto":
    return "mean" if heads else "none"
  if mode != "none" and not heads:
    raise ModelConfigError(
        f"config.deep_supervision={mode!r}, but {config.model_name} has one head: use 'none' "
        "or 'auto' (deep supervision needs a UNet++-style network).")
  return mode


def create_model(config: Any) -> nn.Module:
  """The network of an experiment config (`scoat_jax/configs/default.py`).

  Reads `model_name`, `model` (the network's own arguments; `widths` None
  keeps the network's default), `deep_supervision` ('none' builds one head),
  `dtype` and `cpu_weight_grad`; nothing else.

  Raises:
    ModelConfigError: a field names no valid choice.
  """
  mode = deep_supervision_mode(config)
  if config.dtype not in DTYPES:
    raise ModelConfigError(f"config.dtype={config.dtype!r}: use one of {DTYPES}")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(config.model).items()
            if v is not None}
  if has_heads(config.model_name):
    kwargs["deep_supervision"] = mode != "none"
  return get_model(config.model_name, dtype=jnp.dtype(config.dtype),
                   conv=make_conv(config.cpu_weight_grad), **kwargs)


def load_torch_weights(name: str, path: str) -> dict:
  """The authors' PyTorch weights (`.pth`, or `.npz` of its state dict) as Flax variables.

  Raises:
    ModelConfigError: the network has no PyTorch name map.
  """
  converter = _entry(name).torch_weights
  if converter is None:
    raise ModelConfigError(f"model {name!r} has no PyTorch weight converter; initialise it "
                           "from a scoat_jax checkpoint instead.")
  return converter(path)


def count_params(params) -> int:
  """Number of scalars in a parameter tree (BN running statistics excluded)."""
  return int(sum(np.prod(np.shape(p)) for p in jax.tree_util.tree_leaves(params)))
