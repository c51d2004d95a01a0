"""Tests of scoat_jax.data.ct_io: round trips keep voxels and geometry; bad inputs fail clearly."""
import os
import pathlib

import numpy as np
import pytest
import SimpleITK as sitk

from scoat_jax.data import ct_io, dicom_writer

_C, _S = np.cos(np.deg2rad(30.0)), np.sin(np.deg2rad(30.0))
DIRECTIONS = {
    "flipped_z": (1, 0, 0, 0, 1, 0, 0, 0, -1),  # left-handed
    "flipped_xy": (-1, 0, 0, 0, -1, 0, 0, 0, 1),  # right-handed, RAS-like
    "rotated": (_C, -_S, 0, _S, _C, 0, 0, 0, 1),  # oblique in-plane rotation
}
SPACING = (0.75, 0.8125, 2.5)  # anisotropic, exactly representable in float32
ORIGIN = (-120.5, 33.25, -401.0)


def _volume(shape=(5, 6, 7), seed=0):
  """Random voxels as CT has them: soft tissue and fat, a third air, some bone."""
  rng = np.random.default_rng(seed)
  hu = rng.integers(-120, 80, shape)
  kind = rng.random(shape)
  hu[kind < 0.35] = rng.integers(-1024, -900, shape)[kind < 0.35]
  hu[kind > 0.9] = rng.integers(300, 1500, shape)[kind > 0.9]
  return hu.astype(np.int16)


def _geometry(hu, direction="flipped_z"):
  return ct_io.Geometry.for_array(hu.shape, SPACING, ORIGIN, DIRECTIONS[direction])


def _leftovers(directory: pathlib.Path):
  return [p.name for p in directory.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
@pytest.mark.parametrize("direction", sorted(DIRECTIONS))
def test_file_round_trip_keeps_voxels_and_geometry(tmp_path, suffix, direction):
  hu = _volume()
  geometry = _geometry(hu, direction)
  path = ct_io.write_ct(hu, geometry, tmp_path / f"ct{suffix}")
  back = ct_io.read_ct(path)
  assert back.hu.dtype == np.int16
  # Read in the canonical orientation; the way back gives the stored voxels and grid.
  np.testing.assert_array_equal(back.to_stored(back.hu), hu)
  stored = back.stored_geometry
  assert stored.size == (7, 6, 5)
  assert stored.spacing == SPACING and stored.origin == ORIGIN
  # NIfTI stores the direction as a float32 quaternion.
  np.testing.assert_allclose(stored.direction, geometry.direction, atol=1e-6)
  assert np.all(np.diag(back.geometry.direction_matrix) > 0.8)   # axes along L, P, S
  assert _leftovers(tmp_path) == []


def test_float_volume_and_mask_round_trip(tmp_path):
  hu = _volume().astype(np.float32) + 0.25
  geometry = _geometry(hu)
  back = ct_io.read_ct(ct_io.write_ct(hu, geometry, tmp_path / "f.nrrd"))
  assert back.hu.dtype == np.float32
  np.testing.assert_array_equal(back.to_stored(back.hu), hu)
  mask = (np.arange(hu.size).reshape(hu.shape) % 3).astype(np.uint8)
  got = ct_io.read_mask(ct_io.write_mask(mask, geometry, tmp_path / "m.nii.gz"), like=geometry)
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, mask)
  got = ct_io.read_mask(ct_io.write_mask(mask > 0, geometry, tmp_path / "b.mha"),
                        like=geometry,
                        allowed=(0, 1))
  np.testing.assert_array_equal(got, (mask > 0).astype(np.uint8))


def _read_tags(path, tags):
  reader = sitk.ImageFileReader()
  reader.SetFileName(str(path))
  reader.ReadImageInformation()
  return {t: reader.GetMetaData(t).strip() for t in tags}


