"""The grid of a DICOM series, checked slice by slice (`ct_io.read_ct` reads series through it).

ITK's series reader takes a series' grid from its first file (pixel spacing,
orientation, size) and from the distance between the first and the last
ImagePositionPatient, and stacks the other files without looking at them. A
slice without a position (GDCM sorts it last, at (0, 0, 0)), a slice of
another pixel spacing, orientation or size, a gantry tilt (positions that do
not advance along the slice normal: every volume too large by 1/cos(tilt)) and
an unreadable or truncated file (GDCM leaves it out) would each give wrong
numbers without a word. `read_series` reads every file of the folder
(pydicom) and refuses, naming the file:

- a file that looks like DICOM (a .dcm/.ima name or the DICM preamble) but
  cannot be read, or holds fewer pixel bytes than its header promises, or a
  slice of the series that GDCM cannot read;
- a slice whose Rows/Columns, PixelSpacing or ImageOrientationPatient differ
  from the other slices' (the most common value is the reference, so an odd
  first slice is the one named), or that lacks PixelSpacing or
  ImageOrientationPatient;
- a slice without ImagePositionPatient, unless SliceLocation states it and
  agrees with another statement: with the positions of at least two other
  slices, or (no slice with a position) with SpacingBetweenSlices. Derived
  positions are reported as a warning;
- positions that are not evenly spaced along the slice normal (a gap, a
  duplicate) or that do not lie on one line.

The z spacing is the distance between slices along the slice normal. When the
positions also move within the slice plane (gantry tilt) the grid is not
resampled: the slices are read on their own planes, spaced by that distance,
so every voxel has its true volume; positions in mm beyond the first slice are
then shifted in-plane, which the warning states.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import struct
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from scoat_jax.data.geometry import CTError, Geometry

# Tilt above this is reported (below it, the in-plane drift is rounding in the positions).
TILT_WARN_DEGREES = 0.1
# Gantries tilt up to 30 degrees; positions further off the normal are not a tilt.
MAX_TILT_DEGREES = 30.0
_IOP_TOL = 5e-4            # direction cosines, absolute (0.03 degrees)
_SPACING_RTOL = 1e-4       # PixelSpacing, relative
_EVEN_RTOL = 0.01          # slice steps along the normal, relative to the median step
_LINE_TOL_MM = 0.05        # positions off the line through the first and last, plus 1% of a step
_DICOM_SUFFIXES = (".dcm", ".ima", ".dicom")
_FIX = "export the series again from the scanner or PACS"


class DicomGeometryError(CTError):
  """A DICOM series whose grid cannot be known or is not one grid; the message names the file."""


class _Slice(NamedTuple):
  path: pathlib.Path
  size: tuple[int, int] | None             # (Rows, Columns)
  pixel_spacing: tuple[float, float] | None  # (between rows, between columns) mm
  iop: tuple[float, ...] | None
  ipp: tuple[float, float, float] | None
  slice_location: float | None
  spacing_between_slices: float | None


@dataclasses.dataclass(frozen=True)
class SeriesGeometry:
  """A series' files in slice order and their grid.

  Attributes:
    files: the files, slice 0 first (ascending along the slice normal).
    geometry: the grid: x along the rows (ImageOrientationPatient's first
      cosines), y along the columns, z along the slice normal with the
      distance between slices along it; origin: the first slice's position.
    warnings: what makes the grid doubtful (derived positions, gantry tilt).
    tilt_degrees: the angle between the slice normal and the line of positions.
  """
  files: tuple[pathlib.Path, ...]
  geometry: Geometry
  warnings: tuple[str, ...] = ()
  tilt_degrees: float = 0.0


def _floats(value, n: int) -> tuple[float, ...] | None:
  """n finite floats from a DICOM value (DS or multi-valued DS), or None."""
  if value is None or isinstance(value, bytes):
    return None
  items = [value] if isinstance(value, (str, float, int)) else list(value)
  try:
    out = tuple(float(v) for v in items)
  except (TypeError, ValueError):
    return None
  return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _looks_like_dicom(path: pathlib.Path) -> bool:
  if path.name.lower().endswith(_DICOM_SUFFIXES):
    return True
  try:
    with open(path, "rb") as f:
      f.seek(128)
      return f.read(4) == b"DICM"
  except OSError:
    return False


def _dcmread(path: pathlib.Path, *, force: bool, pixels: bool):
  import pydicom
  from pydicom.errors import InvalidDicomError
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")   # pydicom's doubts about odd values are not ours
      return pydicom.dcmread(path, force=force, stop_before_pixels=not pixels)
  except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError, IndexError,
          AttributeError, NotImplementedError, struct.error) as e:
    reason = " ".join(str(e).split())[:120] or type(e).__name__
    raise DicomGeometryError(f"{path}: not a readable DICOM file ({reason}); copy it again, or "
                             "remove it from the series folder") from None


def _missing_pixels(ds) -> str | None:
  """'N of M pixel bytes' when uncompressed pixel data ends early; None otherwise."""
  if "PixelData" not in ds:
    return "no pixel data"
  syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
  if syntax is not None and syntax.is_compressed:
    return None   # encapsulated frames: a truncated one fails to decode (GDCM leaves it out)
  try:
    bits = int(ds.BitsAllocated)
    count = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
             * int(ds.get("NumberOfFrames", 1) or 1))
  except (AttributeError, TypeError, ValueError):
    return None
  expected, got = (count * bits + 7) // 8, len(ds.PixelData or b"")
  return f"{got} of {expected} pixel bytes" if got < expected else None


def _record(path: pathlib.Path, ds) -> _Slice:
  def number(keyword):
    value = ds.get(keyword)
    got = _floats(value, 1) if value not in (None, "") else None
    return got[0] if got else None
  rows, cols = ds.get("Rows"), ds.get("Columns")
  return _Slice(path, (int(rows), int(cols)) if rows and cols else None,
                _floats(ds.get("PixelSpacing"), 2) if "PixelSpacing" in ds else None,
                _floats(ds.get("ImageOrientationPatient"), 6)
                if "ImageOrientationPatient" in ds else None,
                _floats(ds.get("ImagePositionPatient"), 3)
                if "ImagePositionPatient" in ds else None,
                number("SliceLocation"), number("SpacingBetweenSlices"))


def _read_slices(directory: pathlib.Path, files: Sequence, series_uid: str | None) -> list[_Slice]:
  """The series' slices in `files` order, after every DICOM-looking file of the folder was read."""
  listed = [pathlib.Path(f) for f in files]
  names = {p.name for p in listed}
  found: dict[str, _Slice] = {}
  for path in sorted(directory.iterdir()):
    if path.name.startswith(".") or not path.is_file():
      continue
    ours = path.name in names
    if not ours and not _looks_like_dicom(path):
      continue
    header = _dcmread(path, force=ours, pixels=False)
    if not ours and (series_uid is None or str(header.get("SeriesInstanceUID", "")) != series_uid):
      continue   # another series of the folder (or not an image)
    ds = _dcmread(path, force=ours, pixels=True)
    problem = _missing_pixels(ds)
    if problem:
      raise DicomGeometryError(f"{path}: truncated or incomplete DICOM slice ({problem}); copy "
                               "the file again or remove it, and give the complete series")
    if not ours:
      raise DicomGeometryError(f"{path}: a slice of series {series_uid} that the DICOM reader "
                               "(GDCM) cannot read; copy the file again, or remove it, and give "
                               "the complete series")
    found[path.name] = _record(path, ds)
    del ds
  return [found[p.name] for p in listed if p.name in found]


