"""Tests of the synthetic chest CT phantom (scoat_jax.data.phantom)."""
import csv
import datetime
import subprocess
import sys
import time

import numpy as np
import pytest

from scoat_jax.data import ct_io, phantom

SMALL = (16, 64, 64)


@pytest.fixture(scope="module")
def default_scans():
  """Patient 2 of seed 0 (GGO and consolidation at every time point) at the default shape."""
  return [phantom.generate_scan(0, 2, t) for t in range(3)]


def test_default_scan_types_shapes_and_timing():
  phantom.generate_scan(0, 0, 0)  # warm-up
  start = time.perf_counter()
  scan = phantom.generate_scan(0, 1, 1)
  elapsed = time.perf_counter() - start
  print(f"\ngenerate_scan at the default shape {phantom.DEFAULT_SHAPE}: {elapsed:.3f} s")
  assert scan.hu.shape == phantom.DEFAULT_SHAPE and scan.hu.dtype == np.int16
  assert scan.label.dtype == np.uint8 and scan.lung.dtype == bool
  assert scan.geometry.shape == phantom.DEFAULT_SHAPE
  np.testing.assert_allclose(scan.geometry.spacing, (1.4, 1.4, 5.0))
  np.testing.assert_allclose(phantom.DEFAULT_SPACING, (1.4, 1.4, 5.0))
  assert scan.patient_id == "phantom-0-001" and scan.timepoint == 1


def test_deterministic_per_seed_patient_timepoint():
  a = phantom.generate_scan(3, 1, 2, shape=SMALL)
  b = phantom.generate_scan(3, 1, 2, shape=SMALL)
  for field in ("hu", "label", "lung"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  assert (a.lesion_volume_ml, a.study_date) == (b.lesion_volume_ml, b.study_date)
  other_seed = phantom.generate_scan(4, 1, 2, shape=SMALL)
  assert not np.array_equal(a.hu, other_seed.hu) and not np.array_equal(a.lung, other_seed.lung)
  other_patient = phantom.generate_scan(3, 2, 2, shape=SMALL)
  assert not np.array_equal(a.lung, other_patient.lung)


def test_anatomy_fixed_lesions_and_noise_change_over_time():
  scans = [phantom.generate_scan(0, 3, t, shape=(24, 128, 128)) for t in range(3)]
  for s in scans[1:]:
    np.testing.assert_array_equal(s.lung, scans[0].lung)  # same patient, same lungs
    assert s.lung_volume_ml == scans[0].lung_volume_ml
  volumes = [s.lesion_volume_ml for s in scans]
  assert len(set(volumes)) == 3, volumes
  # The same lesions grow or shrink: the smaller lesion set lies mostly inside the larger.
  small, large = sorted(scans, key=lambda s: s.lesion_volume_ml)[::2]
  a, b = small.label > 0, large.label > 0
  assert (a & b).sum() >= 0.8 * a.sum()
  assert not np.array_equal(scans[0].hu[0], scans[1].hu[0])  # fresh noise per scan


def test_lesion_volume_rises_then_falls_for_some_patients():
  shapes = []
  for p in range(8):
    v = [phantom.generate_scan(0, p, t, shape=SMALL).lesion_volume_ml for t in range(3)]
    shapes.append(v[1] > v[0] and v[1] > v[2])
  assert sum(shapes) >= 2, shapes


def test_recorded_volumes_equal_voxel_counts(default_scans):
  for s in default_scans:
    vv = float(np.prod(s.geometry.spacing)) / 1000.0
    assert s.lesion_volume_ml == pytest.approx(np.count_nonzero(s.label) * vv, rel=1e-12)
    assert s.lung_volume_ml == pytest.approx(np.count_nonzero(s.lung) * vv, rel=1e-12)
    assert 2000 < s.lung_volume_ml < 6000  # plausible adult lungs, in ml
    assert s.lesion_volume_ml > 0


def test_lesions_only_inside_lungs_and_labels_valid(default_scans):
  for s in default_scans:
    assert set(np.unique(s.label).tolist()) <= {0, 1, 2}
    assert not np.any((s.label > 0) & ~s.lung)
  assert any((s.label == 2).any() for s in default_scans)


def test_hu_ranges_noise_free():
  s = phantom.generate_scan(0, 2, 2, noise_sd=0.0)
  ggo, cons = s.hu[s.label == 1], s.hu[s.label == 2]
  assert ggo.size > 1000 and cons.size > 100
  assert cons.min() >= -100 and cons.max() <= 50
  # Vessels stay visible through GGO, so a few GGO voxels are brighter than -300.
  assert ggo.min() >= -750
  assert np.mean((ggo >= -750) & (ggo <= -300)) >= 0.9
  assert -700 <= np.median(ggo) <= -350
  healthy = s.hu[s.lung & (s.label == 0)]
  assert -900 <= np.median(healthy) <= -820
  assert s.hu[0, 0, 0] == -1000  # air outside the body
  assert s.hu.max() >= 700  # ribs and spine
  mid = s.hu[s.hu.shape[0] // 2]
  assert np.mean((mid > -150) & (mid < -50)) > 0.02  # fat layer


def test_noise_level():
  clean = phantom.generate_scan(1, 0, 0, shape=SMALL, noise_sd=0.0)
  noisy = phantom.generate_scan(1, 0, 0, shape=SMALL)
  diff = noisy.hu.astype(np.float64) - clean.hu
  inside = (clean.hu > -1000) & (clean.hu < 1000)  # away from the clipping at -1024
  assert np.std(diff[inside]) == pytest.approx(phantom.DEFAULT_NOISE_SD, rel=0.1)
  np.testing.assert_array_equal(clean.label, noisy.label)


def test_study_dates_weekly():
  dates = [
      datetime.datetime.strptime(phantom.generate_scan(0, 5, t, shape=SMALL).study_date, "%Y%m%d")
      for t in range(3)
  ]
  assert [(b - a).days for a, b in zip(dates, dates[1:])] == [7, 7]


def test_generate_cohort_order_and_arguments():
  scans = list(phantom.generate_cohort(0, 2, 2, shape=SMALL))
  assert [(s.patient_id, s.timepoint) for s in scans] == [
      ("phantom-0-000", 0), ("phantom-0-000", 1), ("phantom-0-001", 0), ("phantom-0-001", 1)
  ]
  with pytest.raises(phantom.PhantomError, match="num_patients"):
    list(phantom.generate_cohort(0, 0, 2))
  with pytest.raises(phantom.PhantomError, match="shape"):
    phantom.generate_scan(0, 0, 0, shape=(16, 64))
  with pytest.raises(phantom.PhantomError, match="spacing"):
    phantom.generate_scan(0, 0, 0, spacing=(1.0, -1.0, 5.0))
  with pytest.raises(phantom.PhantomError, match="timepoint"):
    phantom.generate_scan(0, 0, -1)


@pytest.mark.parametrize("fmt", ["nifti", "mha", "dicom"])
def test_write_scan_round_trip(tmp_path, fmt):
  scan = phantom.generate_scan(0, 1, 0, shape=SMALL)
  paths = phantom.write_scan(scan, tmp_path, fmt=fmt)
  ct = ct_io.read_ct(paths["image"])
  np.testing.assert_array_equal(ct.hu, scan.hu)
  assert ct.geometry.same_as(scan.geometry)
  np.testing.assert_array_equal(ct_io.read_mask(paths["label"], like=ct.geometry), scan.label)
  np.testing.assert_array_equal(ct_io.read_mask(paths["lung"], like=ct.geometry, allowed=(0, 1)),
                                scan.lung)
  if fmt == "dicom":
    assert paths["image"].is_dir() and ct.metadata["study_date"] == scan.study_date
  with pytest.raises(phantom.PhantomError, match="already exists"):
    phantom.write_scan(scan, tmp_path, fmt=fmt)
  phantom.write_scan(scan, tmp_path, fmt=fmt, overwrite=True)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "scoat_jax.data.phantom", *args],
                        capture_output=True, text=True, timeout=120)


