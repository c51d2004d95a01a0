"""Follow-up of one patient: lung opacification over time (paper Fig. 6).

    python -m scoat_jax.followup --checkpoint=runs/demo --input=patient_scans/ --output=out/
    python -m scoat_jax.followup --checkpoint=runs/demo --dates=scans.csv --output=out/
    python -m scoat_jax.followup --reports=predicted/ [--dates=scans.csv] --output=out/

Each scan is segmented and quantified as by `scoat_jax.predict` (its masks and
`<name>_report.json` land in --output), or, with --reports, the reports a
previous `predict` run wrote are read instead. The date of each scan comes
from --dates, a CSV of `path,date` rows (header optional; a header naming
`path` and `date` may place them in any column, as in the phantom's
cohort.csv; paths relative to the CSV; dates YYYYMMDD or YYYY-MM-DD; rows of
other scans are ignored), or else from the DICOM StudyDate. A scan without a
date is an error, raised before anything is written.

A follow-up is one patient's course. A scan's patient is the CSV's
`patient_id` column where the CSV has one (the phantom's cohort.csv does),
else its DICOM PatientID. Scans of several patients are refused, naming
them, unless `patient` (`--patient=ID`) picks one: then only that patient's
scans are kept (rows of a whole cohort's CSV, reports of a whole cohort's
predict run), so one cohort file serves a run per patient. A scan whose CSV
patient_id and DICOM PatientID disagree is refused. With --reports, two
reports of one scan name, or reports of 1-class and 3-class models, are
refused too (a follow-up lists each scan once and compares like numbers).

Writes `followup.csv`, `followup.md` (the same table: date, day, scan, LOV,
lung volume, POI, lesions, change of LOV; GGO and consolidation for 3-class
models) and `followup.png` (LOV and POI against the date, one panel each).
"""
from __future__ import annotations

import csv
import datetime
import io
import json
import pathlib
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display needed (servers, CI)
import matplotlib.pyplot as plt  # noqa: E402

from scoat_jax.common import fileio  # noqa: E402
from scoat_jax.data import ct_io, readers  # noqa: E402
from scoat_jax.inference import segment  # noqa: E402

OUTPUTS = ("followup.csv", "followup.md", "followup.png")


class FollowupError(ValueError):
  """A bad follow-up request (dates, patients, inputs)."""


def parse_date(text: str, where: str) -> datetime.date:
  """'20200315' or '2020-03-15' -> date; FollowupError naming `where` otherwise."""
  text = str(text).strip()
  for fmt in ("%Y%m%d", "%Y-%m-%d"):
    try:
      return datetime.datetime.strptime(text, fmt).date()
    except ValueError:
      pass
  raise FollowupError(f"{where}: date {text!r} is not YYYYMMDD or YYYY-MM-DD; fix it, e.g. 2020-03-15.")


def read_dates(path: str | pathlib.Path) -> dict[pathlib.Path, datetime.date]:
  """Reads a CSV of scan paths and dates into {resolved path: date} (see `read_schedule`)."""
  return read_schedule(path)[0]


def read_schedule(path: str | pathlib.Path
                  ) -> tuple[dict[pathlib.Path, datetime.date], dict[pathlib.Path, str]]:
  """Reads a CSV of scan paths and dates: ({resolved path: date}, {resolved path: patient}).

  Rows are `path,date`; a header row naming `path` and `date` columns may put
  them anywhere (e.g. the phantom's cohort.csv), and a `patient_id` column
  there gives each scan's patient (the second dict; empty without one).
  Relative paths are relative to the CSV's folder.

  Raises:
    FollowupError: missing file, a row without both fields, a bad date, or a
      path listed twice.
  """
  path = pathlib.Path(path).expanduser()
  try:
    text = path.read_text(encoding="utf-8")
  except OSError as e:
    raise FollowupError(f"--dates={path}: cannot read it ({e.strerror}); give a CSV of "
                        "path,date rows.") from None
  out: dict[pathlib.Path, datetime.date] = {}
  patients: dict[pathlib.Path, str] = {}
  columns, patient_column = (0, 1), None
  for n, row in enumerate(csv.reader(io.StringIO(text)), start=1):
    if not row or all(not c.strip() for c in row) or row[0].lstrip().startswith("#"):
      continue
    header = [c.strip().lower() for c in row]
    if not out and "path" in header and "date" in header:
      columns = (header.index("path"), header.index("date"))
      patient_column = header.index("patient_id") if "patient_id" in header else None
      continue
    if len(row) <= max(columns) or not row[columns[0]].strip():
      raise FollowupError(f"{path}:{n}: expected 'path,date', got {','.join(row)!r}.")
    scan = pathlib.Path(row[columns[0]].strip()).expanduser()
    scan = (scan if scan.is_absolute() else path.parent / scan).resolve()
    if scan in out:
      raise FollowupError(f"{path}:{n}: {row[columns[0]].strip()} is listed twice; keep one row "
                          "per scan.")
    out[scan] = parse_date(row[columns[1]], f"{path}:{n}")
    if patient_column is not None and len(row) > patient_column and row[patient_column].strip():
      patients[scan] = row[patient_column].strip()
  if not out:
    raise FollowupError(f"--dates={path}: holds no 'path,date' row.")
  return out, patients


