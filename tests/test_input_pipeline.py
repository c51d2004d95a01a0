"""Input pipeline: exact geometry, determinism across processes, resume, sharding, eval."""
import hashlib
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from scoat_jax import datasets
from scoat_jax.data import folds
from scoat_jax.training import input_pipeline as ip
from scoat_jax.configs import default
from scoat_jax.data.intensity import normalize
from scoat_jax.datasets import build

tfds.disable_progress_bar()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "ct_phantom/small"        # 3 patients x 2 scans x 8 slices of 48x48


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds")
  build.build(NAME, str(d))
  return str(d)


def _cfg(data_dir, **kw) -> ml_collections.ConfigDict:
  c = default.get_config().data
  c.name, c.data_dir, c.image_size, c.num_folds, c.worker_count = NAME, data_dir, 32, 3, 0
  c.num_classes = 1
  c.update(kw)
  return c


def _digest(batch):
  h = hashlib.sha256()
  for k in sorted(batch):
    h.update(np.ascontiguousarray(batch[k]).tobytes())
  return h.hexdigest()


def _take(it, n):
  out = [next(it) for _ in range(n)]
  if hasattr(it, "close"):
    it.close()
  return out


# ----------------------------------------------------------------------------- training

def test_one_epoch_reads_each_training_slice_once(data_dir):
  cfg = _cfg(data_dir, augment=False, image_size=48, fold=1)
  ds = datasets.open_source(NAME, data_dir)
  train_ids, val_ids = folds.split_cases(ds.case_ids(), 1, 3, cfg.fold_seed)
  train = [(s.start + i) for s in ds.scans if s.case_id in train_ids for i in range(s.count)]
  assert ip.num_train_examples(cfg) == len(train) == 32
  # Identify each batch slice by its (normalised, un-augmented) image.
  key = {normalize(ds.source[r]["image"], "hu").tobytes(): r for r in range(ds.num_records)}
  assert len(key) == ds.num_records
  seen = []
  for b in _take(ip.train_batches(cfg, global_batch_size=4, seed=5, process_index=0,
                                  process_count=1), 8):
    assert b["image"].shape == (4, 48, 48, 1) and b["image"].dtype == np.float32
    assert b["mask"].shape == (4, 48, 48) and b["mask"].dtype == np.int32
    seen += [key[b["image"][k, ..., 0].tobytes()] for k in range(4)]
  assert sorted(seen) == train and seen != train       # a permutation of the fold, by case


def test_augmented_batches_in_range(data_dir):
  cfg = _cfg(data_dir, num_classes=3, intensity_jitter=0.2, rotate_degrees=30.0)
  b = _take(ip.train_batches(cfg, global_batch_size=8, seed=0, process_index=0, process_count=1), 1)[0]
  assert b["image"].shape == (8, 32, 32, 1) and 0 <= b["image"].min() and b["image"].max() <= 1
  assert set(np.unique(b["mask"])) <= {0, 1, 2} and b["mask"].max() > 0


def test_resume_equals_continuous_run(data_dir):
  cfg = _cfg(data_dir)
  # 32 training slices, batches of 6: the epoch boundary falls inside step 5.
  cont = _take(ip.train_batches(cfg, global_batch_size=6, seed=1, process_index=0, process_count=1), 8)
  resumed = _take(ip.train_batches(cfg, global_batch_size=6, seed=1, start_step=4, process_index=0,
                                   process_count=1), 4)
  assert [_digest(b) for b in cont[4:]] == [_digest(b) for b in resumed]
  other = _take(ip.train_batches(cfg, global_batch_size=6, seed=2, process_index=0, process_count=1), 1)
  assert _digest(other[0]) != _digest(cont[0])


def test_process_shares_concatenate_to_global_batch(data_dir):
  cfg = _cfg(data_dir)
  whole = _take(ip.train_batches(cfg, global_batch_size=6, seed=3, process_index=0, process_count=1), 2)
  parts = [_take(ip.train_batches(cfg, global_batch_size=6, seed=3, process_index=i, process_count=2), 2)
           for i in range(2)]
  for step in range(2):
    for k in ("image", "mask"):
      assert parts[0][step][k].shape[0] == 3
      assert np.array_equal(np.concatenate([parts[0][step][k], parts[1][step][k]]), whole[step][k])
  with pytest.raises(ip.PipelineError, match="global batch size 5 is not a positive multiple of "
                     "process_count=2"):
    ip.train_batches(cfg, global_batch_size=5, seed=0, process_index=0, process_count=2)


