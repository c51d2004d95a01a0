"""Any stored orientation gives the same numbers: the canonical axial grid, and outputs back on
the stored grid voxel for voxel. SimpleITK's own DICOMOrient is the independent reference."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from trained_checkpoint import test_scan
from scoat_jax.data import ct_io, orientation
from scoat_jax.data.geometry import Geometry
from scoat_jax.inference import segment

pytestmark = pytest.mark.xdist_group("tiny_training")

# Each stored form of one physical image: SimpleITK's filters keep every voxel's
# physical position and change only how the grid is stored.
STORED = {
    "axial": lambda im: im,
    "sagittal": lambda im: sitk.PermuteAxes(im, [1, 2, 0]),
    "coronal": lambda im: sitk.PermuteAxes(im, [0, 2, 1]),
    "flip x": lambda im: sitk.Flip(im, [True, False, False]),
    "flip y": lambda im: sitk.Flip(im, [False, True, False]),
    "flip z": lambda im: sitk.Flip(im, [False, False, True]),
    "flip x and z": lambda im: sitk.Flip(im, [True, False, True]),
    "sagittal, flipped": lambda im: sitk.Flip(sitk.PermuteAxes(im, [2, 0, 1]), [False, True, True]),
}


def _image(array, spacing=(0.8, 1.1, 2.5), origin=(12.5, -30.0, -400.0)):
  image = sitk.GetImageFromArray(array)
  image.SetSpacing(spacing)
  image.SetOrigin(origin)
  return image


def _tilted(image, degrees: float, axis: str = "x"):
  """The same voxels on a grid rotated by `degrees` about a patient axis."""
  t = np.deg2rad(degrees)
  c, s = np.cos(t), np.sin(t)
  rot = {"x": [[1, 0, 0], [0, c, -s], [0, s, c]], "z": [[c, -s, 0], [s, c, 0], [0, 0, 1]]}[axis]
  out = sitk.Image(image)
  out.SetDirection(tuple(np.asarray(rot, float).ravel()))
  return out


@pytest.mark.parametrize("name", sorted(STORED))
def test_canonical_grid_matches_dicom_orient(name):
  rng = np.random.default_rng(0)
  array = rng.integers(-1000, 500, (5, 6, 7)).astype(np.int16)
  stored = STORED[name](_image(array))
  turn = orientation.reorientation(Geometry.from_image(stored))
  reference = sitk.DICOMOrient(stored, "LPS")
  ours = turn.to_canonical(sitk.GetArrayFromImage(stored))
  np.testing.assert_array_equal(ours, sitk.GetArrayFromImage(reference))
  np.testing.assert_array_equal(ours, array)   # the original axial array, voxel for voxel
  assert turn.canonical.same_as(Geometry.from_image(reference), 1e-6)
  np.testing.assert_array_equal(turn.to_stored(ours), sitk.GetArrayFromImage(stored))
  assert turn.is_identity == (name == "axial")
  # A canonical voxel index names the same stored voxel.
  stored_array = sitk.GetArrayFromImage(stored)
  for index in [(0, 0, 0), (4, 5, 6), (2, 1, 3)]:
    assert stored_array[turn.canonical_index_to_stored(index)] == ours[index]
  assert orientation.orientation_code(turn.canonical) == "LPS"


def test_orientation_codes():
  image = _image(np.zeros((5, 6, 7), np.int16))
  assert orientation.orientation_code(Geometry.from_image(image)) == "LPS"
  code = orientation.orientation_code(Geometry.from_image(STORED["sagittal"](image)))
  assert sorted(code) == sorted("LPS") and code != "LPS"


def test_oblique_grids_read_as_nearest_axes_or_are_refused():
  image = _image(np.zeros((5, 6, 7), np.int16))
  turn = orientation.reorientation(Geometry.from_image(_tilted(image, 10.0)))
  assert turn.is_identity and turn.oblique_degrees == pytest.approx(10.0, abs=1e-6)
  with pytest.raises(ct_io.CTError, match=r"40\.0 degrees off the patient axes.*resample"):
    orientation.reorientation(Geometry.from_image(_tilted(image, 40.0)), what="scan.nii.gz")


def test_reading_returns_the_canonical_volume_and_the_way_back(tmp_path):
  scan = test_scan()
  image = ct_io.Geometry.apply_to(scan.geometry, sitk.GetImageFromArray(scan.hu))
  sitk.WriteImage(STORED["sagittal"](image), str(tmp_path / "sag.nii.gz"))
  ct = ct_io.read_ct(tmp_path / "sag.nii.gz")
  np.testing.assert_array_equal(ct.hu, scan.hu)
  assert ct.geometry.same_as(scan.geometry) and not ct.stored_geometry.same_as(scan.geometry)
  assert ct.reorientation.describe()["reoriented"]
  stored = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "sag.nii.gz")))
  np.testing.assert_array_equal(ct.to_stored(ct.hu), stored)


def _resampled_to(reference: sitk.Image, mask_path) -> np.ndarray:
  mask = sitk.ReadImage(str(mask_path))
  return sitk.GetArrayFromImage(sitk.Resample(mask, reference, sitk.Transform(),
                                              sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))


def test_every_stored_orientation_gives_the_same_numbers(shifted_workdir, tmp_path):
  scan = test_scan()
  axial = ct_io.Geometry.apply_to(scan.geometry, sitk.GetImageFromArray(scan.hu))
  forms = {**STORED, "oblique 10 degrees": lambda im: _tilted(im, 10.0)}
  for name, make in forms.items():
    folder = tmp_path / "in" / name.replace(" ", "_").replace(",", "")
    folder.mkdir(parents=True)
    sitk.WriteImage(make(axial), str(folder / "scan.nii.gz"))
  reports = {}
  for name in forms:
    key = name.replace(" ", "_").replace(",", "")
    [reports[name]] = segment.run([str(shifted_workdir)], str(tmp_path / "in" / key / "scan.nii.gz"),
                                  str(tmp_path / "out" / key), progress=False,
                                  lung_rule=False)  # the tiny model's marks are mostly body
  base = reports["axial"]
  assert base["lov_ml"] > 0 and base["lung_volume_ml"] > 0
  reference_mask = sitk.ReadImage(str(tmp_path / "out" / "axial" / "scan_mask.nii.gz"))
  for name, report in reports.items():
    key = name.replace(" ", "_").replace(",", "")
    tolerance = 0.05 if name.startswith("oblique") else 0.01
    for field in ("lov_ml", "lung_volume_ml", "poi_percent"):
      assert report[field] == pytest.approx(base[field], rel=tolerance), (name, field)
    written = tmp_path / "out" / key / "scan_mask.nii.gz"
    stored_input = sitk.ReadImage(str(tmp_path / "in" / key / "scan.nii.gz"))
    assert Geometry.from_image(sitk.ReadImage(str(written))).same_as(
        Geometry.from_image(stored_input)), name     # the input's own grid
    if name.startswith("oblique"):
      continue  # another physical placement: its mask covers other physical voxels
    ours = _resampled_to(reference_mask, written) > 0
    ref = sitk.GetArrayFromImage(reference_mask) > 0
    dice = 2 * np.sum(ours & ref) / max(1, ours.sum() + ref.sum())
    assert dice >= 0.98, (name, dice)
    assert report["orientation"]["reoriented"] == (name != "axial")
  saved = json.loads((tmp_path / "out" / "sagittal" / "scan_report.json").read_text())
  assert saved["orientation"]["stored_orientation"] != "LPS"
  lesion = saved["lesions"][0]
  stored = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "sagittal" / "scan_mask.nii.gz")))
  assert stored[tuple(lesion["centre_index"])] > 0   # centres index the stored grid


def test_a_sagittally_stored_scan_gives_the_same_axial_training_slices(tmp_path):
  from scoat_jax import datasets
  from scoat_jax.datasets import build
  scan = test_scan()
  image = ct_io.Geometry.apply_to(scan.geometry, sitk.GetImageFromArray(scan.hu))
  label = ct_io.Geometry.apply_to(scan.geometry, sitk.GetImageFromArray(scan.label))
  names = {}
  for name, make in (("axial", STORED["axial"]), ("sagittal", STORED["sagittal, flipped"])):
    root = tmp_path / name
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    sitk.WriteImage(make(image), str(root / "imagesTr" / "case0_0000.nii.gz"))
    sitk.WriteImage(make(label), str(root / "labelsTr" / "case0.nii.gz"))
    names[name] = build.build("ct_volumes", str(tmp_path / f"tfds_{name}"), str(root))
  axial = datasets.open_source(names["axial"], str(tmp_path / "tfds_axial"))
  sagittal = datasets.open_source(names["sagittal"], str(tmp_path / "tfds_sagittal"))
  assert axial.num_records == sagittal.num_records == scan.hu.shape[0]
  for r in range(axial.num_records):
    a, s = axial.source[r], sagittal.source[r]
    np.testing.assert_array_equal(a["image"], s["image"])
    np.testing.assert_array_equal(a["mask"], s["mask"])
    np.testing.assert_allclose(a["spacing"], s["spacing"])
