"""Inference: exact preprocessing and its inverse, streaming, ensembles/TTA against a plain
reference, mask geometry for NIfTI and DICOM input, report consistency, 2-D slices, and
every bad input giving one line and writing nothing."""
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from trained_checkpoint import SCAN_SHAPE, save_checkpoint, test_scan, write_rotated_nifti
from scoat_jax.inference import segment
from scoat_jax import inference
from scoat_jax.data import ct_io, dicom_writer, phantom, preprocess
from scoat_jax.data.intensity import normalize

# Shares the tiny trained checkpoint with the other inference tests (one worker).
pytestmark = pytest.mark.xdist_group("tiny_training")

REPO = pathlib.Path(__file__).resolve().parents[1]


def _files(folder):
  folder = pathlib.Path(folder)
  return sorted(p.name for p in folder.iterdir()) if folder.exists() else None


# ----------------------------------------------------------------------------- warp and stream

@pytest.fixture(scope="module")
def model(trained_workdir):
  return inference.load_model(trained_workdir)


@pytest.fixture(scope="module")
def shifted(shifted_workdir):
  return inference.load_model(shifted_workdir)


def test_checkpoint_from_workdir_checkpoints_folder_or_step(trained_workdir, model):
  step_dir = model.step_dir
  assert step_dir.parent == trained_workdir.absolute() / "checkpoints"
  for path in (trained_workdir / "checkpoints", step_dir):
    other = inference.load_model(path)
    assert other.step_dir == step_dir and other.step == model.step
    for a, b in zip(jax.tree_util.tree_leaves(other.variables), jax.tree_util.tree_leaves(model.variables)):
      np.testing.assert_array_equal(a, b)
  assert model.describe()["image_size"] == 32
  assert model.describe()["model_config"]["widths"] == [4, 8, 16, 32, 64]


@functools.lru_cache
def _jitted_apply(module):
  """One compiled eval-mode forward per model architecture (not one per call)."""
  return jax.jit(functools.partial(module.apply, train=False))


def _reference(models, image, *, tta=False):
  """Plain one-device prediction of one HU slice (no batching, sharding or streaming)."""
  total = 0.0
  for m in models:
    apply = _jitted_apply(m.model)
    x, _ = preprocess.prepare_slice(image, np.zeros(image.shape, np.uint8), source="hu",
                                        window=m.hu_window, size=m.image_size, num_classes=1)
    xs = [x[None, :, :, None]] + ([x[None, :, ::-1, None]] if tta else [])
    for k, xi in enumerate(xs):
      out = apply(m.variables, xi)
      p = np.asarray(jax.nn.sigmoid(out[-1] if isinstance(out, list) else out))[0, :, :, 0]
      total = total + (p[:, ::-1] if k else p)
  prob = total / (len(models) * (2 if tta else 1))
  return (prob > 0.5).astype(np.uint8), prob


def test_predict_matches_plain_reference_single_and_tta_ensemble(model, shifted):
  scan = test_scan()
  for models, tta in (([shifted], False), ([model, shifted], True)):
    labels, prob = inference.Predictor(models, tta=tta).predict_volume(scan.hu, with_probability=True)
    if not tta:
      assert 0.15 < labels.mean() < 0.6, "the shifted model should label part of the scan"
    for z in (0, 3, 7):
      ref_labels, ref_prob = _reference(models, scan.hu[z], tta=tta)
      np.testing.assert_allclose(prob[z], preprocess.unwarp(ref_prob.astype(np.float32),
                                                       SCAN_SHAPE[1:], order=1), atol=2e-5)
      # Labels are thresholded on the model grid and taken back by nearest neighbour
      # (pixels within float rounding of p = 0.5 may go either way).
      want = preprocess.unwarp(ref_labels, SCAN_SHAPE[1:], order=0)
      tie = preprocess.unwarp((np.abs(ref_prob - 0.5) < 1e-4).astype(np.uint8), SCAN_SHAPE[1:],
                         order=0) > 0
      np.testing.assert_array_equal(labels[z][~tie], want[~tie])


