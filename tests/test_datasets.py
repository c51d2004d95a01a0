"""TFDS slice datasets: exact contents, label maps, slice filters, and every bad input."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import tensorflow_datasets as tfds

from conftest import SEMISEG_DIR
from scoat_jax import datasets
from scoat_jax.data import ct_io
from scoat_jax.datasets import base, build
from scoat_jax.data.lung_mask import lung_mask

tfds.disable_progress_bar()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(name, data_dir):
  ds = datasets.open_source(name, str(data_dir))
  return ds, [ds.source[i] for i in range(ds.num_records)]


def _leftovers(data_dir):
  return sorted(os.path.relpath(os.path.join(r, f), data_dir)
                for r, ds, fs in os.walk(data_dir) for f in fs + ds) if os.path.exists(data_dir) else []


# ----------------------------------------------------------------------------- covid_semiseg

@pytest.mark.skipif(not SEMISEG_DIR.is_dir(), reason=f"real COVID-SemiSeg slices not found at {SEMISEG_DIR}")
def test_covid_semiseg_real_slices(tmp_path):
  from PIL import Image
  full = build.build("covid_semiseg", str(tmp_path), str(SEMISEG_DIR))
  assert full == "covid_semiseg"
  ds, recs = _records(full, tmp_path)
  assert ds.num_records == 50 and ds.intensity == "uint8" and not ds.has_lung
  assert len(ds.case_ids()) == 50
  stems = sorted((p.stem for p in (SEMISEG_DIR / "Imgs").glob("*.jpg")), key=int)
  assert [r["case_id"].decode() for r in recs] == stems          # slice-number order
  for r in recs:
    stem = r["case_id"].decode()
    image = np.asarray(Image.open(SEMISEG_DIR / "Imgs" / f"{stem}.jpg"))
    mask = np.asarray(Image.open(SEMISEG_DIR / "GT" / f"{stem}.png"))
    assert r["image"].dtype == np.uint8 and np.array_equal(r["image"], image)
    assert np.array_equal(r["mask"], mask) and set(np.unique(r["mask"])) <= {0, 1, 2}
    assert r["slice_index"] == int(stem) and np.array_equal(r["spacing"], np.zeros(3, np.float32))
  # Index flags agree with the masks.
  assert [int(s.flags[0]) for s in ds.scans] == [2 * int(r["mask"].any()) for r in recs]
  # Plain TFDS access works too once the package is imported.
  src = tfds.data_source("covid_semiseg", data_dir=str(tmp_path), download=False)["train"]
  assert len(src) == 50


def _semiseg_folder(root, sizes=((20, 16), (12, 18))):
  from PIL import Image
  rng = np.random.default_rng(0)
  (root / "Imgs").mkdir(parents=True)
  (root / "GT").mkdir()
  for k, (h, w) in enumerate(sizes):
    Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(root / "Imgs" / f"{k}.jpg")
    m = Image.fromarray(rng.integers(0, 3, (h, w), dtype=np.uint8), mode="P")
    m.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    m.save(root / "GT" / f"{k}.png")
  return root


def _expect_error(tmp_path, name, manual, match, **opts):
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=match):
    build.build(name, str(out), None if manual is None else str(manual), **opts)
  assert _leftovers(out) == [], "a failed build left files behind"


def test_covid_semiseg_bad_inputs(tmp_path):
  from PIL import Image
  _expect_error(tmp_path, "covid_semiseg", tmp_path / "nope", r"--manual_dir=.*nope is not a folder")
  _expect_error(tmp_path, "covid_semiseg", None, r"needs --manual_dir")
  empty = tmp_path / "empty"
  (empty / "Imgs").mkdir(parents=True)
  (empty / "GT").mkdir()
  _expect_error(tmp_path, "covid_semiseg", empty, r"Imgs holds no .jpg/.png image")
  _expect_error(tmp_path, "covid_semiseg", tmp_path, r"Imgs is missing")

  d = _semiseg_folder(tmp_path / "a")
  (d / "GT" / "1.png").unlink()
  _expect_error(tmp_path, "covid_semiseg", d, r"1\.jpg has no mask .*GT/1\.png")

  d = _semiseg_folder(tmp_path / "b")
  Image.fromarray(np.zeros((5, 5), np.uint8), mode="P").save(d / "GT" / "1.png")
  _expect_error(tmp_path, "covid_semiseg", d, r"GT/1\.png: mask is 5x5 but its image .* is 18x12")

  d = _semiseg_folder(tmp_path / "c")
  (d / "Imgs" / "0.jpg").write_bytes(b"not a jpeg at all")
  _expect_error(tmp_path, "covid_semiseg", d, r"0\.jpg: cannot decode this image .*replace the corrupt")

  d = _semiseg_folder(tmp_path / "d")
  Image.fromarray(np.full((12, 18), 255, np.uint8)).save(d / "GT" / "1.png")
  _expect_error(tmp_path, "covid_semiseg", d, r"mask values \[255\] are not in")


def test_overwrite_replaces_only_a_complete_build(tmp_path):
  from PIL import Image
  d = _semiseg_folder(tmp_path / "in", sizes=((20, 16), (12, 18), (10, 10)))
  out = str(tmp_path / "out")
  build.build("covid_semiseg", out, str(d))
  (d / "Imgs" / "2.jpg").write_bytes(b"corrupt")
  with pytest.raises(datasets.DatasetError, match="cannot decode"):
    build.build("covid_semiseg", out, str(d), overwrite=True)
  assert datasets.open_source("covid_semiseg", out).num_records == 3      # old copy intact
  assert not [p for p in _leftovers(out) if "incomplete" in p]
  (d / "Imgs" / "2.jpg").unlink()
  (d / "GT" / "2.png").unlink()
  build.build("covid_semiseg", out, str(d))                              # exists: no-op
  assert datasets.open_source("covid_semiseg", out).num_records == 3
  build.build("covid_semiseg", out, str(d), overwrite=True)
  ds = datasets.open_source("covid_semiseg", out)
  assert ds.num_records == 2
  assert np.array_equal(ds.source[1]["image"], np.asarray(Image.open(d / "Imgs" / "1.jpg")))


def test_cli_exit_status_and_not_built_message(tmp_path):
  out = tmp_path / "data"
  proc = subprocess.run([sys.executable, "-m", "scoat_jax.datasets.build", "covid_semiseg",
                         f"--manual_dir={tmp_path / 'missing'}", f"--data_dir={out}"],
                        capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f"error: --manual_dir={tmp_path / 'missing'} is not a folder; pass the folder holding the input "
      "files (--manual_dir=<folder with Imgs/ and GT/>)"]
  with pytest.raises(datasets.DatasetNotBuiltError) as e:
    datasets.open_source("ct_volumes/medseg_lung", str(out))
  assert str(e.value).endswith(
      "build it with: python -m scoat_jax.datasets.build ct_volumes/medseg_lung "
      f"--manual_dir=<folder with imagesTr/ and labelsTr/> --data_dir={out}")
  with pytest.raises(datasets.DatasetError, match="unknown dataset 'mnist_x'"):
    datasets.open_source("mnist_x", str(out))
  with pytest.raises(datasets.DatasetError, match="unknown config 'nope' of ct_volumes"):
    datasets.open_source("ct_volumes/nope", str(out))


# ----------------------------------------------------------------------------- ct_volumes

SHAPE = (6, 24, 20)            # z, y, x
SPACING = (0.8, 0.7, 2.5)      # x, y, z


def _volume(seed):
  """A tiny chest: air, a body ellipse, two lungs; labels 1/2 in the left lung."""
  z, y, x = np.mgrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
  hu = np.full(SHAPE, -1000, np.int16)
  body = ((y - 12) / 11) ** 2 + ((x - 10) / 9.5) ** 2 < 1
  hu[body] = 40
  left = ((y - 12) / 7) ** 2 + ((x - 6) / 3) ** 2 < 1
  right = ((y - 12) / 7) ** 2 + ((x - 14) / 3) ** 2 < 1
  hu[(left | right) & (z >= 1) & (z <= 4)] = -850
  label = np.zeros(SHAPE, np.uint8)
  lesion = left & (z >= 2 + seed % 2) & (z <= 3 + seed % 2) & (y < 12)
  label[lesion] = 1
  label[lesion & (x == 6)] = 2
  hu[lesion] = -500
  return hu, label, (left | right) & (z >= 1) & (z <= 4)


def _msd(root, labels, *, channel_suffix=True):
  (root / "imagesTr").mkdir(parents=True)
  (root / "labelsTr").mkdir()
  geom = ct_io.Geometry.for_array(SHAPE, SPACING)
  for case, label in labels.items():
    hu, _, _ = _volume(int(case[-1]))
    ct_io.write_ct(hu, geom, root / "imagesTr" / f"{case}{'_0000' if channel_suffix else ''}.nii.gz")
    ct_io.write_mask(label, geom, root / "labelsTr" / f"{case}.nii.gz")
  return root


def test_ct_volumes_default_and_opacity(tmp_path):
  vols = {f"case{i}": _volume(i) for i in range(3)}
  manual = _msd(tmp_path / "msd", {c: v[1] for c, v in vols.items()})
  full = build.build("ct_volumes", str(tmp_path / "d"), str(manual))
  assert full == "ct_volumes/default"
  ds, recs = _records(full, tmp_path / "d")
  assert ds.intensity == "hu" and ds.has_lung and ds.num_records == 3 * SHAPE[0]
  assert [s.scan_id for s in ds.scans] == ["case0", "case1", "case2"]
  lungs = {c: lung_mask(v[0], SPACING) for c, v in vols.items()}   # no lung labels: computed
  for r in recs:
    hu, label, _ = vols[r["case_id"].decode()]
    z = int(r["slice_index"])
    assert r["image"].dtype == np.int16 and np.array_equal(r["image"], hu[z])
    assert np.array_equal(r["mask"], label[z])
    assert r["lung"].dtype == np.uint8 and np.array_equal(r["lung"], lungs[r["case_id"].decode()][z])
    np.testing.assert_allclose(r["spacing"], SPACING, rtol=1e-6)
  assert [int(r["slice_index"]) for r in recs[:SHAPE[0]]] == list(range(SHAPE[0]))

  full = build.build("ct_volumes", str(tmp_path / "d"), str(manual), slices="opacity")
  assert full == "ct_volumes/default_opacity"
  ds, recs = _records(full, tmp_path / "d")
  expected = [(c, z) for c, v in vols.items() for z in range(SHAPE[0]) if v[1][z].any()]
  assert [(r["case_id"].decode(), int(r["slice_index"])) for r in recs] == expected
  assert all(s.flags.tolist() and all(f & base.FLAG_OPACITY for f in s.flags) for s in ds.scans)


def test_ct_volumes_label_maps_and_lung_filter(tmp_path):
  vols = {f"case{i}": _volume(i) for i in range(2)}
  ma = {}
  for c, (_, label, lung) in vols.items():
    m = np.zeros(SHAPE, np.uint8)
    m[lung & (np.arange(SHAPE[2]) < 10)] = 1          # left lung
    m[lung & (np.arange(SHAPE[2]) >= 10)] = 2         # right lung
    m[label > 0] = 3                                  # infection
    ma[c] = m
  manual = _msd(tmp_path / "ma", ma, channel_suffix=False)
  full = build.build("ct_volumes/ma2020", str(tmp_path / "d"), str(manual), slices="lung")
  assert full == "ct_volumes/ma2020_lung"
  ds, recs = _records(full, tmp_path / "d")
  assert ds.metadata["label_map"] == "ma2020"
  expected = [(c, z) for c, v in vols.items() for z in range(SHAPE[0]) if v[2][z].any()]
  assert [(r["case_id"].decode(), int(r["slice_index"])) for r in recs] == expected
  for r in recs:
    src = ma[r["case_id"].decode()][int(r["slice_index"])]
    assert np.array_equal(r["mask"], (src == 3).astype(np.uint8))
    assert np.array_equal(r["lung"], (src > 0).astype(np.uint8))

  # medseg: 3 (pleural effusion) -> 0, GGO/consolidation kept.
  med = {c: np.where(np.arange(SHAPE[2]) == 0, 3, v[1]).astype(np.uint8) for c, v in vols.items()}
  manual = _msd(tmp_path / "med", med)
  full = build.build("ct_volumes/medseg", str(tmp_path / "d"), str(manual))
  _, recs = _records(full, tmp_path / "d")
  for r in recs:
    assert np.array_equal(r["mask"], vols[r["case_id"].decode()][1][int(r["slice_index"])])
  # The same volumes under the default map: 3 is an error that names the fix.
  _expect_error(tmp_path, "ct_volumes", manual,
                r"case0\.nii\.gz: label values \[3\] are not in the 'default' label map \[0, 1, 2\]; "
                r"pick another \(--label_map=ma2020\|medseg\)")
  with pytest.raises(datasets.DatasetError, match=r"--label_map=foo is unknown"):
    build.build("ct_volumes", str(tmp_path / "d"), str(manual), label_map="foo")


def test_ct_volumes_bad_inputs(tmp_path):
  labels = {f"case{i}": _volume(i)[1] for i in range(2)}
  _expect_error(tmp_path, "ct_volumes", None, r"needs --manual_dir=<folder with imagesTr/")
  empty = tmp_path / "empty"
  (empty / "imagesTr").mkdir(parents=True)
  (empty / "labelsTr").mkdir()
  _expect_error(tmp_path, "ct_volumes", empty, r"imagesTr holds no volume")
  _expect_error(tmp_path, "ct_volumes", tmp_path / "empty" / "imagesTr", r"imagesTr/imagesTr is missing")

  d = _msd(tmp_path / "a", labels)
  (d / "labelsTr" / "case1.nii.gz").unlink()
  _expect_error(tmp_path, "ct_volumes", d, r"case1_0000\.nii\.gz has no label volume .*labelsTr/case1\.nii\.gz")

  d = _msd(tmp_path / "b", labels)
  ct_io.write_mask(np.zeros((6, 24, 19), np.uint8), ct_io.Geometry.for_array((6, 24, 19), SPACING),
                   d / "labelsTr" / "case1.nii.gz")
  _expect_error(tmp_path, "ct_volumes", d, r"case1\.nii\.gz: mask geometry .* differs from its image")

  d = _msd(tmp_path / "c", labels)
  sitk.WriteImage(sitk.GetImageFromArray(np.full((24, 20), -1000, np.int16)),
                  str(d / "imagesTr" / "case0_0000.nii.gz"))
  _expect_error(tmp_path, "ct_volumes", d, r"case0_0000\.nii\.gz: is 2-D .*must be a 3-D volume")

  d = _msd(tmp_path / "e", labels)
  (d / "imagesTr" / "case1_0000.nii.gz").write_bytes(b"\x1f\x8b garbage")
  _expect_error(tmp_path, "ct_volumes", d, r"case1_0000\.nii\.gz: corrupt or truncated file")

  d = _msd(tmp_path / "f", {c: np.zeros(SHAPE, np.uint8) for c in labels})
  _expect_error(tmp_path, "ct_volumes", d, r"ct_volumes/default_opacity: no slice was kept; check the "
                r"input folder and the --slices filter", slices="opacity")


# ----------------------------------------------------------------------------- ct_phantom

def test_ct_phantom_small_cohort(tmp_path):
  t0 = time.perf_counter()
  full = build.build("ct_phantom/small", str(tmp_path))
  elapsed = time.perf_counter() - t0
  assert elapsed < 60
  ds, recs = _records(full, tmp_path)
  cfg = datasets.CtPhantom.builder_configs["small"]
  assert len(ds.case_ids()) == cfg.patients
  assert len(ds.scans) == cfg.patients * cfg.timepoints
  assert ds.num_records == len(ds.scans) * cfg.shape[0] and ds.has_lung
  for scan in ds.scans:
    rs = recs[scan.start:scan.start + scan.count]
    assert {r["case_id"].decode() for r in rs} == {scan.case_id}
    assert {r["scan_id"].decode() for r in rs} == {scan.scan_id}
    assert scan.scan_id == f"{scan.case_id}_t{scan.extra['timepoint']}"
    voxel_ml = float(np.prod(rs[0]["spacing"].astype(np.float64))) / 1000
    lesion = sum(int(np.count_nonzero(r["mask"])) for r in rs) * voxel_ml
    lung = sum(int(np.count_nonzero(r["lung"])) for r in rs) * voxel_ml
    assert scan.extra["lesion_volume_ml"] == pytest.approx(lesion, rel=1e-5, abs=1e-9)
    assert scan.extra["lung_volume_ml"] == pytest.approx(lung, rel=1e-5, abs=1e-9)
    assert set(np.unique(np.concatenate([r["mask"].ravel() for r in rs]))) <= {0, 1, 2}
  assert any(s.extra["lesion_volume_ml"] > 0 for s in ds.scans)


def test_ct_phantom_custom_cohort_and_auto_build(tmp_path):
  assert datasets.CtPhantom.config_for(None, {"patients": 2, "timepoints": 1, "shape": "8x32x32"}) \
      == "p2_t1_s0_8x32x32"
  # tfds.data_source builds the embedded dataset on demand (no manual_dir).
  src = tfds.data_source("ct_phantom/p2_t1_s0_8x32x32", data_dir=str(tmp_path))["train"]
  assert len(src) == 2 * 8 and src[0]["image"].shape == (32, 32)
  assert datasets.open_source("ct_phantom/p2_t1_s0_8x32x32", str(tmp_path)).case_ids() == \
      sorted({src[i]["case_id"].decode() for i in range(16)})
  with pytest.raises(datasets.DatasetError, match=r"--shape=4x32 is not ZxYxX"):
    datasets.CtPhantom.config_for(None, {"shape": "4x32"})
  with pytest.raises(datasets.DatasetError, match=r"ct_phantom takes no option \['slices'\]"):
    datasets.CtPhantom.config_for(None, {"slices": "lung"})
