"""Experiment configs (ml_collections). Load one with `--config=<file>`.

`default.py` is the paper's recipe, `demo.py` the CPU-sized run on the
synthetic phantom. A config is stored with every run (`config.json`) and
checkpoint; `upgrade` reads one written by an earlier version of the schema.
"""
from __future__ import annotations

import copy
from typing import Any

# Version 3: model.widths may be None (the network's own widths), other networks'
# options in `model`, deep_supervision 'auto'; a version-2 config reads unchanged.
# Version 2: model_name + model (the network's own arguments), cpu_weight_grad,
# loss_kwargs. Version 1 (no config_version field): model (a name), widths,
# fast_cpu_grad, loss_alpha.
CONFIG_VERSION = 3

# Fields added within version 3, with the value that reproduces what a config
# written before them did: `upgrade` fills them in, so such a run still loads,
# predicts as before and resumes (its workdir is not "another config").
ADDED_IN_VERSION_3 = {
    ("data", "uint8_normalization"): "scale",
    ("data", "gamma_range"): [1.0, 1.0],
    ("predict_threshold",): None,
    ("unlabelled",): {"name": "", "data_dir": "", "soft_labels": "", "ratio": 0.5, "weight": 1.0,
                      "min_confidence": 0.0, "hard": False, "slices": "all",
                      "match_intensity": False},
    ("unlabelled", "match_intensity"): False,
    ("init_head",): "same",
}


class ConfigVersionError(ValueError):
  """A stored config from a newer schema than this version reads."""


def upgrade(config: dict[str, Any]) -> dict[str, Any]:
  """A stored config (plain dict, as in config.json) in the current schema.

  Version-1 configs map field by field: `model` (a name) -> `model_name`,
  `widths` -> `model.widths` (with `model.num_classes`), `fast_cpu_grad`
  True/False -> `cpu_weight_grad` 'auto'/'xla', and `loss_alpha` ->
  `loss_kwargs.alpha` for 'bce_dice' (the only loss it was passed to). Fields
  added since (ADDED_IN_VERSION_3) get the value that keeps the old behaviour.

  Raises:
    ConfigVersionError: the config is from a newer schema.
  """
  config = copy.deepcopy(dict(config))
  version = int(config.get("config_version", 1))
  if version > CONFIG_VERSION:
    raise ConfigVersionError(
        f"the stored config has schema version {version}; this scoat_jax reads up to "
        f"{CONFIG_VERSION}: upgrade scoat_jax.")
  if version == 1:
    if isinstance(config.get("model"), str):
      config["model_name"] = config.pop("model")
      config["model"] = {"num_classes": config.get("num_classes", 1)}
      if "widths" in config:
        config["model"]["widths"] = config.pop("widths")
    if "fast_cpu_grad" in config:
      config["cpu_weight_grad"] = "auto" if config.pop("fast_cpu_grad") else "xla"
    alpha = config.pop("loss_alpha", None)
    if "loss_kwargs" not in config:
      config["loss_kwargs"] = ({"alpha": alpha} if alpha is not None
                               and config.get("loss") == "bce_dice" else {})
    version = 2
  if version == 2:
    version = 3  # every version-2 config is a valid version-3 one
  config["config_version"] = version
  for path, value in ADDED_IN_VERSION_3.items():
    parent = config
    for key in path[:-1]:
      parent = parent.get(key)
      if not isinstance(parent, dict):
        break
    else:
      parent.setdefault(path[-1], copy.deepcopy(value))
  return config