def test_predict_slices_streams_with_bounded_memory(shifted):
  predictor = inference.Predictor([shifted])
  scan = test_scan()
  pulled = []

  def slices():
    for k in range(40):
      pulled.append(k)
      yield scan.hu[k % scan.hu.shape[0]]

  in_flight = []
  results = []
  for out in predictor.predict_slices(slices()):
    results.append(out)
    in_flight.append(len(pulled) - len(results))
  assert len(results) == 40
  # At most two batches are held at once, whatever the scan length.
  assert max(in_flight) <= 2 * predictor.batch_size
  labels, _ = predictor.predict_volume(scan.hu)
  for k in range(scan.hu.shape[0]):
    np.testing.assert_array_equal(results[k][0], labels[k])
    np.testing.assert_array_equal(results[k + scan.hu.shape[0]][0], labels[k])


# ----------------------------------------------------------------------------- volumes

@pytest.fixture(scope="module")
def scans(tmp_path_factory):
  """One phantom scan as an oblique NIfTI and as a DICOM series."""
  root = tmp_path_factory.mktemp("scans")
  scan = test_scan()
  write_rotated_nifti(scan, root / "oblique.nii.gz")
  dicom_writer.write_dicom_series(scan.hu, scan.geometry, root / "series", patient_id="P1",
                           study_date="20200311")
  return root, scan


def test_masks_keep_the_input_geometry_nifti_and_dicom(shifted_workdir, scans, tmp_path):
  root, scan = scans
  for name, source in (("oblique", root / "oblique.nii.gz"), ("series", root / "series")):
    out = tmp_path / name
    # The tiny model marks body as much as lung: without the lung rule its mask has volume.
    [report] = segment.run([str(shifted_workdir)], str(source), str(out), save_probabilities=True,
                           progress=False, lung_rule=False)
    want = ct_io.read_ct(source).geometry
    for kind in ("mask", "probability"):
      image = sitk.ReadImage(str(out / f"{name}_{kind}.nii.gz"))
      got = ct_io.Geometry.from_image(image)
      assert got.size == want.size
      np.testing.assert_allclose(got.spacing, want.spacing, rtol=1e-6)
      np.testing.assert_allclose(got.origin, want.origin, atol=1e-4)
      np.testing.assert_allclose(got.direction, want.direction, atol=1e-6)
    mask = ct_io.read_mask(out / f"{name}_mask.nii.gz", like=want, allowed=(0, 1))
    prob = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{name}_probability.nii.gz")))
    assert mask.shape == SCAN_SHAPE and prob.dtype == np.float32
    assert 0.15 < mask.mean() < 0.6
    # Labels come from the model grid, P(opacity) is interpolated: they agree nearly everywhere.
    assert np.mean((prob > 0.5) == (mask > 0)) > 0.9
    # The report is consistent with the mask file.
    assert report == json.loads((out / f"{name}_report.json").read_text(encoding="utf-8"))
    vv = float(np.prod(want.spacing)) / 1000
    assert report["opacity_voxels"] == int(mask.sum())
    assert report["lov_ml"] == pytest.approx(mask.sum() * vv, rel=1e-9)
    assert report["poi_percent"] == pytest.approx(100 * report["lov_ml"] / report["lung_volume_ml"])
    assert sum(l["voxels"] for l in report["lesions"]) == mask.sum() == report["opacity_voxels"]
    assert report["checkpoints"][0]["checkpoint"].startswith(str(shifted_workdir))
    if name == "series":
      assert report["dicom"]["study_date"] == "20200311"
    # Results are as readable as the user's other files (not private like a mkstemp file).
    umask = os.umask(0o22)
    os.umask(umask)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(0o666 & ~umask)}
  # The DICOM series and the NIfTI hold the same voxels (in different places): same labels.
  a = ct_io.read_mask(tmp_path / "oblique" / "oblique_mask.nii.gz", allowed=(0, 1))
  b = ct_io.read_mask(tmp_path / "series" / "series_mask.nii.gz", allowed=(0, 1))
  np.testing.assert_array_equal(a, b)


