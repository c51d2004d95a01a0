"""The text of a key-image page: a scan report's numbers, its lung rule, model, date, warnings.

`key_images` draws these lines beside the slices. Undefined values (None,
or missing keys) read 'n/a'; warnings are wrapped to fit the panel.
"""
from __future__ import annotations

import datetime
import textwrap

_WRAP = 78


def _fmt(value, unit: str = "", digits: int = 2) -> str:
  """A number with its unit, or 'n/a' when it is undefined (None)."""
  if value is None:
    return "n/a"
  text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
  return f"{text} {unit}".rstrip()


def _date_text(date) -> str:
  if isinstance(date, datetime.datetime):
    return date.isoformat(sep=" ", timespec="minutes")
  if isinstance(date, datetime.date):
    return date.isoformat()
  return str(date)


def _study_date(text: str) -> str:
  """DICOM 'YYYYMMDD' as 'YYYY-MM-DD'; anything else as given."""
  text = str(text)
  return f"{text[:4]}-{text[4:6]}-{text[6:]}" if len(text) == 8 and text.isdigit() else text


def summary_lines(report: dict, *, model: str, date) -> list[str]:
  """The text panel: the report's numbers, the model, the date and the warnings, line by line.

  Args:
    report: what `predict` writes per scan (`quantify.quantify_volume` keys:
      lov_ml, lung_volume_ml, poi_percent, num_lesions, class_volumes_ml,
      warnings, and 'dicom' {'patient_id', 'study_date'} when read from DICOM;
      or `quantify.quantify_slice` keys for a 2-D slice: opacity_pixels, ...).
    model: the model's name.
    date: when the images are made (a date, datetime or text).

  Returns:
    Lines of text; undefined values (None, or missing) read 'n/a'.
  """
  dicom = report.get("dicom") or {}
  lines = []
  if dicom.get("patient_id"):
    lines.append(f"Patient ID: {dicom['patient_id']}")
  if dicom.get("study_date"):
    lines.append(f"Study date: {_study_date(dicom['study_date'])}")
  if report.get("name"):
    lines.append(f"Scan: {report['name']}")
  if "opacity_pixels" in report:  # a 2-D slice: sizes in pixels
    lines.append(f"Opacity: {_fmt(report.get('opacity_pixels'), 'pixels')} "
                 f"({_fmt(report.get('opacity_percent_of_image'), '%')} of the image)")
    lines.append(f"Lesions: {_fmt(report.get('num_lesions'))}")
    classes, unit = report.get("class_pixels"), "pixels"
  else:
    lines.append(f"Lung opacification volume (LOV): {_fmt(report.get('lov_ml'), 'ml')}")
    lines.append(f"Lung volume: {_fmt(report.get('lung_volume_ml'), 'ml')}")
    lines.append(f"Percentage of infection (POI): {_fmt(report.get('poi_percent'), '%')}")
    lines.append(f"Lesions: {_fmt(report.get('num_lesions'))}")
    classes, unit = report.get("class_volumes_ml"), "ml"
  if classes is not None:
    lines.append(f"Ground-glass opacity: {_fmt(classes.get('ggo'), unit)}")
    lines.append(f"Consolidation: {_fmt(classes.get('consolidation'), unit)}")
  if "opacity_pixels" in report:
    lines.append("A 2-D slice has no spacing or HU: no LOV, lung volume or POI.")
  rule = _rule_line(report)
  if rule:
    lines.append(rule)
  lines += ["", *textwrap.wrap(f"Model: {model}", _WRAP, subsequent_indent="  "),
            f"Report date: {_date_text(date)}"]
  warnings = list(report.get("warnings") or [])
  if warnings:
    lines += ["", "Warnings:"]
    for w in warnings:
      lines += textwrap.wrap(str(w), _WRAP, initial_indent="- ", subsequent_indent="  ")
  return lines


def _rule_line(report: dict) -> str | None:
  rule = report.get("lung_rule")
  if not isinstance(rule, dict):
    return None
  if not rule.get("applied"):
    return "Lung rule: off (opacity outside the lungs counts)"
  removed = rule.get("removed_ml")
  tail = f"; {removed:.2f} ml outside removed" if isinstance(removed, (int, float)) else ""
  return f"Lung rule: {rule.get('rule', 'on')}{tail}"