def test_cli_writes_cohort_and_refuses_overwrite(tmp_path):
  out = tmp_path / "cohort"
  args = [
      "--out",
      str(out), "--patients", "1", "--timepoints", "2", "--shape", "16,64,64", "--format", "nrrd"
  ]
  first = _cli(*args)
  assert first.returncode == 0, first.stderr
  with open(out / "cohort.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["timepoint"] for r in rows] == ["0", "1"]
  for r in rows:
    scan = phantom.generate_scan(0, 0, int(r["timepoint"]), shape=SMALL)
    assert r["patient_id"] == scan.patient_id and r["date"] == scan.study_date
    assert float(r["lesion_volume_ml"]) == pytest.approx(scan.lesion_volume_ml, abs=1e-3)
    assert float(r["lung_volume_ml"]) == pytest.approx(scan.lung_volume_ml, abs=1e-3)
    np.testing.assert_array_equal(ct_io.read_ct(out / r["path"]).hu, scan.hu)
    assert (out / r["label_path"]).exists() and (out / r["lung_path"]).exists()
  before = sorted(p.name for p in out.iterdir())
  again = _cli(*args)
  assert again.returncode == 2
  [line] = again.stderr.strip().splitlines()
  assert line.startswith("error: ") and "--overwrite" in line
  assert sorted(p.name for p in out.iterdir()) == before
  assert _cli(*args, "--overwrite").returncode == 0
  bad = _cli(f"--out={tmp_path / 'bad'}", "--shape=8,x,32")
  assert bad.returncode == 2 and bad.stderr.startswith("error: --shape=8,x,32")
  assert not (tmp_path / "bad").exists()


def test_cli_as_module(tmp_path):
  out = tmp_path / "c"
  result = subprocess.run([
      sys.executable, "-m", "scoat_jax.data.phantom", f"--out={out}", "--patients=1",
      "--timepoints=1", "--shape=8,32,32", "--format=dicom"
  ],
                          capture_output=True,
                          text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr
  assert (out / "cohort.csv").exists() and (out / "phantom-0-000_t0_ct").is_dir()