@pytest.mark.parametrize("direction", ["flipped_xy", "rotated"])
def test_dicom_round_trip(tmp_path, direction):
  hu = _volume((4, 6, 7))
  hu[0, 0, 0], hu[-1, -1, -1] = -2048, 31743  # the extremes int16 storage allows
  geometry = _geometry(hu, direction)
  out = dicom_writer.write_dicom_series(hu,
                                 geometry,
                                 tmp_path / "series",
                                 patient_id="P7",
                                 study_date="20200315")
  back = ct_io.read_ct(out)
  np.testing.assert_array_equal(back.to_stored(back.hu), hu)
  assert back.stored_geometry.size == geometry.size
  for field in ("spacing", "origin", "direction"):
    np.testing.assert_allclose(getattr(back.stored_geometry, field), getattr(geometry, field),
                               atol=1e-4)
  assert back.metadata["patient_id"] == "P7" and back.metadata["study_date"] == "20200315"
  files = sorted(out.iterdir())
  assert len(files) == 4 and _leftovers(tmp_path) == []
  tags = [
      _read_tags(f, [
          "0008|0060", "0028|1052", "0028|1053", "0020|0013", "0018|0050", "0028|0030", "0020|000e",
          "0020|000d", "0008|0020", "0010|0020", "0020|0032", "0020|0037", "0028|0100", "0028|0103"
      ]) for f in files
  ]
  assert {t["0020|000e"] for t in tags} == {tags[0]["0020|000e"]}
  assert {t["0020|000d"] for t in tags} == {tags[0]["0020|000d"]}
  assert sorted(int(t["0020|0013"]) for t in tags) == [1, 2, 3, 4]
  for t in tags:
    assert t["0008|0060"] == "CT" and t["0008|0020"] == "20200315" and t["0010|0020"] == "P7"
    assert float(t["0028|1052"]) == -1024 and float(t["0028|1053"]) == 1
    assert float(t["0018|0050"]) == 2.5
    assert t["0028|0100"] == "16" and t["0028|0103"] == "1"  # int16 storage
    np.testing.assert_allclose([float(v) for v in t["0028|0030"].split("\\")], [0.8125, 0.75])
    np.testing.assert_allclose([float(v) for v in t["0020|0037"].split("\\")],
                               np.array(geometry.direction).reshape(3, 3)[:, :2].T.ravel(),
                               atol=1e-6)
  positions = sorted(tuple(float(v) for v in t["0020|0032"].split("\\")) for t in tags)
  expected = sorted(
      tuple(np.array(ORIGIN) + k * 2.5 * np.array(geometry.direction).reshape(3, 3)[:, 2])
      for k in range(4))
  np.testing.assert_allclose(positions, expected, atol=1e-4)


def test_dicom_left_handed_reads_back_as_physically_identical_volume(tmp_path):
  hu = _volume((4, 5, 6))
  geometry = _geometry(hu, "flipped_z")
  back = ct_io.read_ct(
      dicom_writer.write_dicom_series(hu, geometry, tmp_path / "s", patient_id="P", study_date="20200101"))
  np.testing.assert_array_equal(back.hu, hu[::-1])
  assert np.linalg.det(back.geometry.direction_matrix) > 0
  # Voxel (i, j, k) of the original sits where voxel (i, j, n-1-k) of the copy sits.
  first = np.array(ORIGIN)
  last_of_copy = np.array(back.geometry.origin) + 3 * 2.5 * back.geometry.direction_matrix[:, 2]
  np.testing.assert_allclose(last_of_copy, first, atol=1e-4)


def test_dicom_directory_with_two_series(tmp_path):
  hu = _volume((3, 4, 5))
  geometry = _geometry(hu, "flipped_xy")
  dicom_writer.write_dicom_series(hu,
                           geometry,
                           tmp_path / "a",
                           patient_id="P",
                           study_date="20200101",
                           series_description="a")
  dicom_writer.write_dicom_series(hu + 1,
                           geometry,
                           tmp_path / "b",
                           patient_id="P",
                           study_date="20200101",
                           series_description="b")
  both = tmp_path / "both"
  both.mkdir()
  for src in ("a", "b"):
    for f in (tmp_path / src).iterdir():
      os.link(f, both / f"{src}_{f.name}")
  with pytest.raises(ct_io.CTError, match="2 DICOM series") as e:
    ct_io.read_ct(both)
  assert str(both) in str(e.value)
  uid_b = ct_io.read_ct(tmp_path / "b").metadata["series_uid"]
  b = ct_io.read_ct(both, series_id=uid_b)
  np.testing.assert_array_equal(b.to_stored(b.hu), hu + 1)


