"""DICOM Segmentation (SEG) output for a scan that came in as a DICOM series.

PACS viewers (3D Slicer, OHIF) show DICOM Segmentation objects over their
source series, not NIfTI masks. `write_dicom_seg` turns a label mask on the
series' *stored* grid into one multi-frame SEG file (highdicom builds it):
BINARY segments, one frame per (slice, segment) that holds opacity, each frame
pointing at its source slice by SOPInstanceUID and by ImagePositionPatient.
The patient and study come from the source headers, the SEG gets a new
SeriesInstanceUID in the source's study.

Slice index z of the mask is the index into `series_files(...)`, the files in
the order SimpleITK's series reader stacks them, i.e. the z axis of the grid
`ct_io.read_ct` reads as stored (`CTVolume.stored_geometry`; a mask predicted
on the canonical grid goes there with `CTVolume.to_stored`).

highdicom and pydicom are imported inside the functions that use them, so that
a command's `--help` does not pay for them.
"""
from __future__ import annotations

import importlib.metadata
import pathlib
import warnings
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from scoat_jax.common import fileio
from scoat_jax.data import ct_io, dicom_geometry
from scoat_jax.data.palette import LABEL_RGB

DEFAULT_MODEL_DESCRIPTION = "SCOAT-Net lung opacification segmentation"
# (code value, coding scheme, code meaning) of the coded concepts (PS3.16).
CATEGORY = ("49755003", "SCT", "Morphologically Abnormal Structure")  # CID 7150
LUNG = ("39607008", "SCT", "Lung")  # the anatomic region of every segment
# Per num_classes, the segments in label order: (label, property type, display RGB).
# Ground glass opacity and Opacity are DICOM's own codes (CID 6104, Abnormal Opacity
# Finding): pydicom's SNOMED CT concepts hold no ground glass opacity, opacity or
# consolidation. Consolidation is SNOMED CT 95436008 "Lung consolidation" (not in pydicom's
# tables). Display colours are `data.palette`'s, as on the key images and mask PNGs.
SEGMENTS = {
    1: (("Lung opacity", ("112001", "DCM", "Opacity"), LABEL_RGB[1]),),
    3: (("Ground-glass opacity", ("112120", "DCM", "Ground glass opacity"), LABEL_RGB[1]),
        ("Consolidation", ("95436008", "SCT", "Lung consolidation"), LABEL_RGB[2])),
}
_LONG_STRING = 64  # DICOM LO: at most 64 characters
_MAX_SERIES_NUMBER = 2**31 - 1  # DICOM IS
_GEOMETRY_TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")


class DicomSegError(ValueError):
  """A DICOM SEG that cannot be written as asked; the one-line message names the fix."""


def package_version() -> str:
  """The installed scoat_jax version ('unknown' when run from an uninstalled tree)."""
  try:
    return importlib.metadata.version("scoat_jax")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def series_files(directory, series_id: str | None = None) -> list[pathlib.Path]:
  """The files of a DICOM series in the order SimpleITK stacks them (slice z of the volume).

  The order `ct_io.read_ct` stacks them in (`dicom_geometry`: along the slice
  normal), so file k is slice k of the grid `ct_io.read_ct(directory)` reads
  as stored.

  Args:
    directory: a folder holding the series.
    series_id: its SeriesInstanceUID; None when the folder holds one series.

  Returns:
    The file paths, slice 0 first.

  Raises:
    DicomSegError: not a folder, no series in it, several series and no
      series_id, or no series series_id.
  """
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise DicomSegError(f"{directory}: not a folder; give the folder of the DICOM series the "
                        "mask was predicted on")
  with ct_io.quiet_itk():
    ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(directory)))
  if not ids:
    raise DicomSegError(f"{directory}: no DICOM series found in this folder; give the folder "
                        "of the DICOM series the mask was predicted on")
  if series_id is None and len(ids) > 1:
    raise DicomSegError(f"{directory}: holds {len(ids)} DICOM series ({_describe(directory, ids)})"
                        "; pass series_id=<SeriesInstanceUID> of the one the mask belongs to")
  if series_id is not None and series_id not in ids:
    raise DicomSegError(f"{directory}: no DICOM series {series_id!r}; the folder holds "
                        f"{_describe(directory, ids)}")
  with ct_io.quiet_itk():
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory), series_id or ids[0])
  return dicom_geometry.slice_order(names)