def test_folder_of_png_slices(shifted_workdir, tmp_path):
  scan = test_scan()
  src = tmp_path / "data" / "Imgs"
  src.mkdir(parents=True)
  sizes = {}
  for k, (z, crop) in enumerate(((2, np.s_[:, :]), (4, np.s_[3:37, 5:30]))):
    grey = np.rint(normalize(scan.hu[z][crop], "hu") * 255).astype(np.uint8)
    Image.fromarray(grey).save(src / f"{k}.png")
    sizes[str(k)] = grey.shape
  reports = segment.run([str(shifted_workdir)], str(tmp_path / "data"), str(tmp_path / "out"),
                        progress=False, save_probabilities=True)
  assert [r["name"] for r in reports] == ["0", "1"]
  for r in reports:
    mask = np.asarray(Image.open(tmp_path / "out" / f"{r['name']}_mask.png"))
    assert mask.shape == sizes[r["name"]] and set(np.unique(mask)) <= {0, 1}
    assert r["opacity_pixels"] == int(mask.sum()) and r["lov_ml"] is None
    prob = np.asarray(Image.open(tmp_path / "out" / f"{r['name']}_probability.png"))
    assert prob.shape == mask.shape


# ----------------------------------------------------------------------------- bad inputs

def _bad_checkpoints(model, root):
  """Checkpoints that must be refused: 3-channel weights, other widths, no config."""
  config = model.meta["config"]
  three = {k: {**v} for k, v in model.variables.items()}
  three["params"] = {**three["params"]}
  node = {**three["params"]["x_0_0"]}
  for part in ("conv1", "shortcut_conv"):
    layer = dict(node[part])
    layer["kernel"] = np.repeat(layer["kernel"], 3, axis=2)
    node[part] = layer
  three["params"]["x_0_0"] = node
  wide = json.loads(json.dumps(config))
  wide["model"]["widths"] = [8, 16, 32, 64, 128]
  return {
      "3-channel": (save_checkpoint(root / "three", three, config), r"x_0_0/conv1/kernel has shape \(3, 3, 3, 4\)"),
      "widths": (save_checkpoint(root / "wide", model.variables, wide), r"another model or shape"),
      "no config": (save_checkpoint(root / "noconf", model.variables, {"model": "x"}), r"does not describe a model"),
      "not a checkpoint": (root, "no such checkpoint|holds no saved step"),
  }


