"""DICOM series geometry slice by slice (scoat_jax.data.dicom_geometry through ct_io.read_ct):
missing positions, per-slice spacing / orientation / size, gantry tilt, truncated files; the
DICOM SEG's slice spacing; folders of scans that would leave one out."""
from __future__ import annotations

import math
import os
import pathlib

import numpy as np
import pydicom
import pytest

from scoat_jax.data import ct_io, dicom_seg, dicom_writer, readers

SPACING = (0.7, 0.7, 10.0)
ORIGIN = (-100.0, -120.0, -300.0)
SHAPE = (8, 16, 20)


def _hu(shape=SHAPE) -> np.ndarray:
  """Air, a body at 40 HU and a 'lung' at -850 HU; every slice distinct (slice k + 1 HU)."""
  hu = np.full(shape, 40, np.int16)
  hu[:, :, :3] = -1000
  hu[:, 4:12, 6:14] = -850
  hu += np.arange(shape[0], dtype=np.int16)[:, None, None]
  return hu


def _series(directory: pathlib.Path, shape=SHAPE) -> tuple[pathlib.Path, list[pathlib.Path]]:
  geometry = ct_io.Geometry.for_array(shape, SPACING, ORIGIN)
  out = dicom_writer.write_dicom_series(_hu(shape), geometry, directory, patient_id="P",
                                        study_date="20200101")
  return out, sorted(out.iterdir())


def _edit(path: pathlib.Path, **changes) -> None:
  """Sets (value) or deletes (None) header keywords of one file."""
  ds = pydicom.dcmread(path)
  for keyword, value in changes.items():
    if value is None:
      if keyword in ds:
        delattr(ds, keyword)
    else:
      setattr(ds, keyword, value)
  ds.save_as(path)


def _refused(path, *texts):
  with pytest.raises(ct_io.CTError) as e:
    ct_io.read_ct(path)
  message = str(e.value)
  assert "\n" not in message
  for text in texts:
    assert str(text) in message, message
  return message


# ------------------------------------------------------------------- positions

def test_a_complete_series_reads_exactly(tmp_path):
  out, _ = _series(tmp_path / "s")
  ct = ct_io.read_ct(out)
  np.testing.assert_array_equal(ct.hu, _hu())
  assert ct.geometry.spacing == pytest.approx(SPACING) and ct.warnings == ()
  assert ct.geometry.origin == pytest.approx(ORIGIN)
  assert "warnings" not in ct.reorientation.describe()


@pytest.mark.parametrize("which", [0, 3, 7])
def test_one_slice_without_position_is_placed_by_its_slice_location(tmp_path, which):
  out, files = _series(tmp_path / "s")
  _edit(files[which], ImagePositionPatient=None)
  ct = ct_io.read_ct(out)
  # ITK alone: that slice stacked last at (0, 0, 0), z spacing 47-48 mm.
  assert ct.geometry.spacing == pytest.approx(SPACING)
  assert ct.geometry.origin == pytest.approx(ORIGIN)
  np.testing.assert_array_equal(ct.hu, _hu())           # every slice in its place
  assert ct.geometry.voxel_volume_ml == pytest.approx(0.7 * 0.7 * 10.0 / 1000)
  assert len(ct.warnings) == 1 and "derived from SliceLocation" in ct.warnings[0]
  assert files[which].name in ct.warnings[0]
  assert ct.reorientation.describe()["warnings"] == list(ct.warnings)


def test_a_slice_without_position_and_a_gap_is_refused(tmp_path):
  out, files = _series(tmp_path / "s")
  _edit(files[2], ImagePositionPatient=None)
  files[5].unlink()
  _refused(out, out, "missing or duplicated", "IM00005.dcm", "IM00007.dcm")


def test_a_slice_without_position_or_slice_location_is_refused(tmp_path):
  out, files = _series(tmp_path / "s")
  _edit(files[3], ImagePositionPatient=None, SliceLocation=None)
  _refused(out, files[3], "lacks ImagePositionPatient", "export the series again")


def test_a_slice_location_that_disagrees_with_the_positions_is_refused(tmp_path):
  out, files = _series(tmp_path / "s")
  _edit(files[3], ImagePositionPatient=None, SliceLocation="-262.5")   # 7.5 mm off
  # The other slices' positions are regular: the derived one lands in a gap of its own making.
  _refused(out, out, "not evenly spaced", files[3].name)
  _edit(files[3], SliceLocation="-270")                             # where it belongs
  assert ct_io.read_ct(out).geometry.spacing == pytest.approx(SPACING)
  _edit(files[5], SliceLocation="-240")                             # disagrees with its IPP
  _refused(out, files[3], "does not agree", "off by 10 mm")


