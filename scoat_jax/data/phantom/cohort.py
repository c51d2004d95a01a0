"""Writing phantom scans and a cohort (with `cohort.csv`) in any CT format ct_io writes."""
from __future__ import annotations

import csv
import io
import pathlib

from scoat_jax.common import fileio
from scoat_jax.data import ct_io, dicom_writer
from scoat_jax.data.phantom.anatomy import (FORMATS, PhantomError, PhantomScan, generate_cohort,
                                            patient_id)


def scan_name(scan: PhantomScan) -> str:
  """File stem of a scan: '<patient_id>_t<timepoint>'."""
  return f"{scan.patient_id}_t{scan.timepoint}"


def planned_paths(scan: PhantomScan, directory, fmt: str = "nifti") -> dict[str, pathlib.Path]:
  """Where `write_scan` puts the image, label and lung mask of a scan."""
  return _paths(directory, scan_name(scan), fmt)


def _paths(directory, stem: str, fmt: str) -> dict[str, pathlib.Path]:
  if fmt not in FORMATS:
    raise PhantomError(f"format {fmt!r} is unknown; use one of {sorted(FORMATS)}")
  directory = pathlib.Path(directory)
  mask_suffix = FORMATS[fmt] or ".nii.gz"  # DICOM has no label format here: masks as NIfTI
  return {
      "image": directory / (f"{stem}_ct" + FORMATS[fmt]),
      "label": directory / f"{stem}_label{mask_suffix}",
      "lung": directory / f"{stem}_lung{mask_suffix}"
  }


def write_scan(scan: PhantomScan,
               directory,
               *,
               fmt: str = "nifti",
               overwrite: bool = False) -> dict[str, pathlib.Path]:
  """Writes a scan's image, label mask and lung mask via ct_io.

  Args:
    scan: the scan.
    directory: existing output folder.
    fmt: 'nifti' (.nii.gz), 'mha', 'nrrd', or 'dicom' (a series folder for the
      image, NIfTI masks).
    overwrite: replace existing files; otherwise existing outputs are an error.

  Returns:
    {'image': path, 'label': path, 'lung': path}.
  """
  paths = planned_paths(scan, directory, fmt)
  if not pathlib.Path(directory).is_dir():
    raise PhantomError(f"{directory}: output directory does not exist; create it first")
  existing = [str(p) for p in paths.values() if p.exists()]
  if existing and not overwrite:
    raise PhantomError(
        f"{existing[0]}: already exists; choose another output folder or pass overwrite=True")
  if fmt == "dicom":
    dicom_writer.write_dicom_series(scan.hu, scan.geometry, paths["image"],
                                    patient_id=scan.patient_id, study_date=scan.study_date,
                                    series_description=f"phantom t{scan.timepoint}",
                                    overwrite=overwrite)
  else:
    ct_io.write_ct(scan.hu, scan.geometry, paths["image"])
  ct_io.write_mask(scan.label, scan.geometry, paths["label"])
  ct_io.write_mask(scan.lung, scan.geometry, paths["lung"])
  return paths


COHORT_COLUMNS = ("path", "label_path", "lung_path", "patient_id", "timepoint", "date",
                  "lesion_volume_ml", "lung_volume_ml")


def write_cohort(directory,
                 *,
                 seed: int = 0,
                 num_patients: int = 2,
                 num_timepoints: int = 3,
                 fmt: str = "nifti",
                 overwrite: bool = False,
                 **kwargs) -> pathlib.Path:
  """Writes a cohort of scans plus `cohort.csv` (paths relative to `directory`).

  Args:
    directory: output folder (created if missing).
    seed, num_patients, num_timepoints: the cohort.
    fmt: file format (see `write_scan`).
    overwrite: replace existing outputs; otherwise any existing one is an error
      (checked before anything is written).
    **kwargs: passed to `generate_scan`.

  Returns:
    Path of cohort.csv.
  """
  directory = pathlib.Path(directory)
  if fmt not in FORMATS:
    raise PhantomError(f"format {fmt!r} is unknown; use one of {sorted(FORMATS)}")
  directory.mkdir(parents=True, exist_ok=True)
  csv_path = directory / "cohort.csv"
  if not overwrite:
    clashes = [csv_path] if csv_path.exists() else []
    for p in range(int(num_patients)):
      for t in range(int(num_timepoints)):
        clashes += [
            q for q in _paths(directory, f"{patient_id(seed, p)}_t{t}", fmt).values() if q.exists()
        ]
    if clashes:
      raise PhantomError(
          f"{clashes[0]}: already exists ({len(clashes)} outputs would be replaced); "
          "choose an empty --out folder or pass --overwrite")
  rows = []
  for scan in generate_cohort(seed, num_patients, num_timepoints, **kwargs):
    paths = write_scan(scan, directory, fmt=fmt, overwrite=overwrite)
    rows.append({
        "path": paths["image"].name,
        "label_path": paths["label"].name,
        "lung_path": paths["lung"].name,
        "patient_id": scan.patient_id,
        "timepoint": scan.timepoint,
        "date": scan.study_date,
        "lesion_volume_ml": f"{scan.lesion_volume_ml:.3f}",
        "lung_volume_ml": f"{scan.lung_volume_ml:.3f}"
    })
  table = io.StringIO(newline="")
  writer = csv.DictWriter(table, fieldnames=COHORT_COLUMNS)
  writer.writeheader()
  writer.writerows(rows)
  return fileio.write_text(table.getvalue(), csv_path)
