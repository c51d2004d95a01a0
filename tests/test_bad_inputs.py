"""Every bad input to every command: exit status 2, one `error:` line naming the file or flag,
and the output folder or workdir exactly as it was (nothing written, not even a folder).

The table runs each command as a user would (`python -m scoat_jax.<command>`), with the
tiny checkpoint of `fixtures/legacy_checkpoint` where a model is needed.
"""
from __future__ import annotations

import os
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from scoat_jax.data import ct_io, dicom_writer

ROOT = pathlib.Path(__file__).resolve().parents[1]
CKPT = str(pathlib.Path(__file__).resolve().parent / "fixtures" / "legacy_checkpoint")
SPACING = (1.4, 1.4, 5.0)


def _hu(shape=(6, 32, 40)) -> np.ndarray:
  """A small volume with air, tissue and lung-like values (passes the HU checks)."""
  hu = np.full(shape, 40, np.int16)
  hu[:, :, :4] = -1000
  hu[:, 8:24, 10:30] = -850
  return hu


def _write(array, path, spacing=SPACING, direction=None):
  image = sitk.GetImageFromArray(array)
  image.SetSpacing(spacing)
  if direction is not None:
    image.SetDirection(direction)
  sitk.WriteImage(image, str(path))
  return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> pathlib.Path:
  d = tmp_path_factory.mktemp("bad_inputs")
  good = _write(_hu(), d / "good.nii.gz")
  nii = _write(_hu(), d / "zero_pixdim.nii")
  data = bytearray(nii.read_bytes())
  data[88:92] = struct.pack("<f", 0.0)          # pixdim[3]: the slice spacing
  nii.write_bytes(bytes(data))
  _write(_hu(), d / "huge_spacing.nii.gz", spacing=(1e6, 1e6, 1e6))
  nan = _hu().astype(np.float32)
  nan[2, 5:7, 5:7] = np.nan
  _write(nan, d / "nan.nii.gz")
  inf = _hu().astype(np.float32)
  inf[1, 3, 3] = np.inf
  _write(inf, d / "inf.nii.gz")
  whole = good.read_bytes()
  (d / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
  _write(np.clip(_hu(), 0, 255).astype(np.uint8), d / "photo.nii.gz")
  c, s = np.cos(np.deg2rad(45.0)), np.sin(np.deg2rad(45.0))
  _write(_hu(), d / "oblique45.nii.gz", direction=(c, -s, 0, s, c, 0, 0, 0, 1))
  _write(_hu()[0], d / "flat.nii.gz", spacing=SPACING[:2])
  Image.fromarray(np.zeros((32, 40), np.uint8)).save(d / "slice.png")
  two = d / "two_series"
  geometry = ct_io.Geometry.for_array(_hu().shape, SPACING)
  dicom_writer.write_dicom_series(_hu(), geometry, two, patient_id="P", study_date="20200101",
                                  series_uid="1.2.3.1")
  dicom_writer.write_dicom_series(_hu() + 1, geometry, d / "second", patient_id="P",
                                  study_date="20200101", series_uid="1.2.3.2")
  for f in (d / "second").iterdir():
    f.rename(two / f"b_{f.name}")
  (d / "second").rmdir()
  done = d / "done"
  done.mkdir()
  (done / "good_report.json").write_text("{}")
  (d / "a_file").write_text("x")
  (d / "empty").mkdir()
  (d / "dates.csv").write_text("path,date\nnowhere.nii.gz,2020-01-01\n")
  (d / "imagesTr").mkdir()
  _bad_dicom(d, geometry)
  nii = _write(_hu(), d / "qsform.nii")
  data = bytearray(nii.read_bytes())            # srow_z: the sform's slices 7% thicker
  data[320:324] = struct.pack("<f", struct.unpack("<f", data[320:324])[0] * 1.07)
  nii.write_bytes(bytes(data))
  hu = _hu().astype(np.int32) - 1024            # a doubled RescaleIntercept
  _write(hu, d / "intercept_twice.nii.gz")
  (d / "linked").mkdir()
  _write(_hu(), d / "linked" / "a.nii.gz")
  os.symlink(d / "gone.nii.gz", d / "linked" / "b.nii.gz")
  return d


def _bad_dicom(d: pathlib.Path, geometry) -> None:
  """DICOM series that ITK alone would read wrongly without a word."""
  import pydicom
  for name in ("truncated_slice", "no_position", "odd_spacing", "beside_nifti"):
    dicom_writer.write_dicom_series(_hu(), geometry, d / name, patient_id="P",
                                    study_date="20200101")
  last = sorted((d / "truncated_slice").iterdir())[-1]
  last.write_bytes(last.read_bytes()[:-500])
  for name, change in (("no_position", ("ImagePositionPatient", "SliceLocation")),
                       ("odd_spacing", ())):
    f = sorted((d / name).iterdir())[2]
    ds = pydicom.dcmread(f)
    for keyword in change:
      delattr(ds, keyword)
    if not change:
      ds.PixelSpacing = [0.7, 0.7]
    ds.save_as(f)
  _write(_hu(), d / "beside_nifti" / "scan.nii.gz")


def _cases(d: pathlib.Path, out: str = "out"):
  """(name, argv after `python -m`, text the error line must contain); results go to d/out."""
  out = str(d / out)
  predict = ["scoat_jax.predict", f"--checkpoint={CKPT}"]
  good = f"--input={d / 'good.nii.gz'}"
  return [
      ("predict: no checkpoint", ["scoat_jax.predict", good, f"--output={out}"], "--checkpoint"),
      ("predict: no input", [*predict, f"--output={out}"], "--input"),
      ("predict: input missing", [*predict, f"--input={d / 'nope.nii.gz'}", f"--output={out}"], "nope.nii.gz"),
      ("predict: checkpoint missing", ["scoat_jax.predict", f"--checkpoint={d / 'nockpt'}", good, f"--output={out}"], "nockpt"),
      ("predict: output is a file", [*predict, good, f"--output={d / 'a_file'}"], "a_file"),
      ("predict: output cannot be created", [*predict, good, "--output=/proc/scoat_x"], "/proc/scoat_x"),
      ("predict: negative batch", [*predict, good, f"--output={out}", "--batch_size=-1"], "batch_size"),
      ("predict: 2-D file as a scan", [*predict, f"--input={d / 'slice.png'}", f"--output={out}"], "slice.png"),
      ("predict: zero pixdim", [*predict, f"--input={d / 'zero_pixdim.nii'}", f"--output={out}"], "zero_pixdim.nii"),
      ("predict: spacing 1e6 mm", [*predict, f"--input={d / 'huge_spacing.nii.gz'}", f"--output={out}"], "huge_spacing"),
      ("predict: NaN voxels", [*predict, f"--input={d / 'nan.nii.gz'}", f"--output={out}"], "4 voxel(s) are NaN"),
      ("predict: an Inf voxel", [*predict, f"--input={d / 'inf.nii.gz'}", f"--output={out}"], "1 voxel(s) are NaN or infinite"),
      ("predict: truncated file", [*predict, f"--input={d / 'truncated.nii.gz'}", f"--output={out}"], "truncated.nii.gz"),
      ("predict: 8-bit values", [*predict, f"--input={d / 'photo.nii.gz'}", f"--output={out}"], "0..255"),
      ("predict: 45-degree grid", [*predict, f"--input={d / 'oblique45.nii.gz'}", f"--output={out}"], "45.0 degrees"),
      ("predict: 2-D volume", [*predict, f"--input={d / 'flat.nii.gz'}", f"--output={out}"], "flat.nii.gz"),
      ("predict: two DICOM series", [*predict, f"--input={d / 'two_series'}", f"--output={out}"], "--series_id"),
      ("predict: unknown series", [*predict, f"--input={d / 'two_series'}", f"--output={out}", "--series_id=9.9"], "9.9"),
      ("predict: attention slices alone", [*predict, good, f"--output={out}", "--attention_slices=1"], "--attention_slices"),
      ("predict: attention slice not a number", [*predict, good, f"--output={out}", "--save_attention", "--attention_slices=a"], "--attention_slices"),
      ("predict: attention slice beyond the scan", [*predict, good, f"--output={out}", "--save_attention", "--attention_slices=99"], "--attention_slices=99"),
      ("predict: earlier results", [*predict, good, f"--output={d / 'done'}"], "--overwrite"),
      ("predict: unknown flag", [*predict, good, f"--output={out}", "--bogus"], "bogus"),
      ("predict: stray argument", [*predict, good, f"--output={out}", "stray"], "stray"),
      ("predict: empty input folder", [*predict, f"--input={d / 'empty'}", f"--output={out}"], "empty"),
      ("predict: truncated DICOM slice", [*predict, f"--input={d / 'truncated_slice'}", f"--output={out}"], "IM00006.dcm: truncated"),
      ("predict: DICOM slice without position", [*predict, f"--input={d / 'no_position'}", f"--output={out}"], "IM00003.dcm: lacks ImagePositionPatient"),
      ("predict: DICOM slice of another pixel size", [*predict, f"--input={d / 'odd_spacing'}", f"--output={out}"], "IM00003.dcm: PixelSpacing"),
      ("predict: NIfTI beside DICOM slices", [*predict, f"--input={d / 'beside_nifti'}", f"--output={out}"], "scan.nii.gz"),
      ("predict: qform and sform disagree", [*predict, f"--input={d / 'qsform.nii'}", f"--output={out}"], "qsform.nii: the header's qform and sform disagree"),
      ("predict: doubled intercept", [*predict, f"--input={d / 'intercept_twice.nii.gz'}", f"--output={out}"], "below -1200 HU"),
      ("predict: broken link in a folder", [*predict, f"--input={d / 'linked'}", f"--output={out}"], "b.nii.gz is a broken link"),
      ("followup: no output", ["scoat_jax.followup", f"--reports={d / 'empty'}"], "--output"),
      ("followup: reports folder empty", ["scoat_jax.followup", f"--reports={d / 'empty'}", f"--output={out}"], "--reports"),
      ("followup: dates CSV missing", ["scoat_jax.followup", f"--checkpoint={CKPT}", f"--dates={d / 'no.csv'}", f"--output={out}"], "no.csv"),
      ("followup: dates name a missing scan", ["scoat_jax.followup", f"--checkpoint={CKPT}", f"--dates={d / 'dates.csv'}", f"--output={out}"], "nowhere.nii.gz"),
      ("report: workdir missing", ["scoat_jax.report", f"--workdirs={d / 'nowork'}", f"--output={out}"], "nowork"),
      ("report: not a training workdir", ["scoat_jax.report", f"--workdirs={d / 'empty'}", f"--output={out}"], "empty"),
      ("build: no name", ["scoat_jax.datasets.build"], "dataset name"),
      ("build: unknown dataset", ["scoat_jax.datasets.build", "nope", f"--data_dir={out}"], "nope"),
      ("build: manual_dir missing", ["scoat_jax.datasets.build", "ct_volumes", f"--manual_dir={d / 'nodir'}", f"--data_dir={out}"], "--manual_dir"),
      ("build: phantom with manual_dir", ["scoat_jax.datasets.build", "ct_phantom", f"--manual_dir={d / 'empty'}", f"--data_dir={out}"], "--manual_dir"),
      ("build: bad slices filter", ["scoat_jax.datasets.build", "ct_volumes", "--slices=bogus", f"--data_dir={out}"], "slices"),
      ("build: empty layout", ["scoat_jax.datasets.build", "ct_volumes", f"--manual_dir={d}", f"--data_dir={out}"], "imagesTr"),
      ("main: misspelt field", ["scoat_jax.main", "--flagfile=launch/demo.cfg", "--config.widhts=3", f"--workdir={out}"], "--config.model.widths"),
      ("main: bad value", ["scoat_jax.main", "--flagfile=launch/demo.cfg", "--config.batch_size=abc", f"--workdir={out}"], "--config.batch_size"),
      ("main: config file missing", ["scoat_jax.main", "--config=nowhere.py", f"--workdir={out}"], "nowhere.py"),
      ("main: eval without checkpoint", ["scoat_jax.main", "--flagfile=launch/demo.cfg", "--mode=eval"], "--checkpoint"),
      ("main: batch 0", ["scoat_jax.main", "--flagfile=launch/demo.cfg", "--config.batch_size=0", f"--workdir={out}"], "batch_size"),
      ("main: unknown model", ["scoat_jax.main", "--flagfile=launch/demo.cfg", "--config.model_name=nonet", f"--workdir={out}"], "nonet"),
      ("main: unknown loss", ["scoat_jax.main", "--flagfile=launch/demo.cfg", "--config.loss=nolos", f"--workdir={out}"], "nolos"),
      ("main: loss option it lacks", ["scoat_jax.main", "--flagfile=launch/demo.cfg", "--config.loss=dice", f"--workdir={out}"], "loss_kwargs"),
  ]


def _snapshot(root: pathlib.Path) -> dict:
  return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns)
          for p in sorted(root.rglob("*"))}