def test_bad_inputs_one_line_and_nothing_written(model, shifted_workdir, scans, tmp_path):
  root, scan = scans
  good = str(root / "oblique.nii.gz")
  bad = tmp_path / "bad"
  bad.mkdir()
  ct_io.write_ct(np.clip(scan.hu, 0, 255).astype(np.uint8), scan.geometry, bad / "photo.nii.gz")
  Image.fromarray(np.zeros((40, 56), np.uint8)).save(bad / "slice.png")
  sitk.WriteImage(sitk.GetImageFromArray(scan.hu[2]), str(bad / "flat.nii.gz"))
  data = (root / "oblique.nii.gz").read_bytes()
  (bad / "corrupt.nii.gz").write_bytes(data[: len(data) // 2])
  for suffix in (".nii", ".mha"):   # ITK reads a truncated .nii silently; we must not
    ct_io.write_ct(scan.hu, scan.geometry, bad / f"whole{suffix}", compress=False)
    data = (bad / f"whole{suffix}").read_bytes()
    (bad / f"cut{suffix}").write_bytes(data[: len(data) - 100])
  colour = bad / "colour"
  colour.mkdir()
  rgb = np.zeros((40, 56, 3), np.uint8)
  rgb[..., 0] = 200
  Image.fromarray(rgb).save(colour / "a.png")
  cases = {
      "non-CT values": (str(bad / "photo.nii.gz"), "0..255", [shifted_workdir]),
      "2-D file": (str(bad / "slice.png"), "2-D image given as a scan", [shifted_workdir]),
      "2-D volume": (str(bad / "flat.nii.gz"), "is 2-D", [shifted_workdir]),
      "corrupt": (str(bad / "corrupt.nii.gz"), "corrupt or truncated", [shifted_workdir]),
      "truncated nii": (str(bad / "cut.nii"), "truncated file", [shifted_workdir]),
      "truncated mha": (str(bad / "cut.mha"), "unreadable or corrupt", [shifted_workdir]),
      "colour": (str(colour), "colour image", [shifted_workdir]),
      "missing": (str(bad / "nope.nii.gz"), "no such file", [shifted_workdir]),
  }
  for name, (ckpt, match) in _bad_checkpoints(model, tmp_path / "ckpts").items():
    cases[f"checkpoint {name}"] = (good, match, [ckpt])
  cases["same checkpoint twice"] = (good, "same checkpoint", [shifted_workdir, shifted_workdir])
  for name, (source, match, ckpts) in cases.items():
    out = tmp_path / "out" / name.replace(" ", "_")
    with pytest.raises(ValueError, match=match) as err:
      segment.run([str(c) for c in ckpts], source, str(out), progress=False)
    assert "\n" not in str(err.value), name
    assert not out.exists(), f"{name}: wrote {_files(out)}"
  # An output folder with earlier results is refused, untouched, unless --overwrite.
  out = tmp_path / "done"
  segment.run([str(shifted_workdir)], good, str(out), progress=False)
  before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
  with pytest.raises(ValueError, match="holds earlier results.*--overwrite"):
    segment.run([str(shifted_workdir)], good, str(out), progress=False)
  assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
  segment.run([str(shifted_workdir)], good, str(out), progress=False, overwrite=True)
  assert sorted(before) == _files(out)


def test_cli_error_is_one_line_and_success_writes_outputs(shifted_workdir, scans, tmp_path):
  root, _ = scans
  run = dict(cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
             encoding="utf-8", timeout=300)
  base = [sys.executable, "-m", "scoat_jax.predict", f"--checkpoint={shifted_workdir}",
          f"--compilation_cache_dir={jax.config.jax_compilation_cache_dir}"]
  bad = subprocess.run(base + [f"--input={root / 'missing.nii.gz'}", f"--output={tmp_path / 'o1'}"],
                       **run)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith("error: ")
  assert len([l for l in bad.stderr.splitlines() if l.startswith("error")]) == 1
  assert not (tmp_path / "o1").exists()
  ok = subprocess.run(base + [f"--input={root / 'series'}", f"--output={tmp_path / 'o2'}",
                              "--save_attention", "--attention_slices=1,4"], **run)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert _files(tmp_path / "o2") == ["predictions.csv", "series_attention_z0001.png",
                                     "series_attention_z0004.png", "series_mask.nii.gz",
                                     "series_report.json", "series_report.pdf",
                                     "series_report.png"]


# ----------------------------------------------------------------------------- demo checkpoint

DEMO = os.environ.get("SCOAT_JAX_DEMO_CHECKPOINT")


@pytest.mark.skipif(not DEMO, reason="set SCOAT_JAX_DEMO_CHECKPOINT to a workdir trained with "
                    "--flagfile=launch/demo.cfg to check LOV against the phantom's true volume")
def test_demo_checkpoint_lov_within_10_percent(tmp_path):
  # Scans of an unseen cohort seed with sizeable lesions (small ones make a ratio noisy).
  checked = 0
  for patient in range(4):
    scan = phantom.generate_scan(1, patient, 1)
    if scan.lesion_volume_ml < 20:
      continue
    path = tmp_path / f"p{patient}.nii.gz"
    ct_io.write_ct(scan.hu, scan.geometry, path)
    [report] = segment.run([DEMO], str(path), str(tmp_path / f"out{patient}"), progress=False)
    assert report["lov_ml"] == pytest.approx(scan.lesion_volume_ml, rel=0.10), patient
    assert report["lung_volume_ml"] == pytest.approx(scan.lung_volume_ml, rel=0.05), patient
    checked += 1
  assert checked >= 2