def _dates_for(items: Sequence[readers.Item], dates: dict) -> dict[str, datetime.date]:
  """Date of every item (CSV first, else DICOM StudyDate); FollowupError if one has none."""
  out = {}
  for item in items:
    key = item.path.resolve()
    tags = _tags(item)
    if key in dates:
      out[item.name] = dates[key]
      continue
    study = tags.get("study_date")
    if not study:
      raise FollowupError(f"{item.path}: no date: it is not a DICOM series with a StudyDate; list "
                          "it in --dates=<CSV of path,date>.")
    out[item.name] = parse_date(study, f"{item.path} (DICOM StudyDate)")
  return out


def _tags(item: readers.Item) -> dict:
  return ct_io.series_tags(item.path)[0] if item.path.is_dir() else {}


def patient_of(source: pathlib.Path, csv_patients: dict, dicom_id: str | None) -> str | None:
  """A scan's patient: the CSV's patient_id, else its DICOM PatientID; both must agree."""
  listed = csv_patients.get(pathlib.Path(source).resolve())
  if listed and dicom_id and listed != dicom_id:
    raise FollowupError(f"{source}: --dates gives patient_id {listed!r} but its DICOM PatientID is "
                        f"{dicom_id!r}; fix the CSV row (or the scan's path in it).")
  return listed or dicom_id or None


def one_patient(scans: Sequence, patient_ids: Sequence[str | None], patient: str | None) -> list:
  """The scans of one patient, in order: those of `patient`, or all when they share one.

  Raises:
    FollowupError: scans of several patients and no `patient`; a `patient`
      none of them belongs to, or a scan of unknown patient beside `patient`.
  """
  known = sorted({p for p in patient_ids if p})
  if patient:
    unknown = [s for s, p in zip(scans, patient_ids) if not p]
    if unknown:
      raise FollowupError(f"--patient={patient}: {_where(unknown[0])} has no patient id (no "
                          "patient_id in --dates, no DICOM PatientID); list it with its "
                          "patient_id in --dates or drop --patient.")
    kept = [s for s, p in zip(scans, patient_ids) if p == patient]
    if not kept:
      raise FollowupError(f"--patient={patient}: no scan of that patient (patients found: "
                          f"{', '.join(known[:10]) or 'none'}); give one of them.")
    return kept
  if len(known) > 1:
    shown = ", ".join(known[:5]) + (f" and {len(known) - 5} more" if len(known) > 5 else "")
    raise FollowupError(f"the scans belong to {len(known)} patients ({shown}); a follow-up is one "
                        "patient's course: pass --patient=<id> (one run per patient).")
  return list(scans)


def _where(scan) -> str:
  if isinstance(scan, dict):
    return str(scan.get("input", scan.get("name")))
  return str(getattr(scan, "path", scan))


def check_outputs(output: pathlib.Path, overwrite: bool) -> None:
  existing = [output / n for n in OUTPUTS if (output / n).exists()]
  if existing and not overwrite:
    raise FollowupError(f"--output={output}: holds an earlier follow-up ({existing[0].name}); "
                        "choose a new folder or pass --overwrite.")


def table(reports: Sequence[dict], dates: dict[str, datetime.date]) -> list[dict]:
  """Rows of the follow-up table, sorted by date.

  Args:
    reports: predict reports (with 'name', 'lov_ml', 'lung_volume_ml',
      'poi_percent', 'num_lesions', optional 'class_volumes_ml').
    dates: {report name: date}.

  Returns:
    One dict per scan: date, day (since the first scan), scan, lov_ml,
    lung_volume_ml, poi_percent, num_lesions, lov_change_ml (vs the previous
    scan; None for the first), and ggo_ml / consolidation_ml with 3 classes.
  """
  if not reports:
    raise FollowupError("no scan to follow up; give at least one.")
  check_like(reports)
  rows = sorted(reports, key=lambda r: (dates[r["name"]], r["name"]))
  first = dates[rows[0]["name"]]
  out, previous = [], None
  for r in rows:
    if r.get("lov_ml") is None:
      raise FollowupError(f"{r.get('input', r['name'])}: a 2-D slice has no volume; follow-up "
                          "needs CT volumes.")
    row = {"date": dates[r["name"]].isoformat(), "day": (dates[r["name"]] - first).days,
           "scan": r["name"], "lov_ml": r["lov_ml"], "lung_volume_ml": r.get("lung_volume_ml"),
           "poi_percent": r.get("poi_percent"), "num_lesions": r.get("num_lesions"),
           "lov_change_ml": None if previous is None else r["lov_ml"] - previous}
    if "class_volumes_ml" in r:
      row["ggo_ml"] = r["class_volumes_ml"]["ggo"]
      row["consolidation_ml"] = r["class_volumes_ml"]["consolidation"]
    previous = r["lov_ml"]
    out.append(row)
  return out


