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
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scoat_jax.models import conv as conv_lib
from scoat_jax.models.scoat_net import SCOATNet

DTYPES = ("float32", "bfloat16")
DEEP_SUPERVISION = ("mean", "last", "none")


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """A registered network: its linen class and, if any, its PyTorch weight converter."""
  module: type[nn.Module]
  torch_weights: Callable[[str], dict] | None = None


def _scoat_net_torch_weights(path: str) -> dict:
  from scoat_jax.models import torch_weights  # NumPy only; zip reading for .pth
  return torch_weights.load(path)


_REGISTRY: dict[str, ModelEntry] = {
    "scoat_net": ModelEntry(SCOATNet, torch_weights=_scoat_net_torch_weights),
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


def create_model(config: Any) -> nn.Module:
  """The network of an experiment config (`scoat_jax/configs/default.py`).

  Reads `model_name`, `model` (the network's own arguments), `deep_supervision`
  ('none' builds one head), `dtype` and `cpu_weight_grad`; nothing else.

  Raises:
    ModelConfigError: a field names no valid choice.
  """
  if config.deep_supervision not in DEEP_SUPERVISION:
    raise ModelConfigError(f"config.deep_supervision={config.deep_supervision!r}: use one of "
                           f"{DEEP_SUPERVISION}")
  if config.dtype not in DTYPES:
    raise ModelConfigError(f"config.dtype={config.dtype!r}: use one of {DTYPES}")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(config.model).items()}
  return get_model(config.model_name, deep_supervision=config.deep_supervision != "none",
                   dtype=jnp.dtype(config.dtype), conv=make_conv(config.cpu_weight_grad),
                   **kwargs)


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