def test_same_batch_in_new_process_with_grain_workers(data_dir):
  cfg = _cfg(data_dir)
  expected = _digest(_take(ip.train_batches(cfg, global_batch_size=4, seed=7, start_step=3,
                                            process_index=0, process_count=1), 1)[0])
  code = (
      "import hashlib, numpy as np\n"
      "from scoat_jax.training import input_pipeline as ip\n"
      "from scoat_jax.configs import default\n"
      "c = default.get_config().data\n"
      f"c.name, c.data_dir, c.image_size, c.num_folds, c.worker_count = {NAME!r}, {data_dir!r}, 32, 3, 1\n"
      "c.num_classes = 1\n"
      "it = ip.train_batches(c, global_batch_size=4, seed=7, start_step=3, process_index=0, process_count=1)\n"
      "b = next(it); it.close()\n"
      "h = hashlib.sha256()\n"
      "for k in sorted(b): h.update(np.ascontiguousarray(b[k]).tobytes())\n"
      "print('DIGEST', h.hexdigest())\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                        timeout=180)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"DIGEST {expected}" in proc.stdout


# ----------------------------------------------------------------------------- evaluation

def test_eval_batches_pad_and_group_cases(data_dir):
  cfg = _cfg(data_dir, image_size=48, fold=0)
  ds = datasets.open_source(NAME, data_dir)
  _, val_ids = folds.split_cases(ds.case_ids(), 0, 3, cfg.fold_seed)
  scans = [s for s in ds.scans if s.case_id in val_ids]
  assert ip.eval_case_ids(cfg) == [s.scan_id for s in scans]            # one patient, 2 scans
  batches = list(ip.eval_batches(cfg, batch_size=5, process_index=0, process_count=1))
  assert len(batches) == 4                                              # 16 slices -> 5+5+5+1
  valid = np.concatenate([b["valid"] for b in batches])
  assert valid.sum() == 16 and not valid[16:].any()
  cases = np.concatenate([b["case"] for b in batches])[valid]
  slices = np.concatenate([b["slice_index"] for b in batches])[valid]
  assert cases.tolist() == [0] * 8 + [1] * 8 and slices.tolist() == list(range(8)) * 2
  last = batches[-1]
  assert not last["image"][1:].any() and not last["mask"][1:].any()
  # No augmentation, native size: the exact normalised slices.
  images = np.concatenate([b["image"] for b in batches])[valid]
  for k, (c, z) in enumerate(zip(cases, slices)):
    rec = ds.source[scans[c].start + z]
    np.testing.assert_array_equal(images[k, ..., 0], normalize(rec["image"], "hu"))
    assert np.array_equal(np.concatenate([b["mask"] for b in batches])[valid][k], rec["mask"] > 0)
  np.testing.assert_allclose(batches[0]["voxel_volume_ml"][0],
                             np.prod(ds.source[0]["spacing"].astype(np.float64)) / 1000, rtol=1e-6)


def test_eval_cases_split_over_processes(data_dir):
  cfg = _cfg(data_dir, fold=2)
  names = ip.eval_case_ids(cfg, split="all")
  assert len(names) == 6
  got = {}
  for pi in range(4):
    for b in ip.eval_batches(cfg, split="all", batch_size=3, process_index=pi, process_count=4):
      for c in b["case"][b["valid"]]:
        assert c % 4 == pi                                              # whole cases, k -> k % 4
        got[int(c)] = got.get(int(c), 0) + 1
  assert got == {k: 8 for k in range(6)}
  with pytest.raises(ip.PipelineError, match="split='test' is unknown"):
    ip.eval_case_ids(cfg, split="test")


def test_config_errors(data_dir, tmp_path):
  with pytest.raises(ip.PipelineError, match="num_classes=2 must be 1"):
    ip.train_batches(_cfg(data_dir, num_classes=2), global_batch_size=2, seed=0, process_index=0,
                     process_count=1)
  with pytest.raises(ip.PipelineError, match=r"scale_range=\(1.2, 1.1\) needs 0 < lo <= hi"):
    ip.train_batches(_cfg(data_dir, scale_range=(1.2, 1.1)), global_batch_size=2, seed=0,
                     process_index=0, process_count=1)
  with pytest.raises(ip.PipelineError, match="slices='sometimes' is unknown"):
    ip.num_train_examples(_cfg(data_dir, slices="sometimes"))
  ds = datasets.open_source(NAME, data_dir)
  train_ids, _ = folds.split_cases(ds.case_ids(), 0, 3, 0)
  n_opacity = sum(int((s.flags & 2).astype(bool).sum()) for s in ds.scans if s.case_id in train_ids)
  assert ip.num_train_examples(_cfg(data_dir, slices="opacity")) == n_opacity < 32
  with pytest.raises(datasets.DatasetNotBuiltError, match="build it with: python -m "
                     "scoat_jax.datasets.build ct_phantom/small --data_dir="):
    ip.num_train_examples(_cfg(str(tmp_path)))


def test_ensure_dataset_generates_only_the_phantom(tmp_path):
  cfg = _cfg(str(tmp_path), name="ct_phantom/p3_t1_s3_8x16x16")
  assert ip.ensure_dataset(cfg) == "ct_phantom/p3_t1_s3_8x16x16"
  assert ip.num_train_examples(cfg) > 0 and ip.ensure_dataset(cfg) == cfg.name
  with pytest.raises(datasets.DatasetNotBuiltError, match="build it with: python -m "
                     "scoat_jax.datasets.build covid_semiseg --manual_dir=<folder with Imgs/ and GT/>"):
    ip.ensure_dataset(_cfg(str(tmp_path), name="covid_semiseg"))


def test_uint8_normalization_reaches_training_and_inference(tmp_path):
  """data.uint8_normalization='equalize' is applied alike by training batches and Predictor."""
  import jax
  from PIL import Image
  from scoat_jax import models
  from scoat_jax.data import preprocess
  from scoat_jax.inference.loading import LoadedModel
  from scoat_jax.inference.predictor import Predictor
  from trained_checkpoint import WIDTHS
  manual = tmp_path / "slices"
  (manual / "Imgs").mkdir(parents=True)
  (manual / "GT").mkdir()
  rng = np.random.default_rng(0)
  raws = {}
  for k, shape in enumerate([(40, 30), (24, 36), (32, 32)]):
    raw = (rng.integers(0, 120, shape) + 100 * (k == 1)).astype(np.uint8)   # one brighter export
    raws[str(k)] = raw
    Image.fromarray(raw).save(manual / "Imgs" / f"{k}.png")
    Image.fromarray((raw > 150).astype(np.uint8)).save(manual / "GT" / f"{k}.png")
  data_dir = str(tmp_path / "tfds")
  build.build("covid_semiseg", data_dir, str(manual))
  cfg = _cfg(data_dir, name="covid_semiseg", uint8_normalization="equalize")
  ids = ip.eval_case_ids(cfg, "all")
  batch = next(ip.eval_batches(cfg, split="all", batch_size=3))
  config = default.get_config()
  config.data.image_size, config.data.uint8_normalization = 32, "equalize"
  config.model.widths = WIDTHS
  model = models.create_model(config)
  variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 1), np.float32), train=False)
  predictor = Predictor([LoadedModel(tmp_path, config, model, jax.device_get(variables), {})])
  for k, case in enumerate(ids):
    expected, _ = preprocess.prepare_slice(raws[case], np.zeros_like(raws[case]), source="uint8",
                                           window=(-1250, 250), size=32, num_classes=1,
                                           uint8_mode="equalize")
    np.testing.assert_array_equal(batch["image"][k, ..., 0], expected)
    np.testing.assert_array_equal(predictor.prepare(raws[case], "uint8"), expected)
  # The brighter export is equalised like the others (the /255 input would be ~0.4 brighter).
  means = [batch["image"][k][batch["image"][k] > 0].mean() for k in range(3)]
  assert max(means) - min(means) < 0.05
  with pytest.raises(ip.PipelineError, match="uint8_normalization='clahe'"):
    next(ip.eval_batches(_cfg(data_dir, name="covid_semiseg", uint8_normalization="clahe"),
                         split="all", batch_size=3))


def test_bad_gamma_range_is_refused(data_dir):
  with pytest.raises(ip.PipelineError, match=r"config.data.gamma_range=\(0.0, 2.0\) needs 0 < lo"):
    next(ip.train_batches(_cfg(data_dir, gamma_range=(0.0, 2.0)), global_batch_size=2, seed=0))