def check_like(reports: Sequence[dict]) -> None:
  """Refuses reports of 1-class and 3-class models together (their columns differ)."""
  three = [r for r in reports if "class_volumes_ml" in r]
  if three and len(three) != len(reports):
    one = next(r for r in reports if "class_volumes_ml" not in r)
    raise FollowupError(f"{_where(three[0])} was segmented by a 3-class model (GGO and "
                        f"consolidation) but {_where(one)} by a 1-class one; a course compares "
                        "one model's numbers: segment every scan with the same model.")


def _cell(v, digits=2) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.{digits}f}"
  return str(v)


_HEADERS = {"date": "Date", "day": "Day", "scan": "Scan", "lov_ml": "LOV (ml)",
            "lung_volume_ml": "Lung (ml)", "poi_percent": "POI (%)", "num_lesions": "Lesions",
            "lov_change_ml": "LOV change (ml)", "ggo_ml": "GGO (ml)",
            "consolidation_ml": "Consolidation (ml)"}


def write_table(rows: list[dict], output: pathlib.Path, title: str = "") -> None:
  """Writes followup.csv (full precision) and followup.md (2 decimals), atomically."""
  keys = list(rows[0])
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
  writer.writeheader()
  writer.writerows([{k: "" if v is None else v for k, v in r.items()} for r in rows])
  csv_text = buf.getvalue()
  lines = [f"# {title}", ""] if title else []
  lines.append("| " + " | ".join(_HEADERS.get(k, k) for k in keys) + " |")
  lines.append("|" + "|".join("---" if k in ("date", "scan") else "---:" for k in keys) + "|")
  for r in rows:
    lines.append("| " + " | ".join(_cell(r[k]) for k in keys) + " |")
  md_text = "\n".join(lines) + "\n"
  for name, text in (("followup.csv", csv_text), ("followup.md", md_text)):
    fileio.write_text(text, output / name)


