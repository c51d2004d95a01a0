"""`scoat_jax.segment`: the same mask and report from a path, a SimpleITK image and an array,
and the same numbers as `predict`."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

import scoat_jax
from trained_checkpoint import test_scan, write_rotated_nifti
from scoat_jax.data import ct_io
from scoat_jax.inference import segment

pytestmark = pytest.mark.xdist_group("tiny_training_b")

NUMBERS = ("lov_ml", "lung_volume_ml", "poi_percent", "lov_outside_lung_ml", "num_lesions",
           "network_slices")


@pytest.fixture(scope="module")
def predictor(shifted_workdir):
  return scoat_jax.load(str(shifted_workdir))


def test_path_image_and_array_give_the_same_mask_and_report(predictor, tmp_path):
  scan = test_scan()
  path = tmp_path / "scan.nii.gz"
  ct_io.write_ct(scan.hu, scan.geometry, path)
  # The tiny model marks the body rather than the lungs: without the lung rule its labels
  # are not empty, so the three inputs are compared on labels.
  from_path = scoat_jax.segment(path, predictor, lung_rule=False)
  image = sitk.ReadImage(str(path))
  from_image = scoat_jax.segment(image, predictor, lung_rule=False)
  # The file stores the spacing in float32: the array is given what the file holds.
  from_array = scoat_jax.segment(scan.hu, predictor, spacing=image.GetSpacing(),
                                 origin=image.GetOrigin(), lung_rule=False)
  assert from_path.labels.any()
  for other in (from_image, from_array):
    np.testing.assert_array_equal(other.labels, from_path.labels)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(other.mask),
                                  sitk.GetArrayFromImage(from_path.mask))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(other.probabilities),
                                  sitk.GetArrayFromImage(from_path.probabilities))
    for key in NUMBERS + ("lesions", "geometry"):
      assert other.report[key] == from_path.report[key], key
  got = ct_io.Geometry.from_image(from_path.mask)
  assert got.same_as(scan.geometry)
  # The numbers predict writes for the same scan.
  [written] = segment.run([predictor.models[0].step_dir], str(path), str(tmp_path / "out"),
                          key_images=False, progress=False, lung_rule=False)
  on_disk = json.loads((tmp_path / "out" / "scan_report.json").read_text())
  for key in NUMBERS + ("lesions",):
    assert on_disk[key] == from_path.report[key] == written[key], key


def test_oblique_image_mask_comes_back_on_its_own_grid(predictor, tmp_path):
  scan = test_scan()
  geometry = write_rotated_nifti(scan, tmp_path / "oblique.nii.gz")
  image = sitk.ReadImage(str(tmp_path / "oblique.nii.gz"))
  result = scoat_jax.segment(image, predictor)
  assert ct_io.Geometry.from_image(result.mask).same_as(geometry)
  assert result.labels.shape == scan.hu.shape


def test_slice_arrays_and_bad_inputs(predictor, tmp_path):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 50), dtype=np.uint8)
  result = scoat_jax.segment(image, predictor)
  assert result.labels.shape == (40, 50) and result.report["kind"] == "slice"
  assert result.report["lov_ml"] is None
  with pytest.raises(ValueError, match=r"needs spacing=\(x, y, z\)"):
    scoat_jax.segment(test_scan().hu, predictor)
  with pytest.raises(ValueError, match="2-D input is an 8-bit"):
    scoat_jax.segment(image.astype(np.float32), predictor)
  with pytest.raises(ValueError, match="give a path, a SimpleITK image or a NumPy array"):
    scoat_jax.segment([1, 2, 3], predictor)
  with pytest.raises(ValueError, match="not CT|no air|0..255"):
    scoat_jax.segment(np.full((4, 8, 8), 40, np.int16), predictor, spacing=(1, 1, 1))
  with pytest.raises(ValueError, match="lung_mask has shape"):
    scan = test_scan()
    scoat_jax.segment(scan.hu, predictor, spacing=scan.geometry.spacing,
                      lung_mask=np.ones((2, 2, 2), bool))
