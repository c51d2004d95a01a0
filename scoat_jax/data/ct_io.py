"""Reading and writing CT volumes and masks with their geometry (SimpleITK).

Arrays are NumPy in (z, y, x) order, the order `sitk.GetArrayFromImage` gives;
geometry is kept in ITK's (x, y, z) order and in physical millimetres (LPS),
exactly as the file stores it: size, spacing, origin and the 3x3 direction
cosines (row-major, 9 floats). Every bad input raises `CTError`, a ValueError
whose one-line message names the path and says how to fix it.

Formats: NIfTI (.nii, .nii.gz), MetaImage (.mha, .mhd), NRRD (.nrrd), and a
directory holding a DICOM series (SimpleITK applies RescaleSlope/Intercept, so
the voxels come back in Hounsfield units). Writers choose the format from the
suffix (.nii.gz, .nii, .mha, .nrrd; a DICOM series has its own writer) and
write to a temporary name beside the target before renaming it, so a crash
never leaves half a file under the final name.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import pathlib
import shutil
import uuid
from collections.abc import Iterable, Sequence

import numpy as np
import SimpleITK as sitk

from scoat_jax import fileio

_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
WRITE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")
READ_SUFFIXES = WRITE_SUFFIXES + (".mhd",)
# The DICOM writer stores HU - intercept as int16 (slope 1), the usual CT encoding.
_DICOM_INTERCEPT = -1024
_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# HU that fit int16 both as given and as stored (HU - intercept).
_DICOM_HU_RANGE = (-32768, 32767 + _DICOM_INTERCEPT)


class CTError(ValueError):
  """A bad CT input or output request; the message names the path and the fix."""


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Voxel grid of a volume in physical space (ITK conventions, LPS, mm).

  Attributes:
    size: number of voxels along (x, y, z).
    spacing: voxel size in mm along (x, y, z).
    origin: physical position in mm of the centre of voxel (0, 0, 0).
    direction: 3x3 direction cosines, row-major; column k is the physical
      direction of index axis k.
  """
  size: tuple[int, int, int]
  spacing: tuple[float, float, float]
  origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
  direction: tuple[float, ...] = _IDENTITY

  def __post_init__(self):
    size = tuple(int(v) for v in self.size)
    spacing = tuple(float(v) for v in self.spacing)
    origin = tuple(float(v) for v in self.origin)
    direction = tuple(float(v) for v in np.asarray(self.direction, dtype=np.float64).ravel())
    if len(size) != 3 or min(size) < 1:
      raise CTError(f"Geometry size={self.size!r} must be 3 positive ints (x, y, z)")
    if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
      raise CTError(f"Geometry spacing={self.spacing!r} must be 3 positive mm values (x, y, z)")
    if len(origin) != 3 or not all(np.isfinite(origin)):
      raise CTError(f"Geometry origin={self.origin!r} must be 3 finite mm values (x, y, z)")
    if len(direction) != 9 or abs(np.linalg.det(np.reshape(direction, (3, 3)))) < 1e-6:
      raise CTError(
          f"Geometry direction={self.direction!r} must be 9 floats of an invertible 3x3 matrix")
    object.__setattr__(self, "size", size)
    object.__setattr__(self, "spacing", spacing)
    object.__setattr__(self, "origin", origin)
    object.__setattr__(self, "direction", direction)

  @classmethod
  def from_image(cls, image: sitk.Image) -> Geometry:
    """The geometry of a 3-D SimpleITK image."""
    return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

  @classmethod
  def for_array(cls,
                shape_zyx: Sequence[int],
                spacing: Sequence[float],
                origin: Sequence[float] = (0.0, 0.0, 0.0),
                direction: Sequence[float] = _IDENTITY) -> Geometry:
    """The geometry of a (z, y, x) array with the given (x, y, z) spacing."""
    return cls(tuple(reversed(tuple(shape_zyx))), tuple(spacing), tuple(origin), tuple(direction))

  @property
  def shape(self) -> tuple[int, int, int]:
    """The matching NumPy array shape (z, y, x)."""
    return (self.size[2], self.size[1], self.size[0])

  @property
  def voxel_volume_ml(self) -> float:
    """Volume of one voxel in millilitres (1 ml = 1000 mm^3)."""
    return float(np.prod(self.spacing)) / 1000.0

  @property
  def direction_matrix(self) -> np.ndarray:
    """Direction cosines as a 3x3 float64 matrix."""
    return np.reshape(np.asarray(self.direction, np.float64), (3, 3))

  def same_as(self, other: Geometry, tol: float = 1e-4) -> bool:
    """Whether two grids coincide: equal size, the rest within `tol`.

    Spacing and origin are compared in mm with tolerance tol * max(1, |value|)
    (file formats store them as float32); direction cosines with tolerance tol.
    """
    if self.size != other.size:
      return False

    def close(a, b):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      return bool(np.all(np.abs(a - b) <= tol * np.maximum(1.0, np.maximum(np.abs(a), np.abs(b)))))

    return (close(self.spacing, other.spacing) and close(self.origin, other.origin) and
            bool(np.all(np.abs(np.subtract(self.direction, other.direction)) <= tol)))

  def apply_to(self, image: sitk.Image) -> sitk.Image:
    """Sets spacing, origin and direction on `image` (whose size must match)."""
    if tuple(image.GetSize()) != self.size:
      raise CTError(
          f"array of size (x,y,z)={image.GetSize()} does not match geometry size {self.size}; "
          "pass an array of shape geometry.shape (z, y, x)")
    image.SetSpacing(self.spacing)
    image.SetOrigin(self.origin)
    image.SetDirection(self.direction)
    return image