def _odd_one(slices: list[_Slice], key, close, what: str, why: str) -> None:
  """Refuses the first slice whose `key` is not `close` to the most common one's."""
  groups = Counter(_group(key(s)) for s in slices)
  common = groups.most_common(1)[0][0]
  reference = next(key(s) for s in slices if _group(key(s)) == common)
  for s in slices:
    if not close(key(s), reference):
      raise DicomGeometryError(
          f"{s.path}: {what} {_show(key(s))} differs from the other slices' "
          f"{_show(reference)} ({groups[common]} of {len(slices)} slices); {why}: remove the odd "
          f"slice or {_FIX}")


def _group(value) -> tuple:
  return tuple(round(v, 3) if isinstance(v, float) else v for v in value)


def _close(rtol: float, atol: float):
  return lambda a, b: bool(np.all(np.abs(np.subtract(a, b))
                                  <= atol + rtol * np.maximum(np.abs(a), np.abs(b))))


def _show(value) -> str:
  if isinstance(value, tuple):
    return "\\".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
  return str(value)


def _check_slices(slices: list[_Slice]) -> None:
  for s in slices:
    for field, tag, why in (("size", "Rows/Columns", "its pixels cannot be read"),
                            ("pixel_spacing", "PixelSpacing (0028,0030)",
                             "a reader would assume 1 mm pixels and every volume would be wrong"),
                            ("iop", "ImageOrientationPatient (0020,0037)",
                             "the slice's orientation is unknown")):
      if getattr(s, field) is None:
        raise DicomGeometryError(f"{s.path}: lacks {tag} (or it is not a number); {why}: {_FIX}")
    if min(s.pixel_spacing) <= 0:
      raise DicomGeometryError(f"{s.path}: PixelSpacing {_show(s.pixel_spacing)} mm is not "
                               f"positive; {_FIX}")
    row, col = np.asarray(s.iop[:3]), np.asarray(s.iop[3:])
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or \
        abs(float(row @ col)) > 1e-3:
      raise DicomGeometryError(f"{s.path}: ImageOrientationPatient {_show(s.iop)} is not two "
                               f"perpendicular unit vectors; {_FIX}")
  _odd_one(slices, lambda s: s.size, lambda a, b: a == b, "Rows x Columns",
           "a series is one image size (a localizer or another series in the folder?)")
  _odd_one(slices, lambda s: s.pixel_spacing, _close(_SPACING_RTOL, 1e-6), "PixelSpacing (mm)",
           "the volume would be measured on one slice's pixel size")
  _odd_one(slices, lambda s: s.iop, _close(0.0, _IOP_TOL), "ImageOrientationPatient",
           "a slice of another orientation (a localizer or a reformat?) is not part of the stack")