def test_dicom_writer_refuses_existing_and_bad_date_and_cleans_up(tmp_path, monkeypatch):
  hu = _volume((3, 4, 5))
  geometry = _geometry(hu, "flipped_xy")
  out = tmp_path / "s"
  dicom_writer.write_dicom_series(hu, geometry, out, patient_id="P", study_date="20200101")
  with pytest.raises(ct_io.CTError, match="already exists") as e:
    dicom_writer.write_dicom_series(hu, geometry, out, patient_id="P", study_date="20200101")
  assert str(out) in str(e.value)
  with pytest.raises(ct_io.CTError, match="YYYYMMDD"):
    dicom_writer.write_dicom_series(hu, geometry, tmp_path / "t", patient_id="P", study_date="2020-01-01")
  with pytest.raises(ct_io.CTError, match="does not fit int16") as e:
    dicom_writer.write_dicom_series(hu.astype(np.int32) + 40000,
                             geometry,
                             tmp_path / "t",
                             patient_id="P",
                             study_date="20200101")
  assert str(tmp_path / "t") in str(e.value)
  with pytest.raises(ct_io.CTError, match="NaN"):
    dicom_writer.write_dicom_series(np.full(hu.shape, np.nan),
                             geometry,
                             tmp_path / "t",
                             patient_id="P",
                             study_date="20200101")
  dicom_writer.write_dicom_series(hu + 5,
                           geometry,
                           out,
                           patient_id="P",
                           study_date="20200101",
                           overwrite=True)
  c = ct_io.read_ct(out)
  np.testing.assert_array_equal(c.to_stored(c.hu), hu + 5)

  calls = []

  def failing_execute(self, image):
    calls.append(1)
    if len(calls) == 2:
      raise RuntimeError("disk full")
    return original(self, image)

  original = sitk.ImageFileWriter.Execute
  monkeypatch.setattr(sitk.ImageFileWriter, "Execute", failing_execute)
  with pytest.raises(ct_io.CTError, match="could not write"):
    dicom_writer.write_dicom_series(hu, geometry, tmp_path / "half", patient_id="P", study_date="20200101")
  assert not (tmp_path / "half").exists() and _leftovers(tmp_path) == []


def test_failed_file_write_leaves_nothing(tmp_path, monkeypatch):
  hu = _volume()
  geometry = _geometry(hu)

  def failing_write(*args, **kwargs):
    raise RuntimeError("disk full")

  monkeypatch.setattr(sitk, "WriteImage", failing_write)
  with pytest.raises(ct_io.CTError, match="could not write"):
    ct_io.write_ct(hu, geometry, tmp_path / "ct.nii.gz")
  assert list(tmp_path.iterdir()) == []


def test_writer_errors(tmp_path):
  hu = _volume()
  geometry = _geometry(hu)
  with pytest.raises(ct_io.CTError, match="unknown output format") as e:
    ct_io.write_ct(hu, geometry, tmp_path / "ct.png")
  assert "ct.png" in str(e.value)
  with pytest.raises(ct_io.CTError, match="does not match geometry"):
    ct_io.write_ct(hu[:, :, :3], geometry, tmp_path / "ct.nii.gz")
  with pytest.raises(ct_io.CTError, match="does not exist"):
    ct_io.write_ct(hu, geometry, tmp_path / "missing_dir" / "ct.nii.gz")
  with pytest.raises(ct_io.CTError, match="probabilities"):
    ct_io.write_mask(hu.astype(np.float32) / 3000, geometry, tmp_path / "m.nii.gz")
  assert list(tmp_path.iterdir()) == []


def test_missing_path(tmp_path):
  path = tmp_path / "nope.nii.gz"
  with pytest.raises(ct_io.CTError, match="no such file") as e:
    ct_io.read_ct(path)
  assert str(path) in str(e.value)


def test_empty_dicom_directory(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ct_io.CTError, match="no DICOM series") as e:
    ct_io.read_ct(tmp_path / "empty")
  assert str(tmp_path / "empty") in str(e.value)


def test_corrupt_file(tmp_path):
  path = tmp_path / "broken.nii.gz"
  path.write_bytes(np.random.default_rng(0).bytes(2000))
  with pytest.raises(ct_io.CTError, match="corrupt or truncated file") as e:
    ct_io.read_ct(path)
  assert str(path) in str(e.value)


def test_two_dimensional_inputs(tmp_path):
  png = tmp_path / "slice.png"
  sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 9), np.uint8)), str(png))
  nii2d = tmp_path / "slice.nii.gz"
  sitk.WriteImage(sitk.GetImageFromArray(np.full((8, 9), -1000, np.int16)), str(nii2d))
  one_slice = tmp_path / "one.mha"
  sitk.WriteImage(sitk.GetImageFromArray(np.full((1, 8, 9), -1000, np.int16)), str(one_slice))
  for path in (png, nii2d, one_slice):
    with pytest.raises(ct_io.CTError, match="3-D") as e:
      ct_io.read_ct(path)
    assert str(path) in str(e.value)


def test_four_dimensional_and_colour_inputs(tmp_path):
  nii4d = tmp_path / "four.nii.gz"
  sitk.WriteImage(sitk.GetImageFromArray(np.full((2, 3, 4, 5), -1000, np.int16), isVector=False),
                  str(nii4d))
  with pytest.raises(ct_io.CTError, match="4-D") as e:
    ct_io.read_ct(nii4d)
  assert str(nii4d) in str(e.value)
  rgb = tmp_path / "rgb.png"
  sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 9, 3), np.uint8), isVector=True), str(rgb))
  with pytest.raises(ct_io.CTError, match="channels") as e:
    ct_io.read_ct(rgb)
  assert str(rgb) in str(e.value)