def test_the_table_has_every_command():
  names = [c[0] for c in _cases(pathlib.Path("/x"))]
  assert len(names) >= 30 and len(set(names)) == len(names)
  assert {n.split(":")[0] for n in names} == {"predict", "followup", "report", "build", "main"}


@pytest.mark.parametrize("index", range(len(_cases(pathlib.Path("/x")))),
                         ids=[c[0] for c in _cases(pathlib.Path("/x"))])
def test_bad_input(inputs, index):
  name, argv, expected = _cases(inputs, out=f"out{index}")[index]
  before = _snapshot(inputs)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # one device, as users run
  proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=300)
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
  # Besides the command's own progress lines (e.g. the devices it found) only the error line.
  assert len(errors) == 1 and "Traceback" not in proc.stderr, f"{name}:\n{proc.stderr[-3000:]}"
  assert expected in errors[0], f"{name}: {errors[0]}"
  assert _snapshot(inputs) == before, f"{name}: wrote into the input folder"
  assert not (inputs / f"out{index}").exists(), f"{name}: created the output folder"


def test_a_batch_too_large_for_memory_is_clamped_with_a_warning(caplog, monkeypatch):
  from scoat_jax import inference
  from scoat_jax.inference import predictor as predictor_lib
  # Free memory fixed at 4 GiB: the host's own changes between two reads when other
  # processes run, and with it the limit.
  monkeypatch.setattr(predictor_lib, "_free_bytes", lambda device: 4 << 30)
  model = inference.load_model(CKPT)
  limit = predictor_lib._max_batch_size([model], inference.Predictor([model]).mesh)
  assert limit is not None and limit >= 1
  p = inference.Predictor([model], batch_size=10 * limit)
  assert p.batch_size == limit and "would not fit in memory" in caplog.text


def test_verbosity_shows_the_traceback_behind_an_error(inputs, tmp_path):
  argv = ["scoat_jax.predict", f"--checkpoint={CKPT}", f"--input={inputs / 'nan.nii.gz'}",
          f"--output={tmp_path / 'o'}", "--verbosity=1"]
  proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=ROOT,
                        timeout=300)
  assert proc.returncode == 2 and "Traceback" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
