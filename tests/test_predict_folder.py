"""predict's output folder: --overwrite keeps it consistent, a signal leaves whole scans only,
a killed run's temporaries are removed, and a huge --batch_size costs no more than the scan.

The tiny checkpoint of `fixtures/legacy_checkpoint` segments 6-slice scans in well under a
second each, so these tests run the real command.
"""
from __future__ import annotations

import csv
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

from scoat_jax.inference import segment

ROOT = pathlib.Path(__file__).resolve().parents[1]
CKPT = str(pathlib.Path(__file__).resolve().parent / "fixtures" / "legacy_checkpoint")


def _scan(path: pathlib.Path, shape=(6, 32, 40)) -> pathlib.Path:
  hu = np.full(shape, 40, np.int16)
  hu[:, :, :4] = -1000
  hu[:, 8:24, 10:30] = -850
  image = sitk.GetImageFromArray(hu)
  image.SetSpacing((1.4, 1.4, 5.0))
  path.parent.mkdir(parents=True, exist_ok=True)
  sitk.WriteImage(image, str(path))
  return path


def _rows(folder: pathlib.Path) -> dict[str, dict]:
  with open(folder / "predictions.csv", encoding="utf-8") as f:
    return {r["name"]: r for r in csv.DictReader(f)}


def _consistent(folder: pathlib.Path) -> set[str]:
  """The scans of `folder`; fails unless each file has its scan's report and row."""
  names = {p.name[:-len("_report.json")] for p in folder.glob("*_report.json")}
  for p in folder.iterdir():
    assert not p.name.startswith("."), f"a temporary file is left: {p.name}"
    if p.name != "predictions.csv":
      assert any(p.name.startswith(f"{n}_") for n in names), f"{p.name} has no report"
  assert set(_rows(folder)) == names
  return names


def test_overwrite_keeps_the_rows_of_other_scans_and_drops_a_rerun_scans_stale_files(tmp_path):
  inputs = tmp_path / "in"
  for name in ("a", "b"):
    _scan(inputs / f"{name}.nii.gz")
  out = tmp_path / "out"
  segment.run([CKPT], str(inputs), str(out), progress=False, save_probabilities=True)
  b_before = (out / "b_probability.nii.gz").read_bytes()
  [report] = segment.run([CKPT], str(inputs / "a.nii.gz"), str(out), progress=False,
                         overwrite=True, key_images=False)
  files = sorted(p.name for p in out.iterdir())
  # a: this run's files only (its earlier probability map and key images are gone) ...
  assert [f for f in files if f.startswith("a_")] == ["a_mask.nii.gz", "a_report.json"]
  # ... b, not rerun, keeps all its files and its row.
  assert (out / "b_probability.nii.gz").read_bytes() == b_before
  assert {"b_report.png", "b_report.pdf", "b_mask.nii.gz"} <= set(files)
  rows = _rows(out)
  assert list(rows) == ["a", "b"] and _consistent(out) == {"a", "b"}
  assert rows["a"]["lov_ml"] == f"{report['lov_ml']:.3f}"


def test_overwrite_refuses_an_earlier_report_it_cannot_read(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "x_report.json").write_text("not json")
  with pytest.raises(segment.PredictError, match="x_report.json"):
    segment.run([CKPT], str(_scan(tmp_path / "a.nii.gz")), str(out), progress=False,
                overwrite=True)
  assert sorted(p.name for p in out.iterdir()) == ["x_report.json"]


@pytest.mark.parametrize("where", ["in", "in/results", "in/series"])
def test_an_output_folder_inside_the_input_is_refused_before_anything_is_written(tmp_path, where):
  inputs = tmp_path / "in"
  _scan(inputs / "a.nii.gz")
  (inputs / "series").mkdir()
  before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
  with pytest.raises(segment.PredictError, match="lies inside --input"):
    segment.run([CKPT], str(inputs), str(tmp_path / where), progress=False)
  assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_sigterm_exits_130_and_leaves_whole_scans(tmp_path):
  inputs = tmp_path / "in"
  for k in range(12):
    _scan(inputs / f"s{k:02d}.nii.gz")
  out = tmp_path / "out"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.Popen([sys.executable, "-m", "scoat_jax.predict", f"--checkpoint={CKPT}",
                           f"--input={inputs}", f"--output={out}"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while not (out / "s00_report.json").exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 130, stderr[-2000:]
  line = next(l for l in stderr.splitlines() if "interrupted: " in l)
  assert "SIGTERM" in line and "of 12 scan(s)" in line and "predictions.csv" in line
  assert "Traceback" not in stderr
  assert 1 <= len(_consistent(out)) < 12


def test_a_signal_while_a_scan_is_written_waits_for_its_report_and_row(tmp_path, monkeypatch):
  from scoat_jax.common import signals
  from scoat_jax.inference import key_images
  inputs = tmp_path / "in"
  for name in ("a", "b"):
    _scan(inputs / f"{name}.nii.gz")
  write = key_images.write_key_images

  def write_then_signal(*args, **kwargs):
    write(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)   # after the mask, before the report

  monkeypatch.setattr(key_images, "write_key_images", write_then_signal)
  old = signal.getsignal(signal.SIGTERM)
  signals.terminate_as_interrupt()
  try:
    with pytest.raises(KeyboardInterrupt, match="after 1 of 2 scan"):
      segment.run([CKPT], str(inputs), str(tmp_path / "out"), progress=False)
  finally:
    signal.signal(signal.SIGTERM, old)
  assert _consistent(tmp_path / "out") == {"a"}


def test_a_killed_runs_temporaries_are_removed_by_the_next_run(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  ours = [".a_mask.nii.gz.tmp-0a1b2c3d.nii.gz", ".predictions.csv.tmp-deadbeef.csv"]
  theirs = [".notes.txt.tmp-0a1b2c3d.txt", ".a_mask.nii.gz.tmp-xyz.nii.gz"]
  for name in ours + theirs:
    (out / name).write_bytes(b"")
  segment.run([CKPT], str(_scan(tmp_path / "a.nii.gz")), str(out), progress=False)
  hidden = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
  assert hidden == sorted(theirs)


def test_a_huge_batch_size_is_no_larger_than_the_scan(monkeypatch):
  from scoat_jax import inference
  model = inference.load_model(CKPT)
  p = inference.Predictor([model], batch_size=1_000_000)
  shapes = []
  forward = p._forward

  def record(variables, batch):
    shapes.append(batch.shape[0])
    return forward(variables, batch)

  monkeypatch.setattr(p, "_forward", record)
  hu = np.full((6, 32, 40), -850, np.int16)
  labels, _ = p.predict_volume(hu)
  n = p.mesh.devices.size
  assert labels.shape == hu.shape and shapes == [-(-6 // n) * n]
  shapes.clear()
  list(p.predict_slices((hu[k] for k in range(3)), count=3))
  assert shapes == [-(-3 // n) * n]