@dataclasses.dataclass
class CTVolume:
  """A CT volume in Hounsfield units with its geometry.

  Attributes:
    hu: (z, y, x) int16 (integer data that fits) or float32 array in HU.
    geometry: the voxel grid.
    metadata: DICOM tags of interest when read from a series (patient_id,
      study_date, series_description, series_uid); empty otherwise.
  """
  hu: np.ndarray
  geometry: Geometry
  metadata: dict = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def _quiet_itk():
  """Silences ITK's stderr warnings (e.g. 'No Series were found'); errors still raise."""
  was = sitk.ProcessObject.GetGlobalWarningDisplay()
  sitk.ProcessObject.SetGlobalWarningDisplay(False)
  try:
    yield
  finally:
    sitk.ProcessObject.SetGlobalWarningDisplay(was)


def _first_line(err: Exception) -> str:
  lines = [l.strip() for l in str(err).splitlines() if l.strip()]
  msg = next((l for l in lines if "ERROR" in l), lines[-1] if lines else type(err).__name__)
  return msg.replace("sitk::ERROR:", "").strip()[:200]


def _suffix(path: pathlib.Path, allowed: Sequence[str]) -> str | None:
  name = path.name.lower()
  return next((s for s in allowed if name.endswith(s)), None)


def _read_dicom_dir(path: pathlib.Path, series_id: str | None) -> tuple[sitk.Image, dict]:
  with _quiet_itk():
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
  if not ids:
    raise CTError(
        f"{path}: no DICOM series found in this directory; point at a folder of one CT series "
        "(.dcm files) or at a .nii.gz/.mha/.nrrd file")
  if series_id is None:
    if len(ids) > 1:
      raise CTError(
          f"{path}: holds {len(ids)} DICOM series {list(ids)}; pass series_id= one of them "
          "or move each series into its own folder")
    series_id = ids[0]
  elif series_id not in ids:
    raise CTError(f"{path}: no DICOM series {series_id!r}; the folder holds {list(ids)}")
  files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series_id)
  reader = sitk.ImageSeriesReader()
  reader.SetFileNames(files)
  reader.MetaDataDictionaryArrayUpdateOn()
  try:
    with _quiet_itk():  # ITK's own non-uniform-spacing warning is replaced by the check below
      image = reader.Execute()
  except RuntimeError as e:
    raise CTError(f"{path}: cannot read DICOM series {series_id} ({_first_line(e)}); "
                  "check the files are complete CT images") from None
  _check_slice_positions(path, reader, image, len(files))
  tags = {
      "patient_id": "0010|0020",
      "study_date": "0008|0020",
      "series_description": "0008|103e",
      "series_uid": "0020|000e"
  }
  meta = {
      k: reader.GetMetaData(0, t).strip() for k, t in tags.items() if reader.HasMetaDataKey(0, t)
  }
  return image, meta


