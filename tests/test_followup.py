"""Follow-up: dates from DICOM or a CSV, the table, the plot, and refusals before writing."""
import csv
import datetime
import json
import pathlib
import subprocess
import sys

import pytest
from PIL import Image

from trained_checkpoint import SCAN_SHAPE
from scoat_jax.inference import followup
from scoat_jax.data import ct_io, dicom_writer, phantom

# Shares the tiny trained checkpoint with the other inference tests (one worker).
pytestmark = pytest.mark.xdist_group("tiny_training")

REPO = pathlib.Path(__file__).resolve().parents[1]


def _report(name, lov, lung=1000.0, **kw):
  return {"name": name, "input": f"/x/{name}", "lov_ml": lov, "lung_volume_ml": lung,
          "poi_percent": 100 * lov / lung, "num_lesions": 2, **kw}


def test_table_sorted_by_date_with_days_and_changes():
  d = datetime.date
  reports = [_report("b", 30.0), _report("a", 10.0), _report("c", 15.0)]
  dates = {"a": d(2020, 2, 3), "b": d(2020, 2, 10), "c": d(2020, 3, 2)}
  rows = followup.table(reports, dates)
  assert [r["scan"] for r in rows] == ["a", "b", "c"]
  assert [r["day"] for r in rows] == [0, 7, 28]
  assert [r["date"] for r in rows] == ["2020-02-03", "2020-02-10", "2020-03-02"]
  assert [r["lov_change_ml"] for r in rows] == [None, 20.0, -15.0]
  assert rows[1]["poi_percent"] == pytest.approx(3.0)
  three = followup.table([_report("a", 5.0, class_volumes_ml={"ggo": 3.0, "consolidation": 2.0})],
                         {"a": d(2020, 1, 1)})
  assert three[0]["ggo_ml"] == 3.0 and three[0]["consolidation_ml"] == 2.0
  with pytest.raises(ValueError, match="2-D slice"):
    followup.table([{**_report("a", 1.0), "lov_ml": None}], {"a": d(2020, 1, 1)})


def test_dates_csv(tmp_path):
  (tmp_path / "scans").mkdir()
  path = tmp_path / "dates.csv"
  path.write_text("path,date\nscans/a.nii.gz,20200301\n\n/abs/b.nii.gz, 2020-03-08\n")
  assert followup.read_dates(path) == {
      (tmp_path / "scans" / "a.nii.gz").resolve(): datetime.date(2020, 3, 1),
      followup.pathlib.Path("/abs/b.nii.gz"): datetime.date(2020, 3, 8)}
  # A header may place the columns anywhere (the phantom's cohort.csv).
  path.write_text("label_path,path,patient_id,date\nl.nii.gz,a.nii.gz,p,20200102\n")
  assert followup.read_dates(path) == {(tmp_path / "a.nii.gz").resolve(): datetime.date(2020, 1, 2)}
  for text, match in (("a.nii.gz,2020-13-01\n", r"dates.csv:1: date '2020-13-01'"),
                      ("a.nii.gz\n", "expected 'path,date'"),
                      ("a.nii.gz,20200101\na.nii.gz,20200102\n", "listed twice"),
                      ("path,date\n", "no 'path,date' row")):
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
      followup.read_dates(path)
  with pytest.raises(ValueError, match="cannot read"):
    followup.read_dates(tmp_path / "missing.csv")


@pytest.fixture(scope="module")
def patient_dir(tmp_path_factory):
  """Three DICOM series of one phantom patient (dates in StudyDate), out of date order on disk."""
  root = tmp_path_factory.mktemp("patient")
  scans = [phantom.generate_scan(3, 1, t, shape=SCAN_SHAPE) for t in range(3)]
  for name, scan in zip(("c_late", "a_first", "b_mid"), (scans[2], scans[0], scans[1])):
    dicom_writer.write_dicom_series(scan.hu, scan.geometry, root / name, patient_id=scan.patient_id,
                             study_date=scan.study_date)
  return root, scans