def plot(rows: list[dict], path: pathlib.Path, title: str = "") -> pathlib.Path:
  """LOV (ml, top) and POI (%, bottom) against the scan date, ticks at the scans.

  Two panels rather than two y axes: with a constant lung volume the two
  curves have the same shape and would hide each other.
  """
  dates = [datetime.date.fromisoformat(r["date"]) for r in rows]
  series = [("lov_ml", "LOV (ml)", "o-", "tab:blue"), ("poi_percent", "POI (%)", "s-", "tab:red")]
  fig, axes = plt.subplots(2, 1, figsize=(7, 5), sharex=True, layout="constrained")
  for ax, (key, label, style, colour) in zip(axes, series):
    points = [(d, r[key]) for d, r in zip(dates, rows) if r[key] is not None]
    if points:
      ax.plot([d for d, _ in points], [v for _, v in points], style, color=colour)
      for d, v in points:
        ax.annotate(f"{v:.1f}", (d, v), textcoords="offset points", xytext=(0, 6), ha="center",
                    fontsize=8)
      top = max(v for _, v in points)
    else:
      ax.text(0.5, 0.5, "not available (no lung mask)", transform=ax.transAxes, ha="center")
      top = 1.0
    ax.set_ylim(0, 1.2 * max(top, 1e-3))   # headroom for the labels above the points
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[1].set_xticks(dates, [f"{d.isoformat()}\nday {r['day']}" for d, r in zip(dates, rows)],
                     fontsize=8)
  pad = datetime.timedelta(days=max(1, (dates[-1] - dates[0]).days // 12))
  axes[1].set_xlim(dates[0] - pad, dates[-1] + pad)
  axes[1].set_xlabel("scan date")
  axes[0].set_title(title or "Follow-up", fontsize=10)
  try:
    fileio.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
  finally:
    plt.close(fig)
  return path


def _reports_from(folder: pathlib.Path) -> list[dict]:
  files = sorted(folder.glob("*_report.json"))
  if not files:
    raise FollowupError(f"--reports={folder}: holds no *_report.json; run scoat_jax.predict first.")
  out, names = [], {}
  for f in files:
    try:
      report = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
      report = None
    if not isinstance(report, dict) or not {"name", "input", "lov_ml"} <= set(report):
      raise FollowupError(f"{f}: not a scoat_jax.predict report; remove it or re-run predict.")
    if report["name"] in names:
      raise FollowupError(f"--reports={folder}: {names[report['name']].name} and {f.name} both "
                          f"report scan {report['name']!r}; a follow-up lists each scan once: "
                          "move one out of the folder.")
    names[report["name"]] = f
    out.append(report)
  return out


def _report_patient(report: dict, csv_patients: dict) -> str | None:
  return patient_of(pathlib.Path(report["input"]), csv_patients,
                    report.get("dicom", {}).get("patient_id"))


def run(output: str, *, checkpoints: Sequence[str] = (), input_path: str | None = None,
        dates_csv: str | None = None, reports_dir: str | None = None, tta: bool = False,
        overwrite: bool = False, batch_size: int = 0, progress: bool = True,
        patient: str | None = None, **segment_options) -> list[dict]:
  """Builds the follow-up table and plot; the programmatic form of the CLI.

  Args:
    output: results folder.
    checkpoints: models to segment the scans with (predict mode).
    input_path: a folder of the patient's scans (or one scan); with --dates
      alone, the CSV's scans are used.
    dates_csv: CSV of path,date.
    reports_dir: read existing predict reports instead of predicting.
    tta, overwrite, batch_size, progress: as in `segment.run`.
    patient: keep only this patient's scans (CSV patient_id or DICOM
      PatientID); needed when the scans are of several patients.
    **segment_options: further `segment.run` options (key_images, postprocess,
      skip_outside_lung).

  Returns:
    The table rows.
  """
  output = pathlib.Path(output).expanduser()
  dates, csv_patients = read_schedule(dates_csv) if dates_csv else ({}, {})
  patient = str(patient).strip() if patient else None
  if output.exists() and not output.is_dir():
    raise FollowupError(f"--output={output}: is a file; give a folder.")
  check_outputs(output, overwrite)
  if reports_dir:
    if checkpoints or input_path:
      raise FollowupError("--reports reads earlier predictions: drop --checkpoint and --input.")
    reports = _reports_from(pathlib.Path(reports_dir).expanduser())
    reports = one_patient(reports, [_report_patient(r, csv_patients) for r in reports], patient)
    named = {}
    for r in reports:
      key = pathlib.Path(r["input"]).resolve()
      if key in dates:
        named[r["name"]] = dates[key]
      elif r.get("dicom", {}).get("study_date"):
        named[r["name"]] = parse_date(r["dicom"]["study_date"], f"{r['input']} (DICOM StudyDate)")
      else:
        raise FollowupError(f"{r['input']}: no date: list it in --dates=<CSV of path,date>.")
    rows = table(reports, named)   # every refusal before the output folder exists
    output.mkdir(parents=True, exist_ok=True)
  else:
    if not checkpoints:
      raise FollowupError("give --checkpoint (to segment the scans) or --reports (earlier results).")
    if input_path:
      # Rows for other scans are ignored (one CSV may serve a whole cohort); a
      # scan of --input without a row needs a DICOM StudyDate.
      items = readers.discover_inputs(input_path)
    elif dates:
      items = []
      listed = list(dates)
      if patient or len(set(csv_patients.values())) > 1:
        listed = one_patient(listed, [csv_patients.get(p) for p in listed], patient)
      for p in listed:
        found = readers.discover_inputs(p)
        if len(found) != 1 or found[0].kind != "volume":
          raise FollowupError(f"--dates lists {p}, which is not one CT scan (a file or a DICOM "
                              "series folder); list each scan on its own row.")
        items += found
      names = [i.name for i in items]
      if len(set(names)) != len(names):
        raise FollowupError("--dates lists two scans with the same name; rename one.")
    else:
      raise FollowupError("give --input (a folder of the patient's scans) or --dates (a CSV of "
                          "path,date).")
    if any(i.kind == "image" for i in items):
      raise FollowupError("follow-up needs CT volumes; 2-D slice images have no volume.")
    items = one_patient(items, [patient_of(i.path, csv_patients, _tags(i).get("patient_id"))
                                for i in items], patient)
    named = _dates_for(items, dates)
    reports = segment.run(checkpoints, input_path or "", str(output), tta=tta, overwrite=overwrite,
                          batch_size=batch_size, progress=progress, items=items,
                          **segment_options)
    rows = table(reports, named)
  pid = patient or next((p for p in (_report_patient(r, csv_patients) for r in reports) if p), "")
  title = f"Follow-up of {pid}" if pid else "Follow-up"
  write_table(rows, output, title)
  plot(rows, output / "followup.png", title)
  return rows
