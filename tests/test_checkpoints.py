"""Stored configs and checkpoints across schema versions.

`fixtures/legacy_checkpoint` was saved by the checkpoint writer of the
version before the config schema 2 (a tiny SCOAT-Net, widths 4..32, 32 px,
trained two steps on the phantom, its last head's bias lowered so that a
third of the test scan is labelled), together with what that version
predicted on the scan (`legacy_prediction.npz`). It must still load and
predict the same.
"""
import json
import pathlib

import numpy as np
import pytest

from scoat_jax import checkpoints, configs, inference
from scoat_jax.configs import default

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


def test_legacy_checkpoint_loads_and_predicts_identically():
  model = inference.load_model(FIXTURES / "legacy_checkpoint")
  assert model.config.model_name == "scoat_net"
  assert tuple(model.config.model.widths) == (4, 8, 16, 32, 32)
  assert model.config.cpu_weight_grad == "auto" and dict(model.config.loss_kwargs) == {"alpha": 0.5}
  assert model.intensity == "hu"
  want = np.load(FIXTURES / "legacy_prediction.npz")
  labels, prob = inference.Predictor([model]).predict_volume(want["hu"], with_probability=True)
  np.testing.assert_array_equal(labels, want["labels"])
  # The batch size follows the free memory, and XLA's float32 sums differ by ~1e-6 between
  # batch sizes: the same weights, not the same rounding.
  np.testing.assert_allclose(prob, want["probability"], atol=1e-5)
  assert 0.2 < labels.mean() < 0.5


def test_upgrade_maps_version_1_fields():
  old = {"model": "scoat_net", "num_classes": 3, "widths": [8, 16, 32, 64, 128],
         "fast_cpu_grad": False, "loss": "ce_dice", "loss_alpha": 0.5, "data": {"name": "x"}}
  new = configs.upgrade(old)
  assert new["model_name"] == "scoat_net"
  assert new["model"] == {"num_classes": 3, "widths": [8, 16, 32, 64, 128]}
  assert new["cpu_weight_grad"] == "xla"
  assert new["loss_kwargs"] == {}       # version 1 passed alpha to bce_dice only
  assert new["config_version"] == configs.CONFIG_VERSION
  assert "widths" not in new and "fast_cpu_grad" not in new and "loss_alpha" not in new
  assert old["model"] == "scoat_net"    # the argument is not changed
  bce = configs.upgrade({"model": "scoat_net", "loss": "bce_dice", "loss_alpha": 0.3})
  assert bce["loss_kwargs"] == {"alpha": 0.3}


def test_upgrade_keeps_current_configs_and_refuses_newer_ones():
  current = json.loads(default.get_config().to_json())
  assert configs.upgrade(current) == current
  with pytest.raises(configs.ConfigVersionError, match="upgrade scoat_jax"):
    configs.upgrade({**current, "config_version": configs.CONFIG_VERSION + 1})


def test_a_legacy_workdir_resumes_under_the_current_schema(tmp_path):
  """check_workdir compares the stored (version-1) config after upgrading it."""
  import shutil
  workdir = tmp_path / "run"
  shutil.copytree(FIXTURES / "legacy_checkpoint", workdir)
  stored = configs.upgrade(json.loads((workdir / "config.json").read_text()))
  import ml_collections
  config = ml_collections.ConfigDict(stored)
  checkpoints.check_workdir(workdir, config)   # same run: accepted
  config.learning_rate = 0.5
  with pytest.raises(checkpoints.CheckpointError, match="learning_rate"):
    checkpoints.check_workdir(workdir, config)


def test_loss_config_argument_gives_that_losses_options():
  assert dict(default.get_config().loss_kwargs) == {"alpha": 0.5}
  focal = default.get_config("focal")
  assert focal.loss == "focal" and dict(focal.loss_kwargs) == {"gamma": 2.0, "alpha": 0.25}


def test_a_workdir_from_before_the_newer_fields_resumes(tmp_path):
  """Fields added within schema 3 are filled with the values that keep the old behaviour."""
  config = default.get_config()
  config.data.name = "covid_semiseg"
  stored = json.loads(config.to_json())
  for path in sorted(configs.ADDED_IN_VERSION_3, key=len, reverse=True):  # nested ones first
    parent = stored
    for key in path[:-1]:
      parent = parent[key]
    del parent[path[-1]]
  upgraded = configs.upgrade(stored)
  assert upgraded["data"]["uint8_normalization"] == "scale"
  assert upgraded["data"]["gamma_range"] == [1.0, 1.0] and upgraded["predict_threshold"] is None
  assert upgraded["unlabelled"] == json.loads(config.unlabelled.to_json())   # supervised
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(stored))
  checkpoints.check_workdir(workdir, config)   # the same run: accepted
  config.data.uint8_normalization = "equalize"
  with pytest.raises(checkpoints.CheckpointError, match="uint8_normalization"):
    checkpoints.check_workdir(workdir, config)
