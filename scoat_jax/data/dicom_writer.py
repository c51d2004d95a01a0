"""Writing a CT volume as a DICOM series (one file per slice), as scanners export it.

The phantom's `--format=dicom` and the tests of DICOM input use it; reading a
series back is `ct_io.read_ct(folder)`.
"""
from __future__ import annotations

import datetime
import os
import pathlib
import shutil
import uuid

import numpy as np
import SimpleITK as sitk

from scoat_jax.data import ct_io

# The DICOM writer stores HU - intercept as int16 (slope 1), the usual CT encoding.
_DICOM_INTERCEPT = -1024
_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# HU that fit int16 both as given and as stored (HU - intercept).
_DICOM_HU_RANGE = (-32768, 32767 + _DICOM_INTERCEPT)


def _uid(*parts) -> str:
  """A deterministic DICOM UID under the UUID-derived root 2.25 (PS3.5 B.2)."""
  return "2.25." + str(uuid.uuid5(uuid.NAMESPACE_OID, "scoat_jax/" + "/".join(map(str, parts))).int)


def _ds(values) -> str:
  # DICOM DS values are at most 16 characters; 10 significant digits fit.
  return "\\".join(f"{float(v):.10g}" for v in values)


def write_dicom_series(hu: np.ndarray,
                       geometry: ct_io.Geometry,
                       directory,
                       *,
                       patient_id: str,
                       study_date: str,
                       series_description: str = "scoat_jax CT",
                       study_uid: str | None = None,
                       series_uid: str | None = None,
                       accession_number: str = "",
                       overwrite: bool = False) -> pathlib.Path:
  """Writes a CT volume as a DICOM series (one file per slice) that `ct_io.read_ct` reads back.

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
    accession_number: AccessionNumber (0008,0050), left empty by default.
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
    raise ct_io.CTError(
        f"{directory}: study_date={study_date!r} is not a date 'YYYYMMDD'; pass e.g. '20200315'"
    ) from None
  if not patient_id or not isinstance(patient_id, str):
    raise ct_io.CTError(f"{directory}: patient_id={patient_id!r} must be a non-empty string")
  if directory.exists() and not overwrite:
    raise ct_io.CTError(f"{directory}: already exists; choose a new folder or pass overwrite=True")
  if not directory.parent.is_dir():
    raise ct_io.CTError(
        f"{directory}: the parent directory {directory.parent} does not exist; create it first")
  hu = np.asarray(hu)
  if hu.shape != geometry.shape:
    raise ct_io.CTError(
        f"{directory}: CT array shape {hu.shape} does not match geometry shape (z, y, x) "
        f"{geometry.shape}"
    )
  hu = np.rint(hu.astype(np.float64))
  if not np.all(np.isfinite(hu)):
    raise ct_io.CTError(
        f"{directory}: the CT array contains NaN or infinite values; DICOM stores integer HU")
  if hu.size and (hu.min() < _DICOM_HU_RANGE[0] or hu.max() > _DICOM_HU_RANGE[1]):
    raise ct_io.CTError(f"{directory}: HU range {hu.min():g}..{hu.max():g} does not fit int16 storage "
                  f"{_DICOM_HU_RANGE}; clip the volume first")
  # int16 input makes ITK store 16-bit signed pixels (HU - intercept).
  hu = hu.astype(np.int16)
  dmat = geometry.direction_matrix
  if np.linalg.det(dmat) < 0:
    last = np.asarray(geometry.origin) + dmat[:, 2] * geometry.spacing[2] * (geometry.size[2] - 1)
    dmat = dmat.copy()
    dmat[:, 2] *= -1
    geometry = ct_io.Geometry(geometry.size, geometry.spacing, tuple(last), tuple(dmat.ravel()))
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
      "0008|0050": accession_number[:16],
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
      raise ct_io.CTError(f"{directory}: could not write the DICOM series ({ct_io.first_line(e)}); "
                    "check disk space and permissions") from None
    raise
  return directory