def _check_slice_positions(path, reader: sitk.ImageSeriesReader, image: sitk.Image, n: int) -> None:
  """Raises CTError for missing or duplicate slices (ITK would silently assume even spacing)."""
  if n < 3 or not all(reader.HasMetaDataKey(i, "0020|0032") for i in range(n)):
    return
  normal = np.reshape(image.GetDirection(), (3, 3))[:, 2]
  pos = [
      np.dot([float(v)
              for v in reader.GetMetaData(i, "0020|0032").split("\\")], normal)
      for i in range(n)
  ]
  steps = np.diff(pos)
  if steps.min() <= 1e-3 or steps.max() - steps.min() > 0.01 * np.median(steps) + 1e-3:
    raise CTError(
        f"{path}: slice positions are not evenly spaced "
        f"(steps {steps.min():.3g}..{steps.max():.3g} mm): "
        "slices are missing or duplicated; give the complete series or resample it first")


def _read_image(path, series_id: str | None = None) -> tuple[pathlib.Path, sitk.Image, dict]:
  """Reads any supported file or DICOM directory, checking only that it is readable."""
  path = pathlib.Path(path)
  if not path.exists():
    raise CTError(f"{path}: no such file or directory; check the path (a .nii.gz/.mha/.nrrd file "
                  "or a DICOM series folder)")
  if path.is_dir():
    return (path, *_read_dicom_dir(path, series_id))
  try:
    return path, sitk.ReadImage(str(path)), {}
  except RuntimeError as e:
    raise CTError(f"{path}: unreadable or corrupt image ({_first_line(e)}); re-export it as "
                  f"{'/'.join(READ_SUFFIXES)} or a DICOM series folder") from None


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


def check_hu(hu: np.ndarray, path) -> None:
  """Raises CTError unless `hu` looks like CT Hounsfield units.

  CT of a body always contains air (about -1000 HU) outside the patient and in
  the lungs; images whose values all lie in 0..255 are almost surely 8-bit
  windowed exports (PNG/JPEG) rather than HU.

  Args:
    hu: the voxel values.
    path: the source named in the message.
  """
  if hu.dtype.kind == "f" and not np.all(np.isfinite(hu)):
    raise CTError(f"{path}: contains NaN or infinite values; CT voxels must be finite HU")
  lo, hi = float(hu.min()), float(hu.max())
  if lo >= 0.0 and hi <= 255.0:
    raise CTError(
        f"{path}: all values lie in 0..255 (min {lo:g}, max {hi:g}), like an 8-bit windowed image; "
        "8-bit exports are not HU: read the original DICOM/NIfTI in Hounsfield units "
        "(or use source='uint8' for 2-D 8-bit slices)")
  if lo > -500.0:
    raise CTError(
        f"{path}: lowest value {lo:g} is above -500, so no air is present and these "
        "cannot be CT HU; "
        "apply RescaleSlope/Intercept or give a chest CT in Hounsfield units")


def read_ct(path, *, series_id: str | None = None, check_values: bool = True) -> CTVolume:
  """Reads a CT volume in HU with its geometry.

  Args:
    path: a .nii/.nii.gz/.mha/.mhd/.nrrd file, or a directory with a DICOM series.
    series_id: which series to read when a DICOM directory holds several.
    check_values: check that the values look like HU (see `check_hu`).

  Returns:
    CTVolume with hu (z, y, x) int16 (or float32 for non-integer data).

  Raises:
    CTError: missing path, unreadable file, not a 3-D grey volume, values not HU.
  """
  path, image, meta = _read_image(path, series_id)
  _check_3d(path, image, "CT scan")
  hu = _to_hu_array(image)
  if check_values:
    check_hu(hu, path)
  return CTVolume(hu=hu, geometry=Geometry.from_image(image), metadata=meta)


