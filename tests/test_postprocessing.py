"""Post-processing rules on hand-made masks, and the choice on validation cases (hand-computed)."""
import numpy as np
import pytest

from scoat_jax.inference import postprocessing as pp


def _volume():
  """A 10-voxel lesion inside the lung, a 2-voxel speck inside, a 4-voxel blob outside."""
  labels = np.zeros((6, 8, 8), np.uint8)
  labels[1:3, 1:3, 1:3] = 1          # 8 voxels ...
  labels[3, 1, 1:3] = 2              # ... + 2 (3-class: consolidation) = 10, one component
  labels[5, 6, 6:8] = 1              # 2 voxels
  labels[1, 6:8, 5:7] = 1            # 4 voxels
  lung = np.zeros(labels.shape, bool)
  lung[:, :5, :] = True              # rows 0..4; the 4-voxel blob lies in rows 6..7
  lung[5, 6, 6:8] = True
  return labels, lung


def test_min_size_counts_mm3_with_the_spacing():
  labels, _ = _volume()
  spacing = (0.5, 0.5, 4.0)          # 1 mm^3 a voxel: sizes 10, 2, 4 mm^3
  out, summary = pp.apply(labels, {"min_size": 3.0, "unit": "mm3", "inside_lung": False},
                          spacing_xyz=spacing)
  want = labels.copy()
  want[5, 6, 6:8] = 0
  np.testing.assert_array_equal(out, want)
  assert summary["removed_components"] == 1 and summary["removed_voxels"] == 2
  out, _ = pp.apply(labels, {"min_size": 5.0, "unit": "mm3", "inside_lung": False},
                    spacing_xyz=(1.0, 1.0, 2.0))  # 2 mm^3 a voxel: 20, 4, 8 -> the 2-voxel goes
  np.testing.assert_array_equal(out, want)
  out, _ = pp.apply(labels, {"min_size": 9.0, "unit": "mm3", "inside_lung": False},
                    spacing_xyz=(1.0, 1.0, 2.0))  # 20 kept, 4 and 8 removed
  want[1, 6:8, 5:7] = 0
  np.testing.assert_array_equal(out, want)
  assert out.dtype == np.uint8 and (out == 2).sum() == 2


def test_inside_lung_removes_components_mostly_outside():
  labels, lung = _volume()
  out, summary = pp.apply(labels, {"min_size": 0, "unit": None, "inside_lung": True},
                          spacing_xyz=(1, 1, 1), lung=lung)
  want = labels.copy()
  want[1, 6:8, 5:7] = 0
  np.testing.assert_array_equal(out, want)
  # Half inside is kept (LUNG_SHARE = 0.5): the 4-voxel blob with 2 of its voxels in the lung.
  lung2 = lung.copy()
  lung2[1, 6, 5:7] = True
  out, _ = pp.apply(labels, {"min_size": 0, "unit": None, "inside_lung": True},
                    spacing_xyz=(1, 1, 1), lung=lung2)
  np.testing.assert_array_equal(out, labels)
  _, summary = pp.apply(labels, {"min_size": 0, "unit": None, "inside_lung": True},
                        spacing_xyz=(1, 1, 1), lung=None)
  assert summary["skipped"] and summary["removed_voxels"] == 0


def test_slices_count_pixels_with_8_connectivity_and_units_must_match():
  labels = np.zeros((6, 6), np.uint8)
  labels[0, 0] = labels[1, 1] = 1    # diagonal neighbours: one component of 2 pixels
  labels[4:6, 3:6] = 1               # 6 pixels
  out, summary = pp.apply(labels, {"min_size": 3, "unit": "pixels", "inside_lung": False})
  assert out[0, 0] == 0 and out[1, 1] == 0 and out[4:6, 3:6].all()
  assert summary["removed_components"] == 1
  with pytest.raises(pp.PostprocessingError, match="counts mm3"):
    pp.apply(labels, {"min_size": 3, "unit": "mm3", "inside_lung": False})
  with pytest.raises(pp.PostprocessingError, match="min_size -1 is negative"):
    pp.apply(labels, {"min_size": -1, "unit": "pixels"})
  same, _ = pp.apply(labels, None)
  assert same is labels


def test_choose_keeps_the_smallest_rule_that_gains_and_reports_dsc_and_rlp():
  # Truth: a 3x3 square. Prediction: the square plus two 1-pixel specks.
  truth = np.zeros((12, 12), np.uint8)
  truth[2:5, 2:5] = 1
  pred = truth.copy()
  pred[9, 9] = pred[0, 11] = 1
  cases = [{"pred": pred, "truth": truth, "spacing_xyz": None, "lung": None}] * 2
  rule = pp.choose(cases)
  # DSC before: 2*9 / (11 + 9) = 0.9; after removing components under 5 px: 1.0.
  assert rule["min_size"] == 5.0 and rule["unit"] == "pixels" and not rule["inside_lung"]
  chosen = rule["chosen_on"]
  assert chosen["before"]["dsc"] == pytest.approx(0.9)
  assert chosen["after"]["dsc"] == pytest.approx(1.0)
  # RLP: 1 of 3 predicted regions is true before, 1 of 1 after.
  assert chosen["before"]["rlp"] == pytest.approx(1 / 3)
  assert chosen["after"]["rlp"] == pytest.approx(1.0)
  by_size = {c["min_size"]: c["mean_dsc"] for c in chosen["candidates"]}
  assert by_size[0.0] == pytest.approx(0.9) and by_size[5.0] == pytest.approx(1.0)
  assert by_size[10.0] == pytest.approx(0.0)   # the 9-pixel square goes too: DSC 0


def test_choose_keeps_nothing_when_no_rule_helps_and_uses_the_lung():
  truth = np.zeros((12, 12), np.uint8)
  truth[2:5, 2:5] = 1
  assert not pp.is_active(pp.choose([{"pred": truth, "truth": truth, "spacing_xyz": None,
                                      "lung": None}]))
  # Volumes: a big false positive outside the lung is only removed by inside_lung.
  labels, lung = _volume()
  truth3 = labels.copy()
  truth3[1, 6:8, 5:7] = 0
  rule = pp.choose([{"pred": labels, "truth": truth3, "spacing_xyz": (1.0, 1.0, 100.0),
                     "lung": lung}])
  # Sizes are 1000, 200 and 400 mm^3: 'inside_lung' alone gives DSC 1 (2*12/(12+12)),
  # a size of 500 mm^3 removes the 200 mm^3 true speck as well.
  assert rule["inside_lung"] and rule["min_size"] == 0.0
  assert rule["chosen_on"]["after"]["dsc"] == pytest.approx(1.0)
  assert rule["chosen_on"]["before"]["dsc"] == pytest.approx(2 * 12 / (16 + 12))
  with pytest.raises(pp.PostprocessingError, match="no validation cases"):
    pp.choose([])