def test_no_position_on_any_slice(tmp_path):
  out, files = _series(tmp_path / "s")
  for f in files:
    _edit(f, ImagePositionPatient=None)
  ct = ct_io.read_ct(out)
  # ITK alone: 1 mm, every volume a tenth; SliceLocation and SpacingBetweenSlices agree on 10.
  assert ct.geometry.spacing == pytest.approx(SPACING)
  np.testing.assert_array_equal(ct.hu, _hu())
  assert "SpacingBetweenSlices (10 mm)" in ct.warnings[0] and "relative" in ct.warnings[0]
  for f in files:
    _edit(f, SpacingBetweenSlices=None)
  _refused(out, "lacks ImagePositionPatient", "SpacingBetweenSlices")
  for k, f in enumerate(files):
    _edit(f, SpacingBetweenSlices="10", SliceLocation=str(-300 + 5 * k))
  _refused(out, out, "does not agree with SpacingBetweenSlices 10 mm")


# ------------------------------------------------------- one grid for every slice

@pytest.mark.parametrize("which", [0, 4])
def test_a_slice_of_another_pixel_spacing_is_refused_and_named(tmp_path, which):
  out, files = _series(tmp_path / "s")
  _edit(files[which], PixelSpacing=[0.35, 0.35])
  # ITK alone, with the first slice odd: every volume a quarter (lung 139 mL instead of 3578).
  _refused(out, files[which], "PixelSpacing", "0.35\\0.35", "0.7\\0.7", "7 of 8")


