"""The cohort table of a predict run: `predictions.csv`, one row per scan.

Columns, in order: `name`, `patient_id`, `study_date`, `accession_number`,
`study_instance_uid`, `series_instance_uid` (DICOM tags, empty for other
inputs), `lov_ml`, `lung_volume_ml`, `poi_percent`, `num_lesions`, `ggo_ml`,
`consolidation_ml` (3-class models; empty otherwise), `lov_outside_lung_ml`,
`opacity_pixels`, `model`, `model_version`, `model_sha256` (the report's
`model_id`: the bundle's name, its version, the weights' content hash; no local
path), `warnings` (joined by ' | '). 2-D slices
have no volumes: `opacity_pixels` is filled instead and the volume columns
are empty. Numbers are the JSON reports' own, rounded to 3 decimals;
undefined ones are empty cells, never 'nan'.
"""
from __future__ import annotations

import csv
import io
import pathlib
from collections.abc import Sequence

from scoat_jax.common.fileio import write_text

FILE_NAME = "predictions.csv"
COLUMNS = ("name", "patient_id", "study_date", "accession_number", "study_instance_uid",
           "series_instance_uid", "lov_ml", "lung_volume_ml", "poi_percent", "num_lesions",
           "ggo_ml", "consolidation_ml", "lov_outside_lung_ml", "opacity_pixels", "model",
           "model_version", "model_sha256", "warnings")


def _number(v) -> str:
  if v is None:
    return ""
  if isinstance(v, bool):
    return str(int(v))
  if isinstance(v, int):
    return str(v)
  return f"{float(v):.3f}"


def row(report: dict) -> dict:
  """The table's row of one scan's report (as `predict` writes it)."""
  dicom = report.get("dicom", {})
  classes = report.get("class_volumes_ml") or {}
  model = report.get("model_id") or {}
  return {"name": report["name"], "patient_id": dicom.get("patient_id", ""),
          "study_date": dicom.get("study_date", ""),
          "accession_number": dicom.get("accession_number", ""),
          "study_instance_uid": dicom.get("study_uid", ""),
          "series_instance_uid": dicom.get("series_uid", ""),
          "lov_ml": _number(report.get("lov_ml")),
          "lung_volume_ml": _number(report.get("lung_volume_ml")),
          "poi_percent": _number(report.get("poi_percent")),
          "num_lesions": _number(report.get("num_lesions")),
          "ggo_ml": _number(classes.get("ggo")),
          "consolidation_ml": _number(classes.get("consolidation")),
          "lov_outside_lung_ml": _number(report.get("lov_outside_lung_ml")),
          "opacity_pixels": _number(report.get("opacity_pixels")),
          "model": model.get("name", ""), "model_version": model.get("version", ""),
          "model_sha256": model.get("sha256", ""), "warnings": " | ".join(report.get("warnings", []))}


def write(reports: Sequence[dict], path: str | pathlib.Path) -> pathlib.Path:
  """Writes the table of `reports` (in their order) atomically."""
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
  writer.writeheader()
  for report in reports:
    writer.writerow(row(report))
  return write_text(buffer.getvalue(), path)
