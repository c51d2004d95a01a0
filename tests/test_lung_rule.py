"""The lung rule (inference.lung_rule): opacity is kept within its margin of the lung mask."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from trained_checkpoint import test_scan
from scoat_jax.data import ct_io, phantom
from scoat_jax.data import lung_mask as lm
from scoat_jax.data.readers import Loaded
from scoat_jax.inference import lung_rule, scan, segment


def test_keeps_exactly_what_lies_within_the_margin():
  rng = np.random.default_rng(3)
  spacing = (0.8, 0.8, 2.5)
  lung = np.zeros((10, 40, 40), bool)
  lung[2:8, 10:30, 8:20] = True
  labels = (rng.random(lung.shape) < 0.2).astype(np.uint8) * rng.integers(1, 3, lung.shape)
  kept, summary = lung_rule.apply(labels.astype(np.uint8), lung, spacing, margin_mm=5.0)
  near = ndi.distance_transform_edt(~lung, sampling=spacing[::-1]) <= 5.0
  np.testing.assert_array_equal(kept, np.where(near, labels, 0))
  dropped = int(np.count_nonzero(labels[~near]))
  assert summary["removed_voxels"] == dropped > 0 and summary["lung_found"]
  assert summary["removed_ml"] == pytest.approx(dropped * 0.8 * 0.8 * 2.5 / 1000)
  # Nothing outside: the same labels come back untouched.
  inside = np.where(lung, labels, 0).astype(np.uint8)
  again, summary = lung_rule.apply(inside, lung, spacing)
  assert again is inside and summary["removed_voxels"] == 0
  with pytest.raises(lung_rule.LungRuleError, match="same"):
    lung_rule.apply(labels[1:], lung, spacing)
  with pytest.raises(lung_rule.LungRuleError, match="margin"):
    lung_rule.apply(labels, lung, spacing, margin_mm=-1)


# Seed 0, time point 1: lesions that touch the pleura in every patient.
@pytest.mark.parametrize("patient", [0, 1, 2, 3])
def test_phantom_lov_within_two_percent_of_truth(patient):
  s = phantom.generate_scan(0, patient, 1)
  mask = lm.lung_mask(s.hu, s.geometry.spacing)
  truth = s.label
  kept, summary = lung_rule.apply(truth, mask, s.geometry.spacing)
  assert np.count_nonzero(truth) > 0
  share = np.count_nonzero(kept) / np.count_nonzero(truth)
  bare = np.count_nonzero((truth > 0) & mask) / np.count_nonzero(truth)
  print(f"\npatient {patient}: LOV kept {100 * share:.2f}% (mask alone {100 * bare:.2f}%)")
  assert share >= 0.98
  # A blob in the chest wall and one in the air beside the body go.
  outside = np.zeros_like(truth)
  outside[:, :6, :6] = 1
  dropped, _ = lung_rule.apply(np.maximum(truth, outside), mask, s.geometry.spacing)
  assert not dropped[:, :6, :6].any()


class _Marks:
  """A predictor double that 'predicts' given labels (the pipeline around the network)."""

  def __init__(self, labels, num_classes=1):
    self.labels, self.num_classes = labels, num_classes

  def predict_volume(self, hu, *, with_probability=False, progress=None, z_range=None):
    z0, z1 = z_range
    out = np.zeros_like(self.labels)
    out[z0:z1] = self.labels[z0:z1]
    return out, (out.astype(np.float32) if with_probability else None)


def _loaded(hu, geometry):
  return Loaded(hu, geometry, {}, None)


def test_run_volume_applies_the_rule_and_reports_it():
  s = test_scan()
  lung = lm.lung_mask(s.hu, s.geometry.spacing)
  marks = s.label.copy()
  marks[:, :3, :3] = 1  # air outside the body
  result = scan.run_volume(_Marks(marks), _loaded(s.hu, s.geometry))
  assert not result.labels[:, :3, :3].any()
  stats = result.stats
  assert stats["lung_rule"]["applied"] and stats["lung_rule"]["removed_voxels"] >= 9 * 8 - 9
  assert stats["lov_ml"] == pytest.approx(np.count_nonzero(result.labels)
                                          * s.geometry.voxel_volume_ml)
  off = scan.run_volume(_Marks(marks), _loaded(s.hu, s.geometry), lung_rule=False)
  assert off.labels[:, :3, :3].all() and not off.stats["lung_rule"]["applied"]
  assert off.stats["lov_ml"] > stats["lov_ml"]
  del lung


def test_a_scan_without_lung_is_not_quantified():
  hu = np.full((6, 32, 32), -1000, np.int16)
  hu[:, 4:28, 4:28] = 40  # a soft-tissue block: no lung anywhere
  geometry = ct_io.Geometry((32, 32, 6), (1.0, 1.0, 3.0), (0.0, 0.0, 0.0),
                            (1, 0, 0, 0, 1, 0, 0, 0, 1))
  marks = np.ones(hu.shape, np.uint8)
  result = scan.run_volume(_Marks(marks), _loaded(hu, geometry))
  assert result.stats["lov_ml"] is None and result.stats["poi_percent"] is None
  assert not result.labels.any() and result.stats["network_slices"] == [0, 0]
  assert result.stats["warnings"] == [lung_rule.NO_LUNG_WARNING]
  assert not result.stats["lung_rule"]["lung_found"]
  off = scan.run_volume(_Marks(marks), _loaded(hu, geometry), lung_rule=False)
  assert off.stats["lov_ml"] == pytest.approx(6 * 32 * 32 * 3.0 / 1000)


@pytest.mark.xdist_group("tiny_training_b")
def test_predict_files_carry_the_rules_labels(shifted_workdir, tmp_path):
  s = test_scan()
  path = tmp_path / "scan.nii.gz"
  ct_io.write_ct(s.hu, s.geometry, path)
  runs = {}
  for rule in (True, False):
    out = tmp_path / f"rule_{rule}"
    [report] = segment.run([str(shifted_workdir)], str(path), str(out), progress=False,
                           lung_rule=rule)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "scan_mask.nii.gz")))
    on_disk = json.loads((out / "scan_report.json").read_text())
    assert on_disk["lung_rule"]["applied"] is rule
    assert on_disk["lov_ml"] == pytest.approx(np.count_nonzero(mask) * s.geometry.voxel_volume_ml)
    assert (out / "scan_report.png").is_file()
    runs[rule] = (mask, on_disk)
  lung = lm.lung_mask(s.hu, s.geometry.spacing)
  near = ndi.distance_transform_edt(~lung, sampling=s.geometry.spacing[::-1]) <= 5.0
  (with_rule, report), (without, _) = runs[True], runs[False]
  # The tiny model marks the body: the rule removes what lies beyond the margin, nothing else.
  assert (without > 0)[~near].any()
  np.testing.assert_array_equal(with_rule, np.where(near, without, 0))
  assert report["lung_rule"]["removed_voxels"] == np.count_nonzero(without[~near])
