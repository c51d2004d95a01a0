"""Tests of scoat_jax.data.dicom_seg: DICOM SEG output that lands on the right source slices.

Every SEG is read back twice, with pydicom (the raw per-frame attributes) and
with highdicom, and checked against the source files' own headers: each
frame's source SOPInstanceUID and ImagePositionPatient, its pixels against the
labels of that slice. For reoriented series the check is physical: every SEG
pixel, placed in patient space by the SEG's own geometry, must carry the label
of the canonical voxel at that position.
"""
import importlib.metadata
import os
import pathlib
import warnings

import numpy as np
import pydicom
import pytest

from scoat_jax.data import ct_io, dicom_seg, dicom_writer

highdicom = pytest.importorskip("highdicom")

SHAPE = (7, 40, 48)  # (z, y, x)
SPACING = (0.8, 0.7, 2.5)  # (x, y, z) mm
ORIGIN = (-96.5, 40.25, -310.0)
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"  # PS3.4: Segmentation Storage
DIRECTIONS = {
    "identity": (1, 0, 0, 0, 1, 0, 0, 0, 1),
    "flipped_z": (1, 0, 0, 0, 1, 0, 0, 0, -1),  # left-handed: the writer reverses the slices
    "flipped_xz": (-1, 0, 0, 0, 1, 0, 0, 0, -1),  # right-handed, stored as such
    "sagittal": (0, 0, -1, 1, 0, 0, 0, -1, 0),  # rows along P, columns down, slices R-ward
}