def test_followup_from_dicom_dates(shifted_workdir, patient_dir, tmp_path):
  root, scans = patient_dir
  out = tmp_path / "out"
  rows = followup.run(str(out), checkpoints=[str(shifted_workdir)], input_path=str(root),
                      progress=False)
  want_dates = [datetime.datetime.strptime(s.study_date, "%Y%m%d").date().isoformat() for s in scans]
  assert [r["date"] for r in rows] == want_dates
  assert [r["scan"] for r in rows] == ["a_first", "b_mid", "c_late"]
  assert rows[0]["day"] == 0 and rows[2]["day"] == 14
  for r in rows:
    report = json.loads((out / f"{r['scan']}_report.json").read_text(encoding="utf-8"))
    assert r["lov_ml"] == report["lov_ml"] and r["poi_percent"] == report["poi_percent"]
    assert (out / f"{r['scan']}_mask.nii.gz").exists()
  with open(out / "followup.csv", encoding="utf-8") as f:
    table = list(csv.DictReader(f))
  assert [row["scan"] for row in table] == ["a_first", "b_mid", "c_late"]
  assert float(table[1]["lov_ml"]) == pytest.approx(rows[1]["lov_ml"])
  md = (out / "followup.md").read_text(encoding="utf-8")
  assert md.startswith("# Follow-up of phantom-3-001") and md.count("\n| 20") == 3
  with Image.open(out / "followup.png") as im:
    assert im.format == "PNG" and im.width > 500
  # Existing predictions can be tabulated again, with dates from a CSV instead.
  dates = tmp_path / "dates.csv"
  dates.write_text("".join(f"{root / n},2021-01-0{k + 1}\n"
                           for k, n in enumerate(("c_late", "b_mid", "a_first"))))
  again = followup.run(str(tmp_path / "again"), reports_dir=str(out), dates_csv=str(dates))
  assert [r["scan"] for r in again] == ["c_late", "b_mid", "a_first"]
  assert [r["lov_ml"] for r in again] == [r["lov_ml"] for r in rows[::-1]]
  # A second follow-up into the same folder is refused.
  with pytest.raises(ValueError, match="earlier follow-up"):
    followup.run(str(tmp_path / "again"), reports_dir=str(out), dates_csv=str(dates))
  # The command line: the table on stdout; a bad request is one line and exit status 2.
  cmd = [sys.executable, "-m", "scoat_jax.followup", f"--reports={out}", f"--dates={dates}"]
  run = dict(cwd=REPO, capture_output=True, encoding="utf-8", timeout=300)
  done = subprocess.run(cmd + [f"--output={tmp_path / 'cli'}"], **run)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.startswith("# Follow-up of phantom-3-001") and done.stdout.count("\n| 20") == 3
  bad = subprocess.run(cmd + [f"--output={tmp_path / 'cli'}"], **run)
  assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ")
  assert len(bad.stderr.strip().splitlines()) == 1 and "earlier follow-up" in bad.stderr


def test_refusals_write_nothing(shifted_workdir, patient_dir, tmp_path):
  root, scans = patient_dir
  nifti = tmp_path / "nifti"
  nifti.mkdir()
  ct_io.write_ct(scans[0].hu, scans[0].geometry, nifti / "scan.nii.gz")
  other = tmp_path / "two_patients"
  other.mkdir()
  for k, pid in enumerate(("P1", "P2")):
    dicom_writer.write_dicom_series(scans[k].hu, scans[k].geometry, other / pid, patient_id=pid,
                             study_date="20200101")
  cases = {
      "no date": (dict(input_path=str(nifti)), "no date.*--dates"),
      "two patients": (dict(input_path=str(other)), "2 patients"),
      "no input": (dict(), "give --input"),
  }
  for name, (kw, match) in cases.items():
    out = tmp_path / ("out_" + name.replace(" ", "_"))
    with pytest.raises(ValueError, match=match):
      followup.run(str(out), checkpoints=[str(shifted_workdir)], progress=False, **kw)
    assert not out.exists(), name
  bad = tmp_path / "bad.csv"
  bad.write_text(f"{nifti / 'scan.nii.gz'},2020-02-30\n")
  with pytest.raises(ValueError, match="2020-02-30"):
    followup.run(str(tmp_path / "o"), checkpoints=[str(shifted_workdir)], input_path=str(nifti),
                 dates_csv=str(bad))
  assert not (tmp_path / "o").exists()