def read_mask(path,
              like: Geometry | None = None,
              *,
              allowed: Iterable[int] = (0, 1, 2),
              tol: float = 1e-4) -> np.ndarray:
  """Reads a label mask and checks it against its image's geometry.

  Args:
    path: a mask file (.nii/.nii.gz/.mha/.mhd/.nrrd) or DICOM series directory.
    like: the image's geometry; the mask must match it (see `Geometry.same_as`).
    allowed: the label values the mask may contain.
    tol: geometry tolerance.

  Returns:
    (z, y, x) uint8 array.

  Raises:
    CTError: missing/unreadable file, not 3-D, geometry mismatch, values not allowed.
  """
  path, image, _ = _read_image(path)
  _check_3d(path, image, "mask")
  geometry = Geometry.from_image(image)
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
  return arr.astype(np.uint8)


def _atomic_write(image: sitk.Image, path, compress: bool) -> pathlib.Path:
  path = pathlib.Path(path)
  suffix = _suffix(path, WRITE_SUFFIXES)
  if suffix is None:
    raise CTError(
        f"{path}: unknown output format; name the file with one of {', '.join(WRITE_SUFFIXES)} "
        "(use write_dicom_series for DICOM)")
  if not path.parent.is_dir():
    raise CTError(f"{path}: the directory {path.parent} does not exist; create it first")
  try:
    # .nii.gz is always gzip-compressed by its suffix; for .mha/.nrrd compression is optional.
    fileio.atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, useCompression=compress))
  except RuntimeError as e:
    raise CTError(
        f"{path}: could not write ({_first_line(e)}); check disk space and permissions") from None
  return path


def _image_from(arr: np.ndarray, geometry: Geometry, what: str, path) -> sitk.Image:
  arr = np.asarray(arr)
  if arr.shape != geometry.shape:
    raise CTError(
        f"{path}: {what} array shape {arr.shape} does not match geometry shape (z, y, x) "
        f"{geometry.shape}; pass the array in (z, y, x) order with the geometry it came with")
  return geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(arr)))


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
  return _atomic_write(_image_from(hu, geometry, "CT", path), path, compress)


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
  return _atomic_write(_image_from(mask.astype(np.uint8), geometry, "mask", path), path, compress)


def _uid(*parts) -> str:
  """A deterministic DICOM UID under the UUID-derived root 2.25 (PS3.5 B.2)."""
  return "2.25." + str(uuid.uuid5(uuid.NAMESPACE_OID, "scoat_jax/" + "/".join(map(str, parts))).int)


def _ds(values) -> str:
  # DICOM DS values are at most 16 characters; 10 significant digits fit.
  return "\\".join(f"{float(v):.10g}" for v in values)