def _derive_positions(directory: pathlib.Path, slices: list[_Slice],
                      normal: np.ndarray) -> tuple[np.ndarray, str]:
  """Positions for slices without ImagePositionPatient, where SliceLocation states them
  and agrees with another tag; (positions, warning)."""
  missing = [s for s in slices if s.ipp is None]
  named = f"{missing[0].path}" + (f" (and {len(missing) - 1} other slice(s))"
                                  if len(missing) > 1 else "")
  fix = "export the series again with ImagePositionPatient on every slice"
  if any(s.slice_location is None for s in slices):
    raise DicomGeometryError(f"{named}: lacks ImagePositionPatient (0020,0032), and no "
                             "SliceLocation states where it lies, so its place in the stack and "
                             f"the slice spacing are unknown (a reader would guess them); {fix}")
  location = np.array([s.slice_location for s in slices])
  known = [i for i, s in enumerate(slices) if s.ipp is not None]
  if len(known) >= 2:
    positions = np.array([slices[i].ipp for i in known])
    along = positions @ normal
    offset = along - location[known]
    inplane = positions - np.outer(along, normal)
    spread = float(np.max(np.linalg.norm(inplane - inplane[0], axis=1)))
    if np.ptp(offset) > 0.01 + 1e-4 * np.ptp(along) or spread > _LINE_TOL_MM:
      raise DicomGeometryError(
          f"{named}: lacks ImagePositionPatient (0020,0032), and SliceLocation does not agree "
          f"with the other slices' positions (it is off by {np.ptp(offset):.3g} mm, or the "
          f"positions move {spread:.3g} mm in-plane), so it cannot stand in; {fix}")
    out = inplane[0] + (location + float(np.mean(offset)))[:, None] * normal
    out[known] = np.array([slices[i].ipp for i in known])
    return out, (f"{len(missing)} slice(s) without ImagePositionPatient "
                 f"({missing[0].path.name}{', ...' if len(missing) > 1 else ''}): positions "
                 "derived from SliceLocation, which agrees with the other slices' positions")
  sbs = {s.spacing_between_slices for s in slices}
  steps = np.diff(np.sort(location))
  if len(sbs) != 1 or None in sbs or len(steps) == 0:
    raise DicomGeometryError(
        f"{named}: lacks ImagePositionPatient (0020,0032); SliceLocation alone cannot be checked "
        "(no single SpacingBetweenSlices to agree with), so the slices' places and spacing are "
        f"unknown; {fix}")
  spacing = sbs.pop()
  if steps.min() <= 0 or abs(float(np.median(steps)) - spacing) > _EVEN_RTOL * spacing:
    raise DicomGeometryError(
        f"{directory}: no slice position (ImagePositionPatient) on {len(missing)} slice(s), and "
        f"SliceLocation (steps {steps.min():.4g}..{steps.max():.4g} mm) does not agree with "
        f"SpacingBetweenSlices {spacing:g} mm; the slice spacing is unknown; {fix}")
  base = np.zeros(3) if not known else (np.asarray(slices[known[0]].ipp)
                                         - location[known[0]] * normal)
  return base + location[:, None] * normal, (
      f"no ImagePositionPatient on {len(missing)} of {len(slices)} slices: positions derived "
      f"from SliceLocation, whose steps agree with SpacingBetweenSlices ({spacing:g} mm)"
      + ("" if known else "; the position within the slice plane is unknown, so positions "
         "in mm (lesion centres) are relative to an arbitrary origin"))


