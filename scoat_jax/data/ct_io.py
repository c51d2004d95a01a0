"""Reading and writing CT volumes and masks with their geometry (SimpleITK).

Arrays are NumPy in (z, y, x) order, the order `sitk.GetArrayFromImage` gives;
geometry is kept in ITK's (x, y, z) order and in physical millimetres (LPS),
exactly as the file stores it: size, spacing, origin and the 3x3 direction
cosines (row-major, 9 floats). Every bad input raises `CTError`, a ValueError
whose one-line message names the path and says how to fix it.

Formats: NIfTI (.nii, .nii.gz), MetaImage (.mha, .mhd), NRRD (.nrrd), and a
directory holding a DICOM series (SimpleITK applies RescaleSlope/Intercept, so
the voxels come back in Hounsfield units). What ITK would read wrongly without a
word is checked around it: a series' grid slice by slice (`dicom_geometry`),
NIfTI headers (`nifti_header`) and whether the values are HU (`hu_values`);
what makes a readable grid doubtful (a gantry tilt, derived slice positions) is
logged and kept as `CTVolume.warnings`. Writers choose the format from the
suffix (.nii.gz, .nii, .mha, .nrrd; `dicom_writer` writes a DICOM series) and
write to a temporary name beside the target before renaming it, so a crash
never leaves half a file under the final name.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import sys
from collections.abc import Iterable, Sequence

import numpy as np
import SimpleITK as sitk

from scoat_jax.common import fileio
from scoat_jax.data import dicom_geometry, nifti_header, orientation
from scoat_jax.data.geometry import CTError, Geometry  # noqa: F401 (ct_io.Geometry, ct_io.CTError)
from scoat_jax.data.hu_values import check_hu  # noqa: F401 (ct_io.check_hu)
from scoat_jax.data.nifti_header import check_complete as check_nifti_complete  # noqa: F401

WRITE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")
READ_SUFFIXES = WRITE_SUFFIXES + (".mhd",)
# Voxel sizes accepted. CT itself has 0.2-1 mm in-plane and 0.5-10 mm slices; the
# bounds leave room for down-sampled research volumes and refuse what is surely a
# unit error (metres, micrometres) or a broken header.
SPACING_RANGE_MM = (0.05, 50.0)
# The DICOM tags kept as a series' metadata (`CTVolume.metadata`).
DICOM_TAGS = {"patient_id": "0010|0020", "study_date": "0008|0020",
              "series_description": "0008|103e", "series_uid": "0020|000e",
              "study_uid": "0020|000d", "accession_number": "0008|0050"}


@dataclasses.dataclass
class CTVolume:
  """A CT volume in Hounsfield units with its geometry, in the canonical orientation.

  Attributes:
    hu: (z, y, x) int16 (integer data that fits) or float32 array in HU; z is
      the axial slice (`orientation`: whatever order the file stored).
    geometry: the voxel grid of `hu`.
    metadata: DICOM tags of interest when read from a series (patient_id,
      study_date, series_description, series_uid, study_uid, accession_number);
      empty otherwise.
    reorientation: how the file's own grid maps to `geometry`; None when the
      volume was built in memory on the canonical grid.
  """
  hu: np.ndarray
  geometry: Geometry
  metadata: dict = dataclasses.field(default_factory=dict)
  reorientation: orientation.Reorientation | None = None

  @property
  def warnings(self) -> tuple[str, ...]:
    """What makes the grid doubtful (gantry tilt, derived slice positions, NIfTI transforms)."""
    return () if self.reorientation is None else self.reorientation.warnings

  @property
  def stored_geometry(self) -> Geometry:
    """The grid as the file stores it (outputs are written on it)."""
    return self.geometry if self.reorientation is None else self.reorientation.stored

  def to_stored(self, array: np.ndarray) -> np.ndarray:
    """A (z, y, x) array on `geometry` mapped voxel for voxel onto `stored_geometry`."""
    return array if self.reorientation is None else self.reorientation.to_stored(array)


@contextlib.contextmanager
def quiet_itk():
  """Silences what ITK and its C++ libraries (MetaIO, GDCM) print; errors still raise.

  ITK's warnings ('No Series were found', non-uniform spacing) are turned off,
  and the process's stderr is pointed at /dev/null for the duration (the C++
  libraries write there directly). Where stderr has no file descriptor (a
  test runner captured it), only the warnings are turned off.
  """
  was = sitk.ProcessObject.GetGlobalWarningDisplay()
  sitk.ProcessObject.SetGlobalWarningDisplay(False)
  saved = None
  try:
    fd = sys.stderr.fileno()
  except (AttributeError, ValueError, OSError):
    fd = None
  try:
    if fd is not None:
      sys.stderr.flush()
      saved = os.dup(fd)
      with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), fd)
    yield
  finally:
    if saved is not None:
      os.dup2(saved, fd)
      os.close(saved)
    sitk.ProcessObject.SetGlobalWarningDisplay(was)


def check_spacing(geometry: Geometry, path) -> None:
  """Raises CTError unless every voxel size lies in SPACING_RANGE_MM."""
  lo, hi = SPACING_RANGE_MM
  for axis, value in zip("xyz", geometry.spacing):
    if not lo <= value <= hi:
      raise CTError(f"{path}: voxel size {value:g} mm along {axis} is outside {lo:g}-{hi:g} mm, "
                    "not a CT grid (a header in m or um, or a broken export); fix the spacing.")


def first_line(err: Exception) -> str:
  lines = [l.strip() for l in str(err).splitlines() if l.strip()]
  msg = next((l for l in lines if "ERROR" in l), lines[-1] if lines else type(err).__name__)
  return msg.replace("sitk::ERROR:", "").strip()[:200]


def _suffix(path: pathlib.Path, allowed: Sequence[str]) -> str | None:
  name = path.name.lower()
  return next((s for s in allowed if name.endswith(s)), None)


def series_tags(directory, series_id: str | None = None) -> tuple[dict[str, str], int]:
  """(`DICOM_TAGS` from the first file's header, number of files) of a series in `directory`
  (the first one when `series_id` is None); ({}, 0) for a folder without one. No pixels are read.
  """
  with quiet_itk():
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory), series_id or "")
    if not files:
      return {}, 0
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    reader.ReadImageInformation()
  return ({k: reader.GetMetaData(t).strip() for k, t in DICOM_TAGS.items()
           if reader.HasMetaDataKey(t)}, len(files))


def _list_series(path: pathlib.Path, ids) -> str:
  """'UID "description" (N slices), ...' for an error message."""
  return ", ".join(f"{uid} \"{tags.get('series_description', '')}\" ({n} slices)"
                   for uid in ids for tags, n in [series_tags(path, uid)])


def _read_dicom_dir(path: pathlib.Path, series_id: str | None) -> tuple[sitk.Image, dict, list]:
  with quiet_itk():
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
  if not ids:
    raise CTError(
        f"{path}: no DICOM series found in this directory; point at a folder of one CT series "
        "(.dcm files) or at a .nii.gz/.mha/.nrrd file")
  if series_id is None:
    if len(ids) > 1:
      raise CTError(f"{path}: holds {len(ids)} DICOM series ({_list_series(path, ids)}); choose "
                    "one with --series_id=<UID> (series_id= in Python) or move each series "
                    "into its own folder")
    series_id = ids[0]
  elif series_id not in ids:
    raise CTError(f"{path}: no DICOM series {series_id!r}; the folder holds "
                  f"{_list_series(path, ids)}")
  with quiet_itk():
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series_id)
  # Every file and slice checked, in slice order, with the grid along the slice normal.
  series = dicom_geometry.read_series(path, files, series_id)
  reader = sitk.ImageSeriesReader()
  reader.SetFileNames([str(f) for f in series.files])
  reader.MetaDataDictionaryArrayUpdateOn()
  try:
    with quiet_itk():  # ITK's own non-uniform-spacing warning: dicom_geometry checked the grid
      image = reader.Execute()
  except RuntimeError as e:
    raise CTError(f"{path}: cannot read DICOM series {series_id} ({first_line(e)}); "
                  "check the files are complete CT images") from None
  if tuple(image.GetSize()) != series.geometry.size:
    raise CTError(f"{path}: the DICOM reader stacked a grid of size {image.GetSize()}, the "
                  f"headers say {series.geometry.size}; export the series again")
  series.geometry.apply_to(image)   # ITK's own spacing is the distance between positions
  meta = {k: reader.GetMetaData(0, t).strip() for k, t in DICOM_TAGS.items()
          if reader.HasMetaDataKey(0, t)}
  return image, meta, list(series.warnings)


def _read_image(path, series_id: str | None = None) -> tuple[pathlib.Path, sitk.Image, dict, list]:
  """Reads any supported file or DICOM directory, checking that it is readable and its grid
  known; (path, image, DICOM tags, warnings about the grid)."""
  path = pathlib.Path(path)
  if not path.exists():
    raise CTError(f"{path}: no such file or directory; check the path (a .nii.gz/.mha/.nrrd file "
                  "or a DICOM series folder)")
  if path.is_dir():
    return (path, *_read_dicom_dir(path, series_id))
  check_nifti_complete(path)
  try:
    with quiet_itk():
      image = sitk.ReadImage(str(path))
  except RuntimeError as e:
    raise CTError(f"{path}: unreadable or corrupt image ({first_line(e)}); re-export it as "
                  f"{'/'.join(READ_SUFFIXES)} or a DICOM series folder") from None
  return path, image, {}, nifti_header.check_transforms(path, image)


def _check_3d(path: pathlib.Path, image: sitk.Image, what: str) -> None:
  if image.GetNumberOfComponentsPerPixel() != 1:
    raise CTError(
        f"{path}: has {image.GetNumberOfComponentsPerPixel()} channels per voxel (colour?); "
        f"a {what} must be one grey value per voxel in a 3-D volume")
  dim = image.GetDimension()
  if dim != 3:
    hint = " (a single 2-D slice/photo)" if dim == 2 else " (a time series?)" if dim == 4 else ""
    raise CTError(
        f"{path}: is {dim}-D{hint}, size {image.GetSize()}; a {what} must be a 3-D volume "
        "(x, y, z): give the whole scan (NIfTI/MHA/NRRD or a DICOM series folder)")
  if min(image.GetSize()) < 2:
    raise CTError(
        f"{path}: has size {image.GetSize()}, a single slice; a {what} must be a 3-D volume "
        "with at least 2 voxels along each axis")


def _to_hu_array(image: sitk.Image) -> np.ndarray:
  arr = sitk.GetArrayFromImage(image)
  if np.issubdtype(arr.dtype, np.integer):
    if arr.size and arr.min() >= -32768 and arr.max() <= 32767:
      return arr.astype(np.int16, copy=False)
  return arr.astype(np.float32, copy=False)


def read_ct(path, *, series_id: str | None = None, check_values: bool = True) -> CTVolume:
  """Reads a CT volume in HU with its geometry.

  `path` is a .nii/.nii.gz/.mha/.mhd/.nrrd file or a DICOM series folder
  (`series_id` picks one of several); `check_values` checks HU (`check_hu`).
  Returns a CTVolume with hu (z, y, x) int16 (float32 for non-integer data) in
  the canonical orientation (`orientation`), and how the file's grid maps to it.
  Raises CTError: missing path, unreadable file, not a 3-D grey volume, spacing
  outside SPACING_RANGE_MM, a grid too oblique to read as axial, values not HU.
  """
  path, image, meta, warnings = _read_image(path, series_id)
  return from_image(image, path, metadata=meta, check_values=check_values, warnings=warnings)


def from_image(image: sitk.Image, source, *, metadata: dict | None = None,
               check_values: bool = True, warnings: Sequence[str] = ()) -> CTVolume:
  """A SimpleITK image as a checked CTVolume (as `read_ct`; `source` names it in errors).

  `warnings` (what makes the grid doubtful, from reading the file) are logged and kept
  with the volume (`CTVolume.warnings`, the report's `orientation`).
  """
  _check_3d(source, image, "CT scan")
  stored = Geometry.from_image(image)
  check_spacing(stored, source)
  turn = orientation.reorientation(stored, what=str(source), warnings=warnings)
  hu = turn.to_canonical(_to_hu_array(image))
  if check_values:
    check_hu(hu, source)
  if warnings:
    from absl import logging
    for warning in warnings:
      logging.warning("%s: %s", source, warning)
  return CTVolume(hu=hu, geometry=turn.canonical, metadata=dict(metadata or {}),
                  reorientation=turn)


def read_mask(path,
              like: CTVolume | Geometry | None = None,
              *,
              allowed: Iterable[int] = (0, 1, 2),
              tol: float = 1e-4) -> np.ndarray:
  """Reads a label mask and checks it against its image's geometry.

  Args:
    path: a mask file (.nii/.nii.gz/.mha/.mhd/.nrrd) or DICOM series directory.
    like: the image (a CTVolume: the mask must match its stored grid and is returned
      in its canonical orientation) or a geometry the mask must match as stored.
    allowed: the label values the mask may contain.
    tol: geometry tolerance.

  Returns:
    (z, y, x) uint8 array.

  Raises:
    CTError: missing/unreadable file, not 3-D, geometry mismatch, values not allowed.
  """
  path, image, _, _ = _read_image(path)
  _check_3d(path, image, "mask")
  geometry = Geometry.from_image(image)
  turn = like.reorientation if isinstance(like, CTVolume) else None
  if isinstance(like, CTVolume):
    like = like.stored_geometry
  if like is not None and not geometry.same_as(like, tol):
    raise CTError(
        f"{path}: mask geometry (size {geometry.size}, spacing {geometry.spacing}, origin "
        f"{geometry.origin}, direction {geometry.direction}) differs from its image's (size "
        f"{like.size}, spacing {like.spacing}, origin {like.origin}, direction {like.direction}); "
        "resample the mask onto the image grid or pair it with the right image")
  arr = sitk.GetArrayFromImage(image)
  allowed = sorted({int(v) for v in allowed})
  values = np.unique(arr)
  bad = [v for v in values.tolist() if v not in allowed]
  if bad:
    hint = " (a 0/255 mask: divide by 255)" if 255 in bad else ""
    raise CTError(f"{path}: mask values {bad[:8]} are outside the allowed labels {allowed}{hint}; "
                  "relabel the mask to those values")
  arr = arr.astype(np.uint8)
  return arr if turn is None else turn.to_canonical(arr)


def write_array(arr: np.ndarray, geometry: Geometry, path, *, what: str = "volume",
                compress: bool = True) -> pathlib.Path:
  """Writes a (z, y, x) array in its own dtype with exactly the given geometry, atomically.

  Args:
    arr: the voxels; shape must be `geometry.shape`.
    geometry: the voxel grid.
    path: output file (.nii.gz, .nii, .mha, .nrrd), replaced atomically.
    what: what the array is, for error messages ('CT', 'mask', ...).
    compress: compress .mha/.nrrd (zlib); .nii.gz always is.
  """
  path, arr = pathlib.Path(path), np.asarray(arr)
  if arr.shape != geometry.shape:
    raise CTError(
        f"{path}: {what} array shape {arr.shape} does not match geometry shape (z, y, x) "
        f"{geometry.shape}; pass the array in (z, y, x) order with the geometry it came with")
  if _suffix(path, WRITE_SUFFIXES) is None:
    raise CTError(f"{path}: unknown output format; name the file with one of "
                  f"{', '.join(WRITE_SUFFIXES)} (dicom_writer writes DICOM)")
  if not path.parent.is_dir():
    raise CTError(f"{path}: the directory {path.parent} does not exist; create it first")
  image = geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(arr)))
  try:
    fileio.atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, useCompression=compress))
  except RuntimeError as e:
    raise CTError(
        f"{path}: could not write ({first_line(e)}); check disk space and permissions") from None
  return path


def write_ct(hu: np.ndarray, geometry: Geometry, path, *, compress: bool = True) -> pathlib.Path:
  """Writes a HU volume with exactly the given geometry.

  Integer-valued data within int16 range is stored as int16, anything else as
  float32. The format follows the suffix (.nii.gz, .nii, .mha, .nrrd).

  Args:
    hu: (z, y, x) array in HU.
    geometry: its voxel grid.
    path: output file; replaced atomically if it exists.
    compress: compress .mha/.nrrd (zlib).

  Returns:
    The written path.
  """
  hu = np.asarray(hu)
  if np.issubdtype(hu.dtype, np.integer) and hu.size and hu.min() >= -32768 and hu.max() <= 32767:
    hu = hu.astype(np.int16, copy=False)
  elif not np.issubdtype(hu.dtype, np.integer) and hu.size and np.all(hu == np.round(hu)) \
      and hu.min() >= -32768 and hu.max() <= 32767:
    hu = hu.astype(np.int16)
  else:
    hu = hu.astype(np.float32, copy=False)
  return write_array(hu, geometry, path, what="CT", compress=compress)


def write_mask(mask: np.ndarray,
               geometry: Geometry,
               path,
               *,
               compress: bool = True) -> pathlib.Path:
  """Writes a uint8 label mask (bool masks become 0/1) with exactly the given geometry.

  Args:
    mask: (z, y, x) integer or bool array with values in 0..255.
    geometry: the voxel grid of its image.
    path: output file (.nii.gz, .nii, .mha, .nrrd).
    compress: compress .mha/.nrrd (zlib).

  Returns:
    The written path.
  """
  mask = np.asarray(mask)
  if mask.dtype != bool and not np.issubdtype(mask.dtype, np.integer):
    raise CTError(f"{path}: mask dtype {mask.dtype} is not integer or bool; pass label values, "
                  "not probabilities (threshold first)")
  if mask.size and (mask.min() < 0 or mask.max() > 255):
    raise CTError(f"{path}: mask values must lie in 0..255, got {mask.min()}..{mask.max()}")
  return write_array(mask.astype(np.uint8), geometry, path, what="mask", compress=compress)