def test_values_that_are_not_hu(tmp_path):
  geometry = ct_io.Geometry.for_array((4, 5, 6), SPACING)
  eight_bit = tmp_path / "windowed.nii.gz"
  ct_io.write_ct(np.random.default_rng(0).integers(0, 256, (4, 5, 6)), geometry, eight_bit)
  with pytest.raises(ct_io.CTError, match="8-bit") as e:
    ct_io.read_ct(eight_bit)
  assert str(eight_bit) in str(e.value)
  no_air = tmp_path / "no_air.nii.gz"
  ct_io.write_ct(np.full((4, 5, 6), -400, np.int16), geometry, no_air)
  with pytest.raises(ct_io.CTError, match="no air") as e:
    ct_io.read_ct(no_air)
  assert str(no_air) in str(e.value)
  assert ct_io.read_ct(no_air, check_values=False).hu.min() == -400
  nan = tmp_path / "nan.nrrd"
  ct_io.write_ct(np.full((4, 5, 6), np.nan, np.float32), geometry, nan)
  with pytest.raises(ct_io.CTError, match="NaN"):
    ct_io.read_ct(nan)


@pytest.mark.parametrize("change", ["size", "spacing", "origin", "direction"])
def test_mask_geometry_mismatch(tmp_path, change):
  hu = _volume()
  geometry = _geometry(hu)
  mask = np.zeros(hu.shape, np.uint8)
  other = dict(size=geometry.size,
               spacing=geometry.spacing,
               origin=geometry.origin,
               direction=geometry.direction)
  if change == "size":
    mask = np.zeros((5, 6, 8), np.uint8)
    other["size"] = (8, 6, 5)
  elif change == "spacing":
    other["spacing"] = (0.75, 0.8125, 3.0)
  elif change == "origin":
    other["origin"] = (-120.5, 33.25, -399.0)
  else:
    other["direction"] = DIRECTIONS["flipped_xy"]
  path = ct_io.write_mask(mask, ct_io.Geometry(**other), tmp_path / "mask.nii.gz")
  with pytest.raises(ct_io.CTError, match="differs from its image") as e:
    ct_io.read_mask(path, like=geometry)
  assert str(path) in str(e.value)
  ct_io.read_mask(path)  # fine without a reference geometry


def test_mask_tolerates_float32_rounding_only(tmp_path):
  hu = _volume()
  geometry = _geometry(hu)
  nudged = ct_io.Geometry(geometry.size, tuple(s * (1 + 1e-7) for s in geometry.spacing),
                          geometry.origin, geometry.direction)
  path = ct_io.write_mask(np.zeros(hu.shape, np.uint8), nudged, tmp_path / "mask.mha")
  ct_io.read_mask(path, like=geometry)
  assert geometry.same_as(nudged) and not geometry.same_as(nudged, tol=1e-9)


def test_mask_values_outside_allowed(tmp_path):
  geometry = ct_io.Geometry.for_array((4, 5, 6), SPACING)
  path = ct_io.write_mask(np.full((4, 5, 6), 255, np.uint8), geometry, tmp_path / "m.nii.gz")
  with pytest.raises(ct_io.CTError, match="255") as e:
    ct_io.read_mask(path)
  assert str(path) in str(e.value) and "divide by 255" in str(e.value)
  path3 = ct_io.write_mask(np.full((4, 5, 6), 3, np.uint8), geometry, tmp_path / "m3.nii.gz")
  with pytest.raises(ct_io.CTError, match="outside the allowed"):
    ct_io.read_mask(path3)
  assert ct_io.read_mask(path3, allowed=range(4)).max() == 3


def test_geometry_validation_and_volume():
  g = ct_io.Geometry((10, 20, 30), (0.5, 0.5, 2.0))
  assert g.shape == (30, 20, 10)
  assert g.voxel_volume_ml == pytest.approx(0.5 * 0.5 * 2.0 / 1000)
  with pytest.raises(ct_io.CTError, match="spacing"):
    ct_io.Geometry((10, 20, 30), (0.5, 0.0, 2.0))
  with pytest.raises(ct_io.CTError, match="direction"):
    ct_io.Geometry((10, 20, 30), (1, 1, 1), direction=(0,) * 9)
  with pytest.raises(ct_io.CTError, match="size"):
    ct_io.Geometry((10, 20), (1, 1, 1))


def test_dicom_missing_slice(tmp_path):
  hu = _volume((5, 4, 5))
  out = dicom_writer.write_dicom_series(hu,
                                 _geometry(hu, "flipped_xy"),
                                 tmp_path / "s",
                                 patient_id="P",
                                 study_date="20200101")
  sorted(out.iterdir())[2].unlink()
  with pytest.raises(ct_io.CTError, match="missing or duplicated") as e:
    ct_io.read_ct(out)
  assert str(out) in str(e.value)