def write_dicom_series(hu: np.ndarray,
                       geometry: Geometry,
                       directory,
                       *,
                       patient_id: str,
                       study_date: str,
                       series_description: str = "scoat_jax CT",
                       study_uid: str | None = None,
                       series_uid: str | None = None,
                       overwrite: bool = False) -> pathlib.Path:
  """Writes a CT volume as a DICOM series (one file per slice) that `read_ct` reads back.

  Voxels are rounded to integer HU and stored as int16 with RescaleIntercept
  -1024 and RescaleSlope 1. DICOM readers order slices along the normal of
  ImageOrientationPatient (row x column), so a left-handed direction (e.g. a
  flipped z axis) cannot survive; such a volume is written as its physically
  identical right-handed equivalent (slices reversed, z column negated), and
  reads back as that. Right-handed geometry reads back unchanged.

  Args:
    hu: (z, y, x) array in HU.
    geometry: its voxel grid.
    directory: output folder, created by renaming a finished temporary folder.
    patient_id: PatientID (0010,0020).
    study_date: StudyDate 'YYYYMMDD'.
    series_description: SeriesDescription.
    study_uid, series_uid: explicit UIDs; by default derived deterministically
      from patient_id, study_date and series_description.
    overwrite: replace an existing directory.

  Returns:
    The series directory.
  """
  directory = pathlib.Path(directory)
  try:
    datetime.datetime.strptime(study_date, "%Y%m%d")
  except (TypeError, ValueError):
    raise CTError(
        f"{directory}: study_date={study_date!r} is not a date 'YYYYMMDD'; pass e.g. '20200315'"
    ) from None
  if not patient_id or not isinstance(patient_id, str):
    raise CTError(f"{directory}: patient_id={patient_id!r} must be a non-empty string")
  if directory.exists() and not overwrite:
    raise CTError(f"{directory}: already exists; choose a new folder or pass overwrite=True")
  if not directory.parent.is_dir():
    raise CTError(
        f"{directory}: the parent directory {directory.parent} does not exist; create it first")
  hu = np.asarray(hu)
  if hu.shape != geometry.shape:
    raise CTError(
        f"{directory}: CT array shape {hu.shape} does not match geometry shape (z, y, x) "
        f"{geometry.shape}"
    )
  hu = np.rint(hu.astype(np.float64))
  if not np.all(np.isfinite(hu)):
    raise CTError(
        f"{directory}: the CT array contains NaN or infinite values; DICOM stores integer HU")
  if hu.size and (hu.min() < _DICOM_HU_RANGE[0] or hu.max() > _DICOM_HU_RANGE[1]):
    raise CTError(f"{directory}: HU range {hu.min():g}..{hu.max():g} does not fit int16 storage "
                  f"{_DICOM_HU_RANGE}; clip the volume first")
  # int16 input makes ITK store 16-bit signed pixels (HU - intercept).
  hu = hu.astype(np.int16)
  dmat = geometry.direction_matrix
  if np.linalg.det(dmat) < 0:
    last = np.asarray(geometry.origin) + dmat[:, 2] * geometry.spacing[2] * (geometry.size[2] - 1)
    dmat = dmat.copy()
    dmat[:, 2] *= -1
    geometry = Geometry(geometry.size, geometry.spacing, tuple(last), tuple(dmat.ravel()))
    hu = hu[::-1]
  image = geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(hu)))
  study_uid = study_uid or _uid(patient_id, study_date)
  series_uid = series_uid or _uid(patient_id, study_date, series_description)
  # ImageOrientationPatient: the row (x index) then column (y index) direction cosines.
  iop = _ds([dmat[0, 0], dmat[1, 0], dmat[2, 0], dmat[0, 1], dmat[1, 1], dmat[2, 1]])
  shared = {
      "0008|0016": _CT_IMAGE_STORAGE,
      "0008|0060": "CT",
      "0008|0008": "DERIVED\\SECONDARY\\AXIAL",
      "0008|0020": study_date,
      "0008|0021": study_date,
      "0008|0030": "120000",
      "0008|0031": "120000",
      "0008|103e": series_description[:64],
      "0010|0010": patient_id[:64],
      "0010|0020": patient_id[:64],
      "0020|000d": study_uid,
      "0020|000e": series_uid,
      "0020|0052": _uid(study_uid, "frame"),
      "0020|0010": "1",
      "0020|0011": "1",
      "0020|0037": iop,
      "0018|0050": _ds([geometry.spacing[2]]),
      "0018|0088": _ds([geometry.spacing[2]]),
      "0028|1052": str(_DICOM_INTERCEPT),
      "0028|1053": "1",
      "0028|1054": "HU",
  }
  tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.mkdir(mode=0o777)   # not mkdtemp's private 0700: the series is the user's to share
  try:
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(geometry.size[2]):
      sl = image[:, :, k:k + 1]
      for tag, value in shared.items():
        sl.SetMetaData(tag, value)
      position = image.TransformIndexToPhysicalPoint((0, 0, k))
      sl.SetMetaData("0020|0032", _ds(position))
      sl.SetMetaData("0020|1041", _ds([float(np.dot(position, np.cross(dmat[:, 0], dmat[:, 1])))]))
      sl.SetMetaData("0020|0013", str(k + 1))
      sl.SetMetaData("0008|0018", _uid(series_uid, k + 1))
      writer.SetFileName(str(tmp / f"IM{k + 1:05d}.dcm"))
      writer.Execute(sl)
    if directory.exists():
      trash = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
      os.replace(directory, trash)
      os.replace(tmp, directory)
      shutil.rmtree(trash, ignore_errors=True)
    else:
      os.replace(tmp, directory)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, RuntimeError):
      raise CTError(f"{directory}: could not write the DICOM series ({_first_line(e)}); "
                    "check disk space and permissions") from None
    raise
  return directory
