"""Inference takes every network: a checkpoint of another network predicts, exports its attention."""
import json

import jax
import numpy as np
import pytest

from test_networks import TINY, _init
from trained_checkpoint import save_checkpoint, test_scan
from scoat_jax import models
from scoat_jax.configs import default
from scoat_jax.data import ct_io
from scoat_jax.inference import segment


def _checkpoint(root, name):
  config = default.get_config(name)
  config.model.widths = TINY
  config.data.image_size = 32
  model = models.create_model(config)
  variables = jax.device_get(_init(model, np.zeros((1, 32, 32, 1), np.float32)))
  return save_checkpoint(root / name, variables, config.to_dict())


@pytest.fixture(scope="module")
def scan_path(tmp_path_factory):
  scan = test_scan()
  path = tmp_path_factory.mktemp("scan") / "scan.nii.gz"
  ct_io.write_ct(scan.hu, scan.geometry, path)
  return path


@pytest.mark.parametrize("name", ["attention_unet", "deeplabv3"])
def test_predict_with_another_networks_checkpoint(name, scan_path, tmp_path):
  workdir = _checkpoint(tmp_path, name)
  has_maps = bool(models.model_class(name).attention_maps)
  out = tmp_path / "out"
  if not has_maps:
    with pytest.raises(ValueError, match=f"--save_attention: {name} has no attention maps"):
      segment.run([str(workdir)], str(scan_path), str(out), save_attention=True)
    assert not out.exists()
  [report] = segment.run([str(workdir)], str(scan_path), str(out), save_attention=has_maps)
  mask = ct_io.read_mask(out / "scan_mask.nii.gz", like=test_scan().geometry)
  assert mask.shape == test_scan().hu.shape
  written = json.loads((out / "scan_report.json").read_text())
  assert written["lov_ml"] == report["lov_ml"]
  if has_maps:
    assert len(list(out.glob("scan_attention*.png"))) == 1