def test_a_slice_of_another_orientation_or_size_is_refused_and_named(tmp_path):
  out, files = _series(tmp_path / "s")
  _edit(files[5], ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
  _refused(out, files[5], "ImageOrientationPatient", "localizer")
  out, files = _series(tmp_path / "t")
  ds = pydicom.dcmread(files[2])
  ds.Rows, ds.Columns = 8, 10
  ds.PixelData = np.zeros((8, 10), np.int16).tobytes()
  ds.save_as(files[2])
  _refused(out, files[2], "Rows x Columns", "8\\10", "16\\20")


def test_a_slice_without_pixel_spacing_is_refused(tmp_path):
  out, files = _series(tmp_path / "s")
  _edit(files[0], PixelSpacing=None)
  _refused(out, files[0], "lacks PixelSpacing", "1 mm")


# ------------------------------------------------------------------ gantry tilt

def _tilted(directory: pathlib.Path, degrees: float) -> pathlib.Path:
  """The slices tilted about x by `degrees`; positions still 10 mm apart along z."""
  out, files = _series(directory)
  t = math.radians(degrees)
  for k, f in enumerate(files):
    _edit(f, ImageOrientationPatient=[1, 0, 0, 0, round(math.cos(t), 8), round(math.sin(t), 8)],
          ImagePositionPatient=[ORIGIN[0], ORIGIN[1], ORIGIN[2] + 10.0 * k])
  return out


@pytest.mark.parametrize("degrees", [20.0, 29.0])
def test_gantry_tilt_spaces_slices_along_the_normal_with_a_warning(tmp_path, degrees):
  out = _tilted(tmp_path / "s", degrees)
  ct = ct_io.read_ct(out)
  dz = 10.0 * math.cos(math.radians(degrees))       # 9.397 mm at 20 degrees, 8.746 at 29
  assert ct.stored_geometry.spacing == pytest.approx((0.7, 0.7, dz), rel=1e-6)
  # ITK alone: 10 mm, volumes +6.4% (20 degrees) and +14.3% (29 degrees).
  assert ct.geometry.voxel_volume_ml == pytest.approx(0.7 * 0.7 * dz / 1000, rel=1e-6)
  np.testing.assert_array_equal(ct.to_stored(ct.hu), _hu())
  assert len(ct.warnings) == 1 and f"gantry tilt {degrees:.1f} degrees" in ct.warnings[0]
  assert f"{dz:.4g} mm along the slice normal" in ct.warnings[0]
  drift = 7 * 10.0 * math.sin(math.radians(degrees))
  assert f"up to {drift:.1f} mm" in ct.warnings[0]
  assert ct.reorientation.describe()["warnings"] == list(ct.warnings)


def test_positions_off_the_line_are_refused(tmp_path):
  out, files = _series(tmp_path / "s")
  _edit(files[4], ImagePositionPatient=[ORIGIN[0] + 3.0, ORIGIN[1], ORIGIN[2] + 40.0])
  _refused(out, files[4], "off the line")


# -------------------------------------------------------------- unreadable files

@pytest.mark.parametrize("which", [-1, 3])
def test_a_truncated_file_is_named_not_dropped(tmp_path, which):
  out, files = _series(tmp_path / "s")
  data = files[which].read_bytes()
  files[which].write_bytes(data[:len(data) - 200])
  # ITK alone: the last one dropped (8 files, 7 slices), a middle one a gap without a name.
  _refused(out, files[which], "truncated", "copy the file again")


def test_an_unreadable_dicom_file_is_named(tmp_path):
  out, files = _series(tmp_path / "s")
  files[0].write_bytes(files[0].read_bytes()[:100])    # cut before the DICM preamble
  _refused(out, files[0], "not a readable DICOM file")
  (out / "notes.txt").write_text("not DICOM")           # other files are left alone
  files[0].unlink()
  out2, _ = _series(tmp_path / "t")
  (out2 / "notes.txt").write_text("not DICOM")
  assert ct_io.read_ct(out2).hu.shape == SHAPE


# -------------------------------------------------------------------- DICOM SEG

def test_an_empty_seg_of_a_series_without_spacing_between_slices_states_the_real_one(tmp_path):
  out, files = _series(tmp_path / "s")
  for f in files:
    _edit(f, SpacingBetweenSlices=None)
  path = dicom_seg.write_dicom_seg(np.zeros(SHAPE, np.uint8), dicom_seg.series_files(out),
                                   tmp_path / "e.dcm", num_classes=1)
  measures = pydicom.dcmread(path).SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
  assert float(measures.SpacingBetweenSlices) == pytest.approx(10.0)   # highdicom: 1.0
  assert [float(v) for v in measures.PixelSpacing] == pytest.approx([0.7, 0.7])


def test_series_files_order_matches_the_read_grid_when_names_do_not(tmp_path):
  out, files = _series(tmp_path / "s")
  for k, f in enumerate(files):     # names now run against the positions
    f.rename(out / f"x{len(files) - k:02d}.dcm")
  ct = ct_io.read_ct(out)
  order = dicom_seg.series_files(out)
  zs = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in order]
  assert zs == sorted(zs) and np.allclose(ct.stored_geometry.origin, ORIGIN)


# ----------------------------------------------------------- folders of scans

def test_a_broken_link_in_a_folder_of_scans_is_refused(tmp_path):
  folder = tmp_path / "scans"
  folder.mkdir()
  ct_io.write_ct(_hu(), ct_io.Geometry.for_array(SHAPE, SPACING), folder / "a.nii.gz")
  os.symlink(tmp_path / "gone.nii.gz", folder / "b.nii.gz")
  with pytest.raises(readers.InputError, match="b.nii.gz is a broken link") as e:
    readers.discover_inputs(folder)
  assert str(folder) in str(e.value)


def test_loose_dicom_slices_beside_another_scan_are_refused(tmp_path):
  out, _ = _series(tmp_path / "s")
  ct_io.write_ct(_hu(), ct_io.Geometry.for_array(SHAPE, SPACING), out / "other.nii.gz")
  with pytest.raises(readers.InputError, match="other.nii.gz") as e:
    readers.discover_inputs(out)
  assert "loose DICOM slices" in str(e.value) and str(out) in str(e.value)
  (out / "other.nii.gz").unlink()
  _series(out / "sub")                                   # a series folder inside the series
  with pytest.raises(readers.InputError, match="sub"):
    readers.discover_inputs(tmp_path)                    # found as a scan of the parent
  with pytest.raises(readers.InputError, match="DICOM series folder, sub"):
    readers.discover_inputs(out)
  (out / "sub_mask.nii.gz").write_bytes(b"")            # mask-named files are not scans
  for f in (out / "sub").iterdir():
    f.unlink()
  (out / "sub").rmdir()
  assert [i.path for i in readers.discover_inputs(out)] == [out]
