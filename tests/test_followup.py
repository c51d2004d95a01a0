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


# --- Patients, duplicate names and mixed models: refused or handled before anything is written.

def _reports_dir(root, reports):
  root.mkdir(parents=True, exist_ok=True)
  for file, report in reports.items():
    (root / f"{file}_report.json").write_text(json.dumps(report), encoding="utf-8")
  return root


def _cohort(tmp_path, rows):
  path = tmp_path / "cohort.csv"
  path.write_text("path,label_path,patient_id,timepoint,date\n" + "".join(
      f"{scan},x_label.nii.gz,{pid},0,{date}\n" for scan, pid, date in rows))
  return path


def test_a_cohort_csv_gives_one_course_per_patient(tmp_path):
  # Two patients, two scans each; names sort across patients (a_... of P2 first).
  reports = {n: {**_report(n, lov), "input": str(tmp_path / f"{n}.nii.gz")}
             for n, lov in (("p1_t0", 100.0), ("p1_t1", 60.0), ("a_t0", 250.0), ("a_t1", 275.0))}
  folder = _reports_dir(tmp_path / "pred", reports)
  csv_path = _cohort(tmp_path, [("p1_t0.nii.gz", "P1", "20200301"), ("p1_t1.nii.gz", "P1", "20200311"),
                                ("a_t0.nii.gz", "P2", "20200302"), ("a_t1.nii.gz", "P2", "20200309")])
  assert followup.read_schedule(csv_path)[1] == {
      (tmp_path / f"{n}.nii.gz").resolve(): p for n, p in
      (("p1_t0", "P1"), ("p1_t1", "P1"), ("a_t0", "P2"), ("a_t1", "P2"))}
  with pytest.raises(ValueError, match=r"2 patients \(P1, P2\).*--patient=<id>"):
    followup.run(str(tmp_path / "mixed"), reports_dir=str(folder), dates_csv=str(csv_path))
  assert not (tmp_path / "mixed").exists()
  with pytest.raises(ValueError, match=r"--patient=P9: no scan of that patient \(patients found: "
                                       r"P1, P2\)"):
    followup.run(str(tmp_path / "p9"), reports_dir=str(folder), dates_csv=str(csv_path),
                 patient="P9")
  assert not (tmp_path / "p9").exists()
  # One patient's course: its own two scans, its own change (60 - 100), day 10.
  rows = followup.run(str(tmp_path / "p1"), reports_dir=str(folder), dates_csv=str(csv_path),
                      patient="P1")
  assert [(r["scan"], r["day"], r["lov_change_ml"]) for r in rows] == [
      ("p1_t0", 0, None), ("p1_t1", 10, -40.0)]
  assert (tmp_path / "p1" / "followup.md").read_text().startswith("# Follow-up of P1")
  rows = followup.run(str(tmp_path / "p2"), reports_dir=str(folder), dates_csv=str(csv_path),
                      patient="P2")
  assert [(r["scan"], r["lov_change_ml"]) for r in rows] == [("a_t0", None), ("a_t1", 25.0)]
  # The command: one line, exit 2, nothing written; then --patient.
  cmd = [sys.executable, "-m", "scoat_jax.followup", f"--reports={folder}", f"--dates={csv_path}"]
  run = dict(cwd=REPO, capture_output=True, encoding="utf-8", timeout=300)
  bad = subprocess.run(cmd + [f"--output={tmp_path / 'cli'}"], **run)
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr[-2000:]
  assert "--patient=<id>" in bad.stderr and not (tmp_path / "cli").exists()
  ok = subprocess.run(cmd + [f"--output={tmp_path / 'cli'}", "--patient=P2"], **run)
  assert ok.returncode == 0 and ok.stdout.startswith("# Follow-up of P2"), ok.stderr[-2000:]


def test_csv_and_dicom_patients_must_agree_and_dates_alone_are_split(tmp_path):
  report = {**_report("s", 5.0), "input": str(tmp_path / "s"), "dicom": {"patient_id": "D1"}}
  folder = _reports_dir(tmp_path / "pred", {"s": report})
  csv_path = _cohort(tmp_path, [("s", "P1", "20200301")])
  with pytest.raises(ValueError, match=r"gives patient_id 'P1' but its DICOM PatientID is 'D1'"):
    followup.run(str(tmp_path / "o"), reports_dir=str(folder), dates_csv=str(csv_path))
  assert not (tmp_path / "o").exists()
  # --dates alone with a cohort of two patients: refused before any scan is read or segmented.
  csv_path = _cohort(tmp_path, [("missing_a.nii.gz", "P1", "20200301"),
                                ("missing_b.nii.gz", "P2", "20200302")])
  with pytest.raises(ValueError, match="2 patients"):
    followup.run(str(tmp_path / "o"), checkpoints=["unused"], dates_csv=str(csv_path))
  with pytest.raises(ValueError, match="missing_a.nii.gz"):   # P1's row only is looked at
    followup.run(str(tmp_path / "o"), checkpoints=["unused"], dates_csv=str(csv_path),
                 patient="P1")
  assert not (tmp_path / "o").exists()


def test_reports_of_one_name_or_of_1_and_3_classes_are_refused(tmp_path):
  dates = tmp_path / "dates.csv"
  dates.write_text(f"{tmp_path / 'a'},20200101\n{tmp_path / 'b'},20200108\n")
  twice = _reports_dir(tmp_path / "twice", {
      "a": {**_report("scan", 5.0), "input": str(tmp_path / "a")},
      "b": {**_report("scan", 9.0), "input": str(tmp_path / "b")}})
  with pytest.raises(ValueError, match=r"a_report.json and b_report.json both report scan 'scan'"):
    followup.run(str(tmp_path / "o"), reports_dir=str(twice), dates_csv=str(dates))
  mixed = _reports_dir(tmp_path / "mixed", {
      "a": {**_report("a", 5.0), "input": str(tmp_path / "a")},
      "b": {**_report("b", 9.0, class_volumes_ml={"ggo": 6.0, "consolidation": 3.0}),
            "input": str(tmp_path / "b")}})
  with pytest.raises(ValueError, match=r"/b was segmented by a 3-class model .* but .*/a by a 1-class"):
    followup.run(str(tmp_path / "o"), reports_dir=str(mixed), dates_csv=str(dates))
  assert not (tmp_path / "o").exists()
