"""Broken models and bundles are refused when loaded, in one line naming the file, before any scan.

Weights that would give a clean "no opacity" report (NaN parameters, negative
BatchNorm variances, outputs that overflow), a config whose classes are not the
weights', and a damaged bundle (variables.npz cut short, CRC-corrupt or empty;
bundle.json fields of the wrong type; a bad post-processing rule). The models
come from the committed tiny checkpoint (`fixtures/legacy_checkpoint`): no
training.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from trained_checkpoint import save_checkpoint
from scoat_jax import inference
from scoat_jax.checkpoints import CheckpointError
from scoat_jax.inference import bundle, export, model_checks

ROOT = pathlib.Path(__file__).resolve().parents[1]
CKPT = pathlib.Path(__file__).resolve().parent / "fixtures" / "legacy_checkpoint"


@pytest.fixture(scope="module")
def good():
  return inference.load_model(CKPT)


def _tree_copy(tree):
  return {k: _tree_copy(v) if isinstance(v, dict) else np.array(v) for k, v in tree.items()}


def _leaves(tree):
  for v in tree.values():
    yield from (_leaves(v) if isinstance(v, dict) else [v])


def _first(tree, suffix):
  """The path (list of keys) of the first leaf whose name is `suffix`."""
  for k in sorted(tree):
    if isinstance(tree[k], dict):
      found = _first(tree[k], suffix)
      if found:
        return [k] + found
    elif k == suffix:
      return [k]
  return None


def _set(tree, path, fn):
  node = tree
  for k in path[:-1]:
    node = node[k]
  node[path[-1]] = fn(node[path[-1]])


def _bundle(good, out, *, variables=None, config=None, index_edit=None) -> pathlib.Path:
  bundle.write(out, [{"config": config or good.config.to_dict(),
                      "variables": variables or good.variables,
                      "provenance": export.provenance(good)}],
               preprocessing={"intensity": "hu", "hu_window": list(good.hu_window),
                              "image_size": good.image_size},
               postprocessing=None, model_name=good.config.model_name,
               num_classes=good.num_classes)
  if index_edit:
    index = json.loads((out / bundle.INDEX).read_text())
    index_edit(index)
    (out / bundle.INDEX).write_text(json.dumps(index))
  return out


def _one_line(error) -> str:
  text = str(error.value)
  assert "\n" not in text
  return text


def test_nan_weights_negative_variances_and_overflow_are_refused(good, tmp_path):
  variables = _tree_copy(good.variables)
  kernel = _first(variables["params"], "kernel")
  _set(variables["params"], kernel, lambda k: np.where(np.arange(k.size).reshape(k.shape) == 3,
                                                        np.nan, k).astype(k.dtype))
  workdir = save_checkpoint(tmp_path / "nan", variables, good.meta["config"])
  with pytest.raises(CheckpointError) as e:
    inference.load_ensemble([workdir])
  assert "holds 1 NaN or infinite value(s)" in _one_line(e) and "/".join(kernel) in str(e.value)
  assert "pass another checkpoint" in str(e.value)

  variables = _tree_copy(good.variables)
  var = _first(variables["batch_stats"], "var")
  _set(variables["batch_stats"], var, lambda v: v - 2 * np.abs(v).max() - 1.0)
  member = _bundle(good, tmp_path / "negative_var", variables=variables)
  with pytest.raises(CheckpointError) as e:
    inference.load_ensemble([member])
  text = _one_line(e)
  assert text.startswith(str(member.absolute() / "fold0")) and "negative variance" in text

  # Finite but overflowing: every weight of the first kernel at 3e38.
  variables = _tree_copy(good.variables)
  _set(variables["params"], kernel, lambda k: np.full_like(k, 3e38))
  assert all(np.isfinite(v).all() for v in _leaves(variables))
  with pytest.raises(CheckpointError) as e:
    inference.load_ensemble([_bundle(good, tmp_path / "overflow", variables=variables)])
  assert "outputs are not finite on a probe slice" in _one_line(e)
  # The good model passes every check, and its hash is its content's.
  model_checks.check_values("x", good.model, good.variables, good.image_size)
  assert good.weights_sha256 == model_checks.weights_sha256(_tree_copy(good.variables))
  assert good.weights_sha256 != model_checks.weights_sha256(variables)


def test_a_config_of_other_classes_than_the_weights_is_refused(good, tmp_path):
  config = good.config.to_dict()
  assert good.num_classes == 1 and config["model"]["num_classes"] == 1
  config["num_classes"] = 3          # the classes inference reads; the network stays 1-class
  member = _bundle(good, tmp_path / "three", config=config,
                   index_edit=lambda i: i.update(num_classes=3))
  with pytest.raises(CheckpointError) as e:
    inference.load_ensemble([member])
  assert "num_classes=3" in _one_line(e) and "network of 1 class" in str(e.value)
  # bundle.json and the member's config disagreeing is refused as well.
  member = _bundle(good, tmp_path / "index", config=config)
  with pytest.raises(CheckpointError, match=r"config.json says num_classes=3 but bundle.json"):
    bundle.read(member)


def _corrupt_crc(data: bytes) -> bytes:
  """Flips a byte inside the first stored array's data (the zip's CRC no longer matches)."""
  out = bytearray(data)
  name_len = int.from_bytes(out[26:28], "little")
  extra_len = int.from_bytes(out[28:30], "little")
  start = 30 + name_len + extra_len + 128           # past the local header and the .npy header
  out[start] ^= 0xFF
  return bytes(out)


@pytest.mark.parametrize("damage", ["truncated", "crc", "empty", "not_a_zip"])
def test_damaged_variables_are_one_line_naming_the_file(good, tmp_path, damage):
  member = _bundle(good, tmp_path / "model")
  npz = member / "fold0" / "variables.npz"
  data = npz.read_bytes()
  npz.write_bytes({"truncated": data[: len(data) // 2], "crc": _corrupt_crc(data), "empty": b"",
                   "not_a_zip": b"PK\x03\x04" + b"\0" * 40}[damage])
  with pytest.raises(CheckpointError) as e:
    bundle.read(member)
  text = _one_line(e)
  assert text.startswith(f"{npz}: cannot read the member's file") and "export" in text, text


@pytest.mark.parametrize("edit,expected", [
    (lambda i: i.update(preprocessing=["hu"]), "'preprocessing' is list"),
    (lambda i: i.update(preprocessing="hu"), "'preprocessing' is str"),
    (lambda i: i.update(postprocessing="yes"), "rule is str 'yes'"),
    (lambda i: i.update(postprocessing=[50]), "rule is list"),
    (lambda i: i.update(postprocessing={"min_size": 50.0, "inside_lung": False}), "has no unit"),
    (lambda i: i.update(postprocessing={"min_size": -5, "unit": "mm3"}), "min_size -5 is negative"),
    (lambda i: i.update(postprocessing={"min_size": "abc", "unit": "mm3"}), "'abc' is not a number"),
    (lambda i: i.update(postprocessing={"min_size": 5, "unit": "cm3"}), "unit 'cm3'"),
    (lambda i: i.update(postprocessing={"min_size": 5, "unit": "mm3", "inside_lung": "no"}),
     "inside_lung 'no'"),
])
def test_bad_bundle_json_fields_name_the_file(good, tmp_path, edit, expected):
  member = _bundle(good, tmp_path / "model", index_edit=edit)
  with pytest.raises(CheckpointError) as e:
    bundle.read(member)
  text = _one_line(e)
  assert text.startswith(str(member.absolute() / "bundle.json")) and expected in text, text
  assert "export" in text


def test_a_rule_without_unit_at_size_zero_reads_as_no_rule(good, tmp_path):
  member = _bundle(good, tmp_path / "model",
                   index_edit=lambda i: i.update(postprocessing={"min_size": 0}))
  rule = bundle.read(member).postprocessing
  assert rule == {"min_size": 0.0, "unit": None, "inside_lung": False}


def test_predict_refuses_them_before_writing_anything(good, tmp_path):
  scan = tmp_path / "scan.nii.gz"
  hu = np.full((6, 32, 40), 40, np.int16)
  hu[:, :, :4], hu[:, 8:24, 10:30] = -1000, -850
  image = sitk.GetImageFromArray(hu)
  image.SetSpacing((1.4, 1.4, 5.0))
  sitk.WriteImage(image, str(scan))
  rule = _bundle(good, tmp_path / "rule", index_edit=lambda i: i.update(
      postprocessing={"min_size": -5, "unit": "mm3", "inside_lung": False}))
  npz = _bundle(good, tmp_path / "npz")
  (npz / "fold0" / "variables.npz").write_bytes(b"")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  for model, expected in ((rule, f"{rule.absolute() / 'bundle.json'}: post-processing rule"),
                          (npz, f"{npz / 'fold0' / 'variables.npz'}: cannot read")):
    out = tmp_path / f"out_{model.name}"
    proc = subprocess.run([sys.executable, "-m", "scoat_jax.predict", f"--checkpoint={model}",
                           f"--input={scan}", f"--output={out}"], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and expected in errors[0], errors
    assert not out.exists()
