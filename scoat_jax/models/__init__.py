"""Segmentation networks, by name.

>>> model = get_model('scoat_net', num_classes=1, deep_supervision=False)
>>> variables = model.init(jax.random.key(0), jnp.zeros((1, 512, 512, 1)))
>>> logits = model.apply(variables, x, train=False)
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import numpy as np

from scoat_jax.models.scoat_net import SCOATNet

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "scoat_net": SCOATNet,
}


def get_model(name: str, **kwargs) -> nn.Module:
  """Returns the linen Module registered as `name`, built with `kwargs`.

  Args:
    name: one of `available_models()`.
    **kwargs: the module's attributes, e.g. `num_classes`, `deep_supervision`,
      `widths`, `dtype`.

  Raises:
    ValueError: for an unknown name or an attribute the module does not have.
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; choose one of {available_models()}")
  try:
    return _REGISTRY[name](**kwargs)
  except TypeError as e:
    raise ValueError(f"bad arguments for model {name!r}: {e}") from None


def available_models() -> list[str]:
  return sorted(_REGISTRY)


def count_params(params) -> int:
  """Number of scalars in a parameter tree (BN running statistics excluded)."""
  return int(sum(np.prod(np.shape(p)) for p in jax.tree_util.tree_leaves(params)))