def _series(directory: pathlib.Path, direction="identity", shape=SHAPE, description="CT",
            patient_id="P1^") -> pathlib.Path:
  hu = np.full(shape, -1000, np.int16)
  hu[:, shape[1] // 4:-shape[1] // 4, shape[2] // 4:-shape[2] // 4] = 40  # a body of sorts
  geometry = ct_io.Geometry.for_array(shape, SPACING, ORIGIN, DIRECTIONS[direction])
  return dicom_writer.write_dicom_series(hu, geometry, directory, patient_id=patient_id,
                                         study_date="20200315", series_description=description)


def _pattern(shape, num_classes: int) -> np.ndarray:
  """Labels with a different rectangle on every slice but slice 3, which is empty."""
  labels = np.zeros(shape, np.uint8)
  for z in range(shape[0]):
    if z == 3:
      continue
    labels[z, 1 + z:4 + 2 * z, 2 + 2 * z:5 + 3 * z] = 1
    if num_classes == 3 and z % 2 == 0:
      labels[z, -4 - z // 2:-1, -3 - z:-1] = 2
  return labels


def _headers(files):
  return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def _frames(path: pathlib.Path):
  """[(segment number, source SOPInstanceUID, frame ImagePositionPatient, pixels)] via pydicom."""
  ds = pydicom.dcmread(path)
  pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
  shared = ds.SharedFunctionalGroupsSequence[0]
  out = []
  for item, frame in zip(ds.PerFrameFunctionalGroupsSequence, pixels):
    sources = item.DerivationImageSequence[0].SourceImageSequence
    assert len(sources) == 1
    # With a single segment the segment identification is shared by all frames.
    segment = (item if "SegmentIdentificationSequence" in item else shared)
    out.append((int(segment.SegmentIdentificationSequence[0].ReferencedSegmentNumber),
                sources[0].ReferencedSOPInstanceUID,
                [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient], frame))
  return ds, out


def _check_seg(path, labels, files, num_classes):
  """Checks a SEG against the labels of its source files (slice z = files[z])."""
  heads = _headers(files)
  index = {h.SOPInstanceUID: z for z, h in enumerate(heads)}
  segments = [1] if num_classes == 1 else [1, 2]
  expected = {s: (labels > 0) if num_classes == 1 else (labels == s) for s in segments}
  ds, frames = _frames(path)
  assert ds.SOPClassUID == SEG_STORAGE and ds.Modality == "SEG"
  assert ds.SegmentationType == "BINARY"
  ref = ds.ReferencedSeriesSequence
  assert len(ref) == 1 and ref[0].SeriesInstanceUID == heads[0].SeriesInstanceUID
  assert {r.ReferencedSOPInstanceUID for r in ref[0].ReferencedInstanceSequence} == set(index)
  assert ds.SeriesInstanceUID != heads[0].SeriesInstanceUID
  assert ds.StudyInstanceUID == heads[0].StudyInstanceUID
  assert ds.PatientID == heads[0].PatientID
  assert ds.FrameOfReferenceUID == heads[0].FrameOfReferenceUID
  assert [int(s.SegmentNumber) for s in ds.SegmentSequence] == segments
  assert all(s.SegmentAlgorithmType == "AUTOMATIC" for s in ds.SegmentSequence)
  seen = set()
  for segment, uid, position, pixels in frames:
    z = index[uid]
    np.testing.assert_allclose(position, [float(v) for v in heads[z].ImagePositionPatient],
                               atol=1e-4)
    np.testing.assert_array_equal(pixels, expected[segment][z])
    seen.add((segment, z))
  # Empty frames are left out, every other one is there once.
  assert len(seen) == len(frames)
  assert seen == {(s, z) for s in segments for z in range(len(files)) if expected[s][z].any()}
  for s in segments:
    assert sum(int(p.sum()) for seg, _, _, p in frames if seg == s) == int(expected[s].sum())
  # highdicom's reading of the same file, slice by slice in source order.
  seg = highdicom.seg.segread(path)
  got = seg.get_pixels_by_source_instance(
      source_sop_instance_uids=[h.SOPInstanceUID for h in heads], segment_numbers=segments,
      assert_missing_frames_are_empty=True)
  for k, s in enumerate(segments):
    np.testing.assert_array_equal(got[..., k], expected[s])
  return ds


def _leftovers(directory: pathlib.Path):
  return sorted(p.name for p in directory.iterdir())


@pytest.fixture(scope="module")
def series(tmp_path_factory):
  return _series(tmp_path_factory.mktemp("source") / "series")


def test_series_files_follow_image_position_and_the_read_grid(tmp_path):
  directory = _series(tmp_path / "s", "flipped_xz")
  # Shuffle the file names, so that name order says nothing about slice order.
  names = sorted(directory.iterdir())
  for k, f in enumerate(names):
    f.rename(directory / f"tmp{k}")
  for k, f in enumerate(sorted(directory.iterdir(), key=lambda p: int(p.name[3:]))):
    f.rename(directory / f"x{(5 * k + 2) % len(names):02d}.dcm")
  files = dicom_seg.series_files(directory)
  assert sorted(files) == sorted(directory.iterdir()) and [f.name for f in files] != sorted(
      f.name for f in files)
  stored = ct_io.read_ct(directory).stored_geometry
  normal = stored.direction_matrix[:, 2]
  for k, h in enumerate(_headers(files)):
    expected = np.asarray(stored.origin) + k * stored.spacing[2] * normal
    np.testing.assert_allclose([float(v) for v in h.ImagePositionPatient], expected, atol=1e-4)


def test_seg_of_one_class_lands_on_each_slice(series, tmp_path):
  files = dicom_seg.series_files(series)
  labels = _pattern(SHAPE, 1)
  out = dicom_seg.write_dicom_seg(labels, files, tmp_path / "scan_seg.dcm", num_classes=1)
  assert out == tmp_path / "scan_seg.dcm" and _leftovers(tmp_path) == ["scan_seg.dcm"]
  assert open(out, "rb").read(132)[128:] == b"DICM"  # a DICOM file with its preamble
  ds = _check_seg(out, labels, files, 1)
  (segment,) = ds.SegmentSequence
  assert segment.SegmentLabel == "Lung opacity"
  assert (segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
          segment.SegmentedPropertyCategoryCodeSequence[0].CodingSchemeDesignator) == (
              "49755003", "SCT")
  assert segment.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Opacity"
  assert segment.AnatomicRegionSequence[0].CodeValue == "39607008"  # SNOMED CT: lung
  algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
  version = importlib.metadata.version("scoat_jax")
  assert algorithm.AlgorithmName == "scoat_jax" and algorithm.AlgorithmVersion == version
  assert ds.SoftwareVersions == version and ds.Manufacturer == "scoat_jax"
  assert ds.SeriesDescription == "scoat_jax lung opacification"
  assert int(ds.SeriesNumber) == int(_headers(files[:1])[0].SeriesNumber) + 1000
  # Bool labels are the same mask; a second write replaces the first.
  dicom_seg.write_dicom_seg(labels.astype(bool), files, out, num_classes=1, series_number=7,
                            series_description="again")
  assert _check_seg(out, labels, files, 1).SeriesDescription == "again"
  assert _leftovers(tmp_path) == ["scan_seg.dcm"]


def test_seg_of_three_classes_has_ggo_and_consolidation(series, tmp_path):
  files = dicom_seg.series_files(series)
  labels = _pattern(SHAPE, 3)
  ds = _check_seg(dicom_seg.write_dicom_seg(labels, files, tmp_path / "a.dcm", num_classes=3),
                  labels, files, 3)
  codes = [(s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
            s.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator)
           for s in ds.SegmentSequence]
  assert codes == [("Ground-glass opacity", "112120", "DCM"),
                   ("Consolidation", "95436008", "SCT")]
  # Ground glass only: the consolidation segment is described but has no frames.
  ggo = np.where(labels == 2, 0, labels)
  _check_seg(dicom_seg.write_dicom_seg(ggo, files, tmp_path / "b.dcm", num_classes=3),
             ggo, files, 3)


@pytest.mark.parametrize("direction", ["flipped_z", "flipped_xz", "sagittal"])
def test_labels_on_the_canonical_grid_land_where_they_were_predicted(tmp_path, direction):
  # A one-part PatientName ("P1", not "P1^"): highdicom's doubt about it is not shown.
  directory = _series(tmp_path / "s", direction, shape=(5, 9, 11), patient_id="P1")
  volume = ct_io.read_ct(directory)
  canonical = _pattern(volume.hu.shape, 3)
  labels = volume.to_stored(canonical)
  files = dicom_seg.series_files(directory)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    path = dicom_seg.write_dicom_seg(labels, files, tmp_path / "seg.dcm", num_classes=3)
  _check_seg(path, labels, files, 3)
  # Every SEG pixel, placed by the SEG's own geometry, carries the canonical label there.
  ds, frames = _frames(path)
  shared = ds.SharedFunctionalGroupsSequence[0]
  iop = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
  row_mm, col_mm = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
  grid = volume.geometry
  to_index = np.linalg.inv(grid.direction_matrix * np.asarray(grid.spacing))
  r, c = np.mgrid[:ds.Rows, :ds.Columns]
  counts = {1: 0, 2: 0}
  for segment, _, position, pixels in frames:
    points = (np.asarray(position)[:, None, None] + c * col_mm * iop[:3, None, None] +
              r * row_mm * iop[3:, None, None])
    xyz = np.tensordot(to_index, points - np.asarray(grid.origin)[:, None, None], axes=1)
    index = np.rint(xyz).astype(int)
    np.testing.assert_allclose(xyz, index, atol=1e-3)
    np.testing.assert_array_equal(pixels, canonical[index[2], index[1], index[0]] == segment)
    counts[segment] += int(pixels.sum())
  assert counts == {1: int((canonical == 1).sum()), 2: int((canonical == 2).sum())}


@pytest.mark.parametrize("num_classes", [1, 3])
def test_an_empty_mask_gives_a_readable_seg(series, tmp_path, caplog, num_classes):
  files = dicom_seg.series_files(series)
  path = dicom_seg.write_dicom_seg(np.zeros(SHAPE, np.uint8), files, tmp_path / "e.dcm",
                                   num_classes=num_classes)
  heads = _headers(files)
  segments = 1 if num_classes == 1 else 2
  ds, frames = _frames(path)
  assert ds.SOPClassUID == SEG_STORAGE and len(ds.SegmentSequence) == segments
  assert len(frames) == segments and all(not p.any() for *_, p in frames)
  assert {uid for _, uid, _, _ in frames} == {heads[0].SOPInstanceUID}
  refs = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence
  assert {r.ReferencedSOPInstanceUID for r in refs} == {h.SOPInstanceUID for h in heads}
  seg = highdicom.seg.segread(path)
  got = seg.get_pixels_by_source_instance(
      source_sop_instance_uids=[h.SOPInstanceUID for h in heads],
      segment_numbers=list(range(1, segments + 1)), assert_missing_frames_are_empty=True)
  assert got.shape == (len(files), SHAPE[1], SHAPE[2], segments) and not got.any()
  assert "empty" not in caplog.text  # highdicom's fallback (every frame) was not taken


def _other_series_file(tmp_path) -> pathlib.Path:
  return sorted(_series(tmp_path / "other", description="other").iterdir())[2]


def _bad_cases(tmp_path, files):
  other = _other_series_file(tmp_path)
  text = tmp_path / "notes.dcm"
  text.write_text("not DICOM\n")
  good = _pattern(SHAPE, 3)
  return {
      "fewer slices": (good[:-1], files, {}, "6 slices but 7 source files"),
      "rows": (good[:, :-1], files, {}, "40 rows x 48 columns"),
      "columns": (good[:, :, :-1], files, {}, "40 rows x 48 columns"),
      "label 2 for one class": (good, files, {"num_classes": 1}, r"\[2\] outside 0..1"),
      "label 3": (good * 2, files, {}, r"\[4\] outside 0..2"),
      "negative": (good.astype(np.int16) - 1, files, {}, r"\[-1\] outside 0..2"),
      "probabilities": (good / 2.0, files, {}, "dtype float64"),
      "2-D": (good[0], files, {}, r"shape \(40, 48\)"),
      "classes": (good, files, {"num_classes": 2}, "num_classes=2"),
      "two series": (good, files[:3] + [other] + files[4:], {}, "not one series"),
      "a slice twice": (good, files[:3] + [files[2]] + files[4:], {}, "occurs 2 times"),
      "not DICOM": (good, files[:6] + [text], {}, "not a readable DICOM file"),
      "missing file": (good, files[:6] + [tmp_path / "gone.dcm"], {}, "not a readable DICOM"),
      "no files": (good[:0], [], {}, "no source files"),
      "no folder": (good, files, {"path": tmp_path / "nowhere" / "s.dcm"}, "does not exist"),
      "a folder": (good, files, {"path": tmp_path}, "is a folder"),
      "series number": (good, files, {"series_number": 0}, "series_number=0"),
      "long description": (good, files, {"series_description": "x" * 65}, "series_description"),
  }


def test_bad_inputs_raise_one_line_and_write_nothing(series, tmp_path):
  files = dicom_seg.series_files(series)
  out = tmp_path / "out"
  out.mkdir()
  cases = _bad_cases(tmp_path, files)
  for name, (labels, sources, options, match) in cases.items():
    options = {"num_classes": 3, "path": out / "s.dcm", **options}
    with pytest.raises(dicom_seg.DicomSegError, match=match) as e:
      dicom_seg.write_dicom_seg(labels, sources, options.pop("path"), **options)
    message = str(e.value)
    assert "\n" not in message and "; " in message, (name, message)
    assert isinstance(e.value, ValueError)
    assert _leftovers(out) == [], name


def test_series_files_errors(tmp_path):
  with pytest.raises(dicom_seg.DicomSegError, match="not a folder"):
    dicom_seg.series_files(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(dicom_seg.DicomSegError, match="no DICOM series"):
    dicom_seg.series_files(tmp_path / "empty")
  a = _series(tmp_path / "a", description="a")
  b = _series(tmp_path / "b", description="b", shape=(4, 40, 48))
  both = tmp_path / "both"
  both.mkdir()
  for src in (a, b):
    for f in src.iterdir():
      os.link(f, both / f"{src.name}_{f.name}")
  with pytest.raises(dicom_seg.DicomSegError, match="holds 2 DICOM series") as e:
    dicom_seg.series_files(both)
  assert "\n" not in str(e.value) and "(4 files)" in str(e.value)
  uid = _headers(sorted(b.iterdir())[:1])[0].SeriesInstanceUID
  picked = dicom_seg.series_files(both, uid)
  assert len(picked) == 4 and all(p.name.startswith("b_") for p in picked)
  with pytest.raises(dicom_seg.DicomSegError, match="no DICOM series '1.2.3'"):
    dicom_seg.series_files(both, "1.2.3")