def _describe(directory: pathlib.Path, ids: Sequence[str]) -> str:
  """'UID (N files), ...' for an error message."""
  return ", ".join(f"{uid} ({ct_io.series_tags(directory, uid)[1]} files)" for uid in ids)


def _code(concept: tuple[str, str, str]):
  from highdicom.sr import CodedConcept
  return CodedConcept(*concept)


def _check_options(path: pathlib.Path, num_classes, series_number, texts: dict) -> None:
  if num_classes not in SEGMENTS:
    raise DicomSegError(f"{path}: num_classes={num_classes!r} is not one of {sorted(SEGMENTS)}; "
                        "pass the model's number of classes (1 opacity, 3 GGO/consolidation)")
  if series_number is not None and (isinstance(series_number, bool) or not isinstance(
      series_number, (int, np.integer)) or not 1 <= series_number <= _MAX_SERIES_NUMBER):
    raise DicomSegError(f"{path}: series_number={series_number!r} is not an integer in "
                        f"1..{_MAX_SERIES_NUMBER}; pass a positive SeriesNumber or None")
  for name, text in texts.items():
    if not isinstance(text, str) or not text.strip() or len(text) > _LONG_STRING or \
        "\\" in text or not text.isprintable():
      raise DicomSegError(f"{path}: {name}={text!r} is not a DICOM LO value; give printable "
                          f"text of 1-{_LONG_STRING} characters without a backslash")


def _check_labels(path: pathlib.Path, labels, num_classes: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.dtype != bool and not np.issubdtype(labels.dtype, np.integer):
    raise DicomSegError(f"{path}: labels of dtype {labels.dtype} are not integer labels; pass "
                        "the predicted label mask (uint8), not probabilities")
  if labels.ndim != 3:
    raise DicomSegError(f"{path}: labels of shape {labels.shape} are not a (z, y, x) volume; "
                        "pass the mask on the series' stored grid (CTVolume.to_stored)")
  top = len(SEGMENTS[num_classes])  # the highest label: 1 (opacity) or 2 (consolidation)
  if labels.size and (int(labels.min()) < 0 or int(labels.max()) > top):
    bad = [v for v in np.unique(labels).tolist() if not 0 <= v <= top]
    raise DicomSegError(f"{path}: labels hold {bad[:8]} outside 0..{top} "
                        f"(num_classes={num_classes}); pass the mask of a {num_classes}-class "
                        "model or the matching num_classes")
  return labels


def _read_sources(path: pathlib.Path, source_files, shape: tuple[int, ...]) -> list:
  """The source headers (no pixels), checked to be one series of single-frame slices."""
  import pydicom
  from pydicom.errors import InvalidDicomError
  files = [pathlib.Path(f) for f in source_files]
  if not files:
    raise DicomSegError(f"{path}: no source files given; pass series_files(<series folder>)")
  if len(files) != shape[0]:
    raise DicomSegError(f"{path}: labels have {shape[0]} slices but {len(files)} source files "
                        "were given; pass labels on the stored grid of that series "
                        "(CTVolume.to_stored) with series_files(<its folder>)")
  headers = []
  for f in files:
    try:
      headers.append(pydicom.dcmread(f, stop_before_pixels=True))
    except (InvalidDicomError, OSError, ValueError, EOFError) as e:
      reason = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise DicomSegError(f"{f}: not a readable DICOM file ({reason}); pass the files of the "
                          "source series, e.g. series_files(<series folder>)") from None
  first = headers[0]
  for f, ds in zip(files, headers):
    missing = [t for t in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "Rows",
                           "Columns") + _GEOMETRY_TAGS if t not in ds]
    if missing:
      raise DicomSegError(f"{f}: lacks {', '.join(missing)}; a SEG needs CT slices with their "
                          "position and orientation: pass the original series' files")
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
      raise DicomSegError(f"{f}: is a multi-frame image ({ds.NumberOfFrames} frames); pass a "
                          "series of single-slice files")
    if ds.SeriesInstanceUID != first.SeriesInstanceUID:
      raise DicomSegError(f"{path}: the source files are not one series ({files[0].name} is in "
                          f"{first.SeriesInstanceUID}, {f.name} in {ds.SeriesInstanceUID}); pass "
                          "series_files(<folder>, series_id) of the series the mask belongs to")
    if (ds.Rows, ds.Columns) != tuple(shape[1:]):
      raise DicomSegError(f"{f}: has {ds.Rows} rows x {ds.Columns} columns but the labels' "
                          f"slices are {shape[1]} x {shape[2]}; pass labels on the series' stored "
                          "grid (CTVolume.to_stored), not resampled or reoriented")
  uids = [ds.SOPInstanceUID for ds in headers]
  if len(set(uids)) != len(uids):
    twice = next(u for u in uids if uids.count(u) > 1)
    raise DicomSegError(f"{path}: the source files are not one series of distinct slices "
                        f"(SOPInstanceUID {twice} occurs {uids.count(twice)} times); pass each "
                        "slice's file once")
  return headers