def _check_spacing(directory: pathlib.Path, files: list[pathlib.Path], along: np.ndarray) -> None:
  steps = np.diff(along)
  if steps.min() <= 1e-3:
    k = int(np.argmin(steps))
    raise DicomGeometryError(
        f"{directory}: {files[k].name} and {files[k + 1].name} lie at one position "
        f"({along[k]:.4g} mm along the slice normal): slices are missing or duplicated (two "
        "series or a copy in one folder?); remove the duplicate or give the complete series")
  median = float(np.median(steps))
  if steps.max() - steps.min() > _EVEN_RTOL * median + 1e-3:
    k = int(np.argmax(np.abs(steps - median)))
    raise DicomGeometryError(
        f"{directory}: slice positions are not evenly spaced (steps {steps.min():.3g}.."
        f"{steps.max():.3g} mm; {steps[k]:.3g} mm between {files[k].name} and "
        f"{files[k + 1].name}): slices are missing or duplicated; give the complete series or "
        "resample it first")


def read_series(directory, files: Sequence, series_uid: str | None) -> SeriesGeometry:
  """The checked grid of one series (see the module docstring).

  Args:
    directory: the folder holding the series.
    files: the series' files as GDCM lists them (`GetGDCMSeriesFileNames`).
    series_uid: its SeriesInstanceUID (other series of the folder are left alone).

  Raises:
    DicomGeometryError: an unreadable or truncated file, slices that are not one
      grid, positions missing or uneven (each names the file and the fix).
  """
  directory = pathlib.Path(directory)
  slices = _read_slices(directory, files, series_uid)
  if not slices:
    raise DicomGeometryError(f"{directory}: none of the series' files could be read; {_FIX}")
  _check_slices(slices)
  first = slices[0]
  row, col = np.asarray(first.iop[:3]), np.asarray(first.iop[3:])
  row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
  normal = np.cross(row, col)
  normal /= np.linalg.norm(normal)
  notes = []
  if all(s.ipp is not None for s in slices):
    positions = np.array([s.ipp for s in slices], np.float64)
  else:
    positions, note = _derive_positions(directory, slices, normal)
    notes.append(note)
  along = positions @ normal
  order = np.argsort(along, kind="stable")
  files_sorted = [slices[i].path for i in order]
  positions, along = positions[order], along[order]
  n = len(slices)
  tilt, dz = 0.0, first.spacing_between_slices or 1.0
  if n >= 2:
    _check_spacing(directory, files_sorted, along)
    step = (positions[-1] - positions[0]) / (n - 1)
    dz = float(step @ normal)
    line = positions[0] + np.arange(n)[:, None] * step
    off = np.linalg.norm(positions - line, axis=1)
    if off.max() > _LINE_TOL_MM + 0.01 * np.linalg.norm(step):
      k = int(np.argmax(off))
      raise DicomGeometryError(
          f"{files_sorted[k]}: its ImagePositionPatient lies {off[k]:.3g} mm off the line of "
          "the other slices' positions, so the slices are not one stack; remove the odd slice "
          f"or {_FIX}")
    drift = float(np.linalg.norm(step - dz * normal))
    tilt = math.degrees(math.atan2(drift, dz))
    if tilt > MAX_TILT_DEGREES:
      raise DicomGeometryError(
          f"{directory}: the slice positions run {tilt:.1f} degrees off the slice normal, more "
          f"than any gantry tilt ({MAX_TILT_DEGREES:g}); the stack is not one volume: {_FIX}")
    if tilt > TILT_WARN_DEGREES:
      notes.append(
          f"gantry tilt {tilt:.1f} degrees: the slices lie {float(np.linalg.norm(step)):.4g} mm "
          f"apart along their positions and {dz:.4g} mm along the slice normal; the z spacing "
          "is the distance along the normal (voxel volumes exact, not resampled) and positions "
          f"in mm drift in-plane by up to {drift * (n - 1):.1f} mm over the scan (the NIfTI "
          "mask's grid too; the DICOM SEG places each frame on its own slice)")
  rows, cols = first.size
  geometry = Geometry((cols, rows, n), (first.pixel_spacing[1], first.pixel_spacing[0], dz),
                      tuple(positions[0]), tuple(np.stack([row, col, normal], axis=1).ravel()))
  return SeriesGeometry(tuple(files_sorted), geometry, tuple(notes), tilt)


def slice_order(files: Sequence) -> list[pathlib.Path]:
  """`files` (one series) in the order `read_series` stacks them, from their headers alone.

  Files without a position keep GDCM's order (a DICOM SEG needs positions and refuses them).
  """
  paths = [pathlib.Path(f) for f in files]
  heads = [_record(p, _dcmread(p, force=True, pixels=False)) for p in paths]
  if not heads or any(h.ipp is None or h.iop is None for h in heads):
    return paths
  normal = np.cross(heads[0].iop[:3], heads[0].iop[3:])
  along = [float(np.dot(h.ipp, normal)) for h in heads]
  return [paths[i] for i in np.argsort(along, kind="stable")]


def slice_spacing(headers: Sequence) -> float | None:
  """The distance between slices along the normal of pydicom headers with positions (None for one)."""
  if len(headers) < 2:
    value = headers[0].get("SpacingBetweenSlices") if headers else None
    return float(value) if value not in (None, "") else None
  iop = np.asarray([float(v) for v in headers[0].ImageOrientationPatient])
  normal = np.cross(iop[:3], iop[3:])
  along = sorted(float(np.dot([float(v) for v in h.ImagePositionPatient], normal))
                 for h in headers)
  return (along[-1] - along[0]) / (len(along) - 1)