def _segment_descriptions(num_classes: int, algorithm_name: str, algorithm_version: str) -> list:
  import highdicom as hd
  from pydicom.sr.codedict import codes
  algorithm = hd.AlgorithmIdentificationSequence(
      name=algorithm_name, family=codes.DCM.ArtificialIntelligence, version=algorithm_version)
  return [
      hd.seg.SegmentDescription(
          segment_number=number, segment_label=label,
          segmented_property_category=_code(CATEGORY), segmented_property_type=_code(concept),
          algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
          algorithm_identification=algorithm, anatomic_regions=[_code(LUNG)],
          display_color=hd.color.CIELabColor.from_rgb(*rgb))
      for number, (label, concept, rgb) in enumerate(SEGMENTS[num_classes], start=1)
  ]


def write_dicom_seg(labels: np.ndarray,
                    source_files: Sequence[str | pathlib.Path],
                    path: str | pathlib.Path,
                    *,
                    num_classes: int,
                    algorithm_name: str = "scoat_jax",
                    algorithm_version: str | None = None,
                    model_description: str = DEFAULT_MODEL_DESCRIPTION,
                    series_description: str = "scoat_jax lung opacification",
                    series_number: int | None = None,
                    manufacturer: str = "scoat_jax") -> pathlib.Path:
  """Writes a label mask as a DICOM Segmentation of its source series, atomically.

  Segments (BINARY, SegmentAlgorithmType AUTOMATIC, anatomic region SCT
  39607008 "Lung", category SCT 49755003 "Morphologically Abnormal Structure"):
  num_classes 1: segment 1 "Lung opacity" (label > 0), type DCM 112001
  "Opacity"; num_classes 3: segment 1 "Ground-glass opacity" (label 1), type
  DCM 112120 "Ground glass opacity", and segment 2 "Consolidation" (label 2),
  type SCT 95436008 "Lung consolidation". Only frames holding a segment's
  voxels are stored; a mask without any is stored as one empty frame per
  segment on slice 0, so a scan without opacity still gives a valid SEG. The
  SEG references the whole source series and copies its patient and study;
  it gets new Series and SOP Instance UIDs.

  Args:
    labels: (z, y, x) integer labels on the series' stored grid, 0 background;
      slice z belongs to source_files[z].
    source_files: the series' files in slice order (`series_files`).
    path: the SEG file to write (e.g. '<name>_seg.dcm'); replaced atomically.
    num_classes: the model's classes, 1 (opacity) or 3 (background, GGO, consolidation).
    algorithm_name: SegmentAlgorithmName and ManufacturerModelName.
    algorithm_version: the algorithm's version; None: the installed scoat_jax version.
    model_description: ContentDescription (which model made the mask).
    series_description: SeriesDescription of the new series.
    series_number: SeriesNumber; None: the source's SeriesNumber + 1000.
    manufacturer: Manufacturer of the SEG.

  Returns:
    `path`.

  Raises:
    DicomSegError: bad options, labels that do not fit the files (slice count,
      rows, columns) or hold values outside 0..1 (1 class) or 0..2 (3 classes),
      source files that are unreadable or not one series of single-frame
      slices, or a missing output folder. Nothing is written then.
    fileio.WriteError: the file could not be written (disk full, permissions).
  """
  path = pathlib.Path(path)
  algorithm_version = package_version() if algorithm_version is None else algorithm_version
  _check_options(path, num_classes, series_number, {
      "algorithm_name": algorithm_name, "algorithm_version": algorithm_version,
      "model_description": model_description, "series_description": series_description,
      "manufacturer": manufacturer})
  labels = _check_labels(path, labels, num_classes)
  headers = _read_sources(path, source_files, labels.shape)
  if path.is_dir() or not path.parent.is_dir():
    raise DicomSegError(f"{path}: " + ("is a folder; name the SEG file, e.g. scan_seg.dcm"
                                       if path.is_dir() else
                                       f"the folder {path.parent} does not exist; create it first"))
  if series_number is None:
    source_number = headers[0].get("SeriesNumber")
    series_number = (int(source_number) if source_number not in (None, "") else 0) + 1000
    series_number = min(max(series_number, 1), _MAX_SERIES_NUMBER)

  import highdicom as hd
  # Segment numbers: 3 classes: label k is segment k; 1 class: any label > 0 is segment 1.
  segment_map = (labels > 0).astype(np.uint8) if num_classes == 1 else labels.astype(np.uint8)
  plane_positions = None
  if not segment_map.any():
    # highdicom would store every slice of every segment; one empty frame each says the same.
    segment_map = segment_map[:1]
    plane_positions = [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT,
                                                headers[0].ImagePositionPatient)]
  try:
    with warnings.catch_warnings():
      # The source's PatientName is copied as it is; highdicom's doubt about it is noise here.
      warnings.filterwarnings("ignore", message=".*intended person name.*")
      seg = hd.seg.Segmentation(
          source_images=headers, pixel_array=segment_map,
          segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
          segment_descriptions=_segment_descriptions(num_classes, algorithm_name,
                                                     algorithm_version),
          series_instance_uid=hd.UID(), series_number=int(series_number),
          sop_instance_uid=hd.UID(), instance_number=1, manufacturer=manufacturer,
          manufacturer_model_name=algorithm_name, software_versions=algorithm_version,
          device_serial_number="0", content_description=model_description,
          content_label="OPACITY", series_description=series_description,
          content_qualification=hd.ContentQualificationValues.RESEARCH,
          plane_positions=plane_positions, omit_empty_frames=plane_positions is None)
  except (ValueError, TypeError, AttributeError) as e:
    reason = " ".join(str(e).split())[:200] or type(e).__name__
    raise DicomSegError(f"{path}: the source series cannot carry a SEG ({reason}); pass the "
                        "original CT series' files") from None
  # The spacing along the slice normal, as read_ct measures it. highdicom takes the source's
  # SpacingBetweenSlices or computes it from the frames' positions: 1.0 mm for the one frame
  # of an empty SEG of a series without the tag, none for a tilted series.
  spacing = dicom_geometry.slice_spacing(headers)
  shared = seg.SharedFunctionalGroupsSequence[0]
  if spacing is not None and "PixelMeasuresSequence" in shared:
    from pydicom.valuerep import format_number_as_ds
    shared.PixelMeasuresSequence[0].SpacingBetweenSlices = format_number_as_ds(float(spacing))
  return fileio.atomic_write(path, lambda tmp: seg.save_as(tmp, enforce_file_format=True))
