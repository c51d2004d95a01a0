"""Semi-supervised training: unlabelled datasets, soft labels, mixed batches, the soft loss,
pseudo-labelling by a teacher, the fold rule, and the one-command recipe."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from scoat_jax import datasets
from scoat_jax.configs import default
from scoat_jax.data import phantom, preprocess, soft_labels
from scoat_jax.inference import pseudo_labels as pseudo_label
from scoat_jax.datasets import build, intensity_match
from scoat_jax.training import input_pipeline as ip
from scoat_jax.training import losses, optimization, train, unlabelled
from trained_checkpoint import one_device, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- slots, loss

def test_pseudo_slots_are_spread_and_counted():
  assert unlabelled.pseudo_slots(4, 0.5).tolist() == [False, True, False, True]
  assert unlabelled.pseudo_slots(8, 0.25).sum() == 2
  assert not unlabelled.pseudo_slots(4, 0.0).any()
  assert unlabelled.pseudo_slots(4, 1.0).all()
  with pytest.raises(unlabelled.UnlabelledError, match="config.unlabelled.ratio=0.1"):
    unlabelled.pseudo_slots(4, 0.1)
  with pytest.raises(unlabelled.UnlabelledError, match="must be in"):
    unlabelled.pseudo_slots(4, 1.5)


def test_soft_loss_by_hand():
  x = np.array([[[0.0, 2.0]]], np.float32)        # (1, 1, 2) logits
  p = np.array([[[0.25, 1.0]]], np.float32)       # teacher probabilities
  q = 1 / (1 + np.exp(-x))
  bce = -(p * np.log(q) + (1 - p) * np.log(1 - q)).mean()
  dice = (2 * (q * p).sum() + 1e-6) / (q.sum() + p.sum() + 1e-6)
  got = float(losses.soft_bce_dice(jnp.asarray(x), jnp.asarray(p), alpha=0.5))
  assert got == pytest.approx(0.5 * bce + 1 - dice, rel=1e-5)
  # min_confidence 0.6: the pixel at p = 0.25 (confidence 0.5) carries no loss.
  bce1 = -np.log(q[0, 0, 1])
  dice1 = (2 * q[0, 0, 1] + 1e-6) / (q[0, 0, 1] + 1 + 1e-6)
  got = float(losses.soft_bce_dice(jnp.asarray(x), jnp.asarray(p), min_confidence=0.6))
  assert got == pytest.approx(0.5 * bce1 + 1 - dice1, rel=1e-5)


def test_soft_loss_on_hard_targets_is_the_papers_loss():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 8, 8, 1)).astype(np.float32)
  y = (rng.random((3, 8, 8)) > 0.7).astype(np.float32)
  assert float(losses.soft_bce_dice(x, y)) == pytest.approx(
      float(losses.bce_dice(x, y, alpha=0.5)), rel=1e-5)
  # hard=True thresholds the probabilities at 0.5.
  assert float(losses.soft_bce_dice(x, 0.2 + 0.6 * y, hard=True)) == pytest.approx(
      float(losses.bce_dice(x, y, alpha=0.5)), rel=1e-5)


def test_opacity_logit_of_three_classes_is_one_minus_background():
  logits = np.random.default_rng(1).normal(size=(2, 4, 4, 3)).astype(np.float32)
  p_bg = np.asarray(jax.nn.softmax(logits, axis=-1))[..., 0]
  got = np.asarray(jax.nn.sigmoid(losses.opacity_logit(logits)))
  np.testing.assert_allclose(got, 1 - p_bg, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- datasets

def _slices_folder(root: pathlib.Path, names_shapes) -> pathlib.Path:
  (root / "Imgs").mkdir(parents=True)
  rng = np.random.default_rng(0)
  for name, shape in names_shapes:
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / "Imgs" / f"{name}.png")
  return root


def _maps(folder: pathlib.Path, names_shapes, value=None) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(1)
  for name, shape in names_shapes:
    m = rng.integers(0, 256, shape, dtype=np.uint8) if value is None else np.full(shape, value,
                                                                                   np.uint8)
    Image.fromarray(m).save(folder / f"{name}.png")
  return folder


SLICES = [("scanA_2", (30, 40)), ("scanA_10", (30, 40)), ("scanB_1", (36, 36)), ("lone", (20, 28))]


@pytest.fixture(scope="module")
def slices_data(tmp_path_factory):
  root = tmp_path_factory.mktemp("unl")
  manual = _slices_folder(root / "in", SLICES)
  data_dir = str(root / "tfds")
  assert build.build("unlabelled_slices", data_dir, str(manual)) == "unlabelled_slices"
  return root, data_dir


def test_unlabelled_slices_keep_a_scan_together_in_slice_order(slices_data):
  _, data_dir = slices_data
  ds = datasets.open_source("unlabelled_slices", data_dir)
  assert [(s.case_id, s.count) for s in ds.scans] == [("lone", 1), ("scanA", 2), ("scanB", 1)]
  scan_a = ds.scans[1]
  assert scan_a.extra["names"] == ["scanA_2", "scanA_10"]
  assert scan_a.extra["shapes"] == [[30, 40], [30, 40]]
  assert [int(ds.source[scan_a.start + k]["slice_index"]) for k in range(2)] == [2, 10]
  assert ds.metadata["labelled"] is False and ds.intensity == "uint8"


def test_two_files_for_one_slice_are_refused(tmp_path):
  manual = _slices_folder(tmp_path, [("s_1", (8, 8)), ("s_01", (8, 8))])
  with pytest.raises(datasets.DatasetError, match="slice 1 of scan 's'"):
    build.build("unlabelled_slices", str(tmp_path / "tfds"), str(manual))
  assert not (tmp_path / "tfds").exists()


def test_unlabelled_volumes_from_a_folder_of_scans(tmp_path):
  folder = tmp_path / "scans"
  folder.mkdir()
  for t in (0, 1):  # writes <stem>_ct.nii.gz beside <stem>_label / _lung, which are skipped
    phantom.write_scan(phantom.generate_scan(5, 0, t, shape=(8, 24, 32)), folder)
  build.build("unlabelled_volumes", str(tmp_path / "tfds"), str(folder))
  ds = datasets.open_source("unlabelled_volumes", str(tmp_path / "tfds"))
  assert len(ds.scans) == 2 and ds.num_records == 16 and ds.has_lung
  assert ds.scans[0].extra["names"][:2] == [f"{ds.scans[0].case_id}_0", f"{ds.scans[0].case_id}_1"]
  assert ds.scans[0].extra["shapes"][0] == [24, 32]


# ----------------------------------------------------------------------------- batches

def _semi_cfg(slices_data, tiny_data_dir, soft, **kw):
  c = default.get_config()
  c.data.name, c.data.data_dir, c.data.image_size, c.data.num_folds = (
      "ct_phantom/small", tiny_data_dir, 32, 3)
  c.data.worker_count, c.data.fold = 0, 0
  c.unlabelled.name, c.unlabelled.data_dir = "unlabelled_slices", slices_data[1]
  c.unlabelled.soft_labels = str(soft)
  c.unlabelled.update(kw)
  return c


def test_soft_labels_must_fit_their_slices(slices_data, tmp_path):
  shapes = dict(SLICES)
  with pytest.raises(soft_labels.SoftLabelError, match="4 of 4 slices have no map"):
    soft_labels.check_folder(str(_maps(tmp_path / "none", [])), shapes, "flag")
  bad = _maps(tmp_path / "bad", SLICES[:3] + [("lone", (28, 20))])
  with pytest.raises(soft_labels.SoftLabelError, match=r"lone.png: map is 20x28 but its slice is 28x20"):
    soft_labels.check_folder(str(bad), shapes, "flag")


def test_uint8_slices_do_not_mix_with_hu_cases(slices_data, tiny_data_dir, tmp_path):
  c = _semi_cfg(slices_data, tiny_data_dir, _maps(tmp_path / "m", SLICES))
  with pytest.raises(unlabelled.UnlabelledError, match="holds uint8 slices but the labelled"):
    next(ip.train_batches(c.data, global_batch_size=4, seed=0, unlabelled_cfg=c.unlabelled))


def test_mixed_batches(slices_data, tiny_data_dir, tmp_path, monkeypatch):
  """Labelled slots are the supervised batches' own; unlabelled slots carry the warped maps."""
  soft = _maps(tmp_path / "m", SLICES)
  c = _semi_cfg(slices_data, tiny_data_dir, soft)
  c.data.augment = False
  # The phantom is HU; read the 8-bit slices as if they were HU too, to mix them here.
  monkeypatch.setattr(unlabelled, "open_source", _as_hu(unlabelled.open_source))
  plain = next(ip.train_batches(c.data, global_batch_size=4, seed=3, start_step=5))
  mixed = next(ip.train_batches(c.data, global_batch_size=4, seed=3, start_step=5,
                                unlabelled_cfg=c.unlabelled))
  slots = unlabelled.pseudo_slots(4, 0.5)
  assert set(mixed) == {"image", "mask", "soft"}
  assert not mixed["soft"][~slots].any() and not mixed["mask"][slots].any()
  # Labelled slot j holds labelled position 5 * 2 + rank: what the plain run has at step 2.5
  # (positions 10, 11 = slots 2, 3 of step 2 of a 4-slice batch), same permutation.
  plain2 = next(ip.train_batches(c.data, global_batch_size=4, seed=3, start_step=2))
  np.testing.assert_array_equal(mixed["mask"][~slots], plain2["mask"][2:])
  assert plain["image"].shape == mixed["image"].shape
  # Each unlabelled slot's soft label is its own map, letterboxed like its image.
  ds = datasets.open_source("unlabelled_slices", slices_data[1])
  names = [n for s in ds.scans for n in s.extra["names"]]
  for k in np.flatnonzero(slots):
    candidates = [_letterbox(soft_labels.read(str(soft), n)) for n in names]
    assert min(np.abs(c_ - mixed["soft"][k]).max() for c_ in candidates) < 1e-6


def _letterbox(m):
  out, _ = preprocess.warp(m, np.zeros(m.shape, np.uint8), 32)
  return out


def _as_hu(open_source):
  def patched(cfg, *, intensity, fold, data_dir, reference=None):
    return open_source(cfg, intensity="uint8", fold=fold, data_dir=data_dir, reference=reference)
  return patched


# ----------------------------------------------------------------------------- grey levels

def test_grey_level_table_by_hand():
  ref = np.zeros(256)
  ref[:] = 1                                   # uniform on 0..255
  src = np.zeros(256)
  src[:128] = 5                                # uniform on 0..127: every level doubles
  table = intensity_match.lut(src, ref)
  np.testing.assert_array_equal(table[:128], 2 * np.arange(128))
  assert (table[128:] == 255).all()            # unused levels follow their neighbours
  # Two occupied reference levels 40 and 200, a source on 10 and 20 (shares 1/4, 3/4 of
  # each): both land between them, in order, by linear interpolation of the mid shares.
  ref2, src2 = np.zeros(256), np.zeros(256)
  ref2[40], ref2[200] = 1, 1
  src2[10], src2[20] = 1, 1
  table2 = intensity_match.lut(src2, ref2)
  assert (table2[10], table2[20]) == (40, 200)
  same = np.random.default_rng(0).integers(1, 50, 256).astype(float)
  np.testing.assert_array_equal(intensity_match.lut(same, same), np.arange(256))
  rnd = np.random.default_rng(1)
  for _ in range(5):
    t_ = intensity_match.lut(rnd.integers(0, 9, 256), rnd.integers(0, 9, 256) + 1)
    assert (np.diff(t_.astype(int)) >= 0).all()          # monotone: order is kept
  with pytest.raises(intensity_match.IntensityMatchError, match="not all zero"):
    intensity_match.lut(np.zeros(256), ref)


def test_dark_unlabelled_scans_are_matched_to_the_fold_s_labelled_slices(tmp_path):
  """A wide-window scan (grey levels 0..63) meets labelled slices of 128..255: matched,
  its slots' histogram is the training slices'; the validation slices' take no part."""
  rng = np.random.default_rng(0)
  lab = tmp_path / "lab"
  (lab / "Imgs").mkdir(parents=True)
  (lab / "GT").mkdir()
  for k in range(6):   # slices 0-5; with 3 folds, fold 0 validates two of them
    lo = 128 if k % 2 else 140
    Image.fromarray(rng.integers(lo, 256, (24, 24), dtype=np.uint8)).save(lab / "Imgs" / f"{k}.png")
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(lab / "GT" / f"{k}.png")
  unl = tmp_path / "unl"
  (unl / "Imgs").mkdir(parents=True)
  dark = {f"dark_{k}": rng.integers(0, 64, (20, 28), dtype=np.uint8) for k in range(3)}
  for n, im in dark.items():
    Image.fromarray(im).save(unl / "Imgs" / f"{n}.png")
  data_dir = str(tmp_path / "tfds")
  build.build("covid_semiseg", data_dir, str(lab))
  build.build("unlabelled_slices", data_dir, str(unl))
  c = default.get_config()
  c.data.name, c.data.data_dir, c.data.num_folds, c.data.fold = "covid_semiseg", data_dir, 3, 0
  c.unlabelled.name, c.unlabelled.soft_labels = "unlabelled_slices", str(
      _maps(tmp_path / "m", [(n, (20, 28)) for n in dark]))
  labelled = datasets.open_source("covid_semiseg", data_dir)
  reference = intensity_match.fold_reference(labelled, 0, 3, 0)
  train_ids, val_ids = __import__("scoat_jax.data.folds", fromlist=["x"]).split_cases(
      labelled.case_ids(), 0, 3, 0)
  assert reference.sum() == len(train_ids) * 24 * 24 and val_ids
  by_hand = sum(np.bincount(np.asarray(Image.open(lab / "Imgs" / f"{i}.png")).ravel(), minlength=256)
                for i in train_ids)
  np.testing.assert_array_equal(reference, by_hand)
  scans = {split: {s.case_id for s in labelled.fold_scans(split, 0, 3, 0)} for split in ("train", "val")}
  assert scans == {"train": set(train_ids), "val": set(val_ids)}
  # The teacher's reference (pseudo_label) is the student's (training's own records).
  np.testing.assert_array_equal(
      reference, intensity_match.histogram(labelled, ip._train_records(c.data, labelled)))
  assert intensity_match.fold_reference(labelled, 0, 3, 0, "opacity").sum() == 0  # GT empty
  c.unlabelled.match_intensity = True
  src = unlabelled.open_source(c.unlabelled, intensity="uint8", fold=0, data_dir=data_dir,
                               reference=lambda: reference)
  ds = src.dataset
  matched = np.concatenate([src.luts[r][ds.source[r]["image"]].ravel() for r in src.records])
  assert matched.min() >= 128 and abs(matched.mean() - (reference * np.arange(256)).sum()
                                      / reference.sum()) < 2
  # Off: the slices are read as stored; HU data is refused, as is a caller with no reference.
  c.unlabelled.match_intensity = False
  assert unlabelled.open_source(c.unlabelled, intensity="uint8", fold=0, data_dir=data_dir).luts is None
  c.unlabelled.match_intensity = True
  with pytest.raises(unlabelled.UnlabelledError, match="needs the labelled training"):
    unlabelled.open_source(c.unlabelled, intensity="uint8", fold=0, data_dir=data_dir)
  # Soft labels a teacher wrote from unmatched slices do not train a matched student.
  soft_labels.write_manifest(c.unlabelled.soft_labels, {"match_intensity": False})
  with pytest.raises(unlabelled.UnlabelledError, match="labelled from unmatched grey levels"):
    unlabelled.open_source(c.unlabelled, intensity="uint8", fold=0, data_dir=data_dir,
                           reference=lambda: reference)
  soft_labels.write_manifest(c.unlabelled.soft_labels, {"match_intensity": True})
  # Through the pipeline: every unlabelled slot's image comes from the matched table.
  c.data.image_size, c.data.worker_count, c.data.augment = 32, 0, False
  batch = next(ip.train_batches(c.data, global_batch_size=4, seed=0, unlabelled_cfg=c.unlabelled))
  slots = unlabelled.pseudo_slots(4, 0.5)
  body = batch["image"][slots][:, 6:26, 2:30, 0]    # inside the letterbox of a 20 x 28 slice
  assert body.min() > 0.4                          # /255: the dark scan is bright now


def test_a_teacher_of_another_fold_is_refused(slices_data, tiny_data_dir, tmp_path):
  soft = _maps(tmp_path / "m", SLICES)
  c = _semi_cfg(slices_data, tiny_data_dir, soft)
  for folds, ok in (([1], False), ([-1], False), ([0], True)):
    soft_labels.write_manifest(str(soft), {"teacher_folds": folds})
    call = lambda: unlabelled.open_source(c.unlabelled, intensity="uint8", fold=0)  # noqa: E731
    if ok:
      assert call().records.size == 4
    else:
      with pytest.raises(unlabelled.UnlabelledError, match="trained on this fold's"):
        call()
  # A final model (fold all) may learn from any teacher.
  soft_labels.write_manifest(str(soft), {"teacher_folds": [-1]})
  assert unlabelled.open_source(c.unlabelled, intensity="uint8", fold=-1).records.size == 4


# ----------------------------------------------------------------------------- teacher -> student

@pytest.mark.xdist_group("trained")
def test_pseudo_label_then_train_a_student(trained_workdir, tiny_data_dir, tmp_path):
  scans = tmp_path / "scans"
  scans.mkdir()
  phantom.write_scan(phantom.generate_scan(7, 1, 0, shape=(8, 40, 48)), scans)
  data_dir = str(tmp_path / "tfds")
  build.build("unlabelled_volumes", data_dir, str(scans))
  out = tmp_path / "soft"
  manifest = pseudo_label.label([str(trained_workdir)], "unlabelled_volumes", data_dir, str(out))
  ds = datasets.open_source("unlabelled_volumes", data_dir)
  names = ds.scans[0].extra["names"]
  assert sorted(os.listdir(out)) == sorted([f"{n}.png" for n in names] + ["soft_labels.json"])
  assert np.asarray(Image.open(out / f"{names[0]}.png")).shape == (40, 48)
  assert manifest["teacher_folds"] == [0] and manifest["num_slices"] == 8
  assert json.loads((out / "soft_labels.json").read_text())["slices"][names[0]]["confidence"] >= 0
  with pytest.raises(ValueError, match="exists; pass --overwrite"):
    pseudo_label.label([str(trained_workdir)], "unlabelled_volumes", data_dir, str(out))
  with pytest.raises(ValueError, match="on one scale already"):
    pseudo_label.label([str(trained_workdir)], "unlabelled_volumes", data_dir,
                       str(tmp_path / "x"), match_intensity=True)
  with pytest.raises(ValueError, match="is a labelled dataset"):
    pseudo_label.label([str(trained_workdir)], "ct_phantom/small", tiny_data_dir,
                       str(tmp_path / "x"))
  assert not (tmp_path / "x").exists()

  # The student: fold 0 like its teacher, half of each batch from the soft labels.
  c = tiny_config(tiny_data_dir, steps=2)
  c.unlabelled.name, c.unlabelled.data_dir = "unlabelled_volumes", data_dir
  c.unlabelled.soft_labels = str(out)
  workdir = tmp_path / "student"
  with one_device():
    train.train_and_evaluate(c, str(workdir))
  from scoat_jax import checkpoints
  meta = checkpoints.read_meta(checkpoints.resolve_step_dir(str(workdir)))
  assert meta["unlabelled"]["teacher_folds"] == [0]
  assert meta["unlabelled"]["soft_labels"] == str(out)
  record = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()][-1]
  assert np.isfinite(record["train_loss"])


def test_semi_loss_with_ratio_zero_is_the_supervised_loss():
  c = default.get_config()
  c.batch_size, c.deep_supervision = 4, "none"
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 8, 8, 1)).astype(np.float32)
  batch = {"mask": (rng.random((4, 8, 8)) > 0.5).astype(np.int32),
           "soft": rng.random((4, 8, 8)).astype(np.float32)}
  sup = float(optimization.create_batch_loss(c)(logits, batch))
  c.unlabelled.name, c.unlabelled.ratio, c.unlabelled.weight = "x", 0.5, 2.0
  semi = float(optimization.create_batch_loss(c)(logits, batch))
  ref = (float(losses.bce_dice(logits[[0, 2]], batch["mask"][[0, 2]]))
         + 2.0 * float(losses.soft_bce_dice(logits[[1, 3]], batch["soft"][[1, 3]])))
  assert semi == pytest.approx(ref, rel=1e-5)
  assert sup == pytest.approx(float(losses.bce_dice(logits, batch["mask"])), rel=1e-5)


# ----------------------------------------------------------------------------- the launch scripts

def _dry(tmp_path, *extra, unlabelled_has_maps=True, script="semiseg_semi.sh"):
  lab, unl = tmp_path / "lab", tmp_path / "unl"
  for d in (lab / "Imgs", lab / "GT", unl / "Imgs") + ((unl / "InfNet-pseudo",)
                                                        if unlabelled_has_maps else ()):
    d.mkdir(parents=True, exist_ok=True)
  return subprocess.run(["bash", str(ROOT / "launch" / script), str(lab), str(unl),
                         str(tmp_path / "work"), "--dry_run", *extra],
                        capture_output=True, text=True, cwd=ROOT, timeout=60)


def _commands(proc):
  return [l[2:] for l in proc.stderr.splitlines() if l.startswith("+ ")]


def test_launch_script_pretrains_on_infnet_maps_then_fine_tunes(tmp_path):
  proc = _dry(tmp_path)
  assert proc.returncode == 0, proc.stderr
  cmds = _commands(proc)
  work, maps = tmp_path / "work", tmp_path / "unl" / "InfNet-pseudo"
  assert len(cmds) == 4 and "pseudo_label" not in " ".join(cmds)
  assert "semiseg_pretrain.cfg" in cmds[2] and f"--config.unlabelled.soft_labels={maps}" in cmds[2]
  assert cmds[2].endswith(f"--workdir={work / 'pretrain_round1'}")
  assert "semiseg_all.cfg" in cmds[3] and "unlabelled" not in cmds[3]
  assert "match_intensity" not in " ".join(cmds)   # Semi-Inf-Net's maps: the slices as they are
  assert f"--config.init_from={work / 'pretrain_round1'}" in cmds[3]
  assert proc.stdout.strip().splitlines()[-1] == str(work / "student_round1")
  assert not work.exists()


def test_launch_script_mixes_batches_with_method_mix(tmp_path):
  proc = _dry(tmp_path, "--method=mix")
  assert proc.returncode == 0, proc.stderr
  cmds = _commands(proc)
  assert len(cmds) == 3 and "semiseg_semi.cfg" in cmds[2]
  assert "--config.unlabelled.soft_labels=" + str(tmp_path / "unl" / "InfNet-pseudo") in cmds[2]
  assert proc.stdout.strip().splitlines()[-1] == str(tmp_path / "work" / "student_round1")
  # A second round labels the matched slices with the first student; its student sees them.
  cmds = _commands(_dry(tmp_path, "--method=mix", "--rounds=2"))
  assert "match_intensity" not in cmds[2]
  assert "pseudo_label" in cmds[3] and "--match_intensity" in cmds[3]
  assert "--config.unlabelled.match_intensity=True" in cmds[4]


def test_launch_script_self_training_rounds_gpu_and_three_classes(tmp_path):
  proc = _dry(tmp_path, "--rounds=2", "--fold=3", "--gpu", "--classes=3",
              unlabelled_has_maps=False)
  assert proc.returncode == 0, proc.stderr
  cmds = _commands(proc)
  kinds = [next((k for k in ("semiseg_all_gpu.cfg", "pseudo_label", "semiseg_pretrain_gpu.cfg")
                 if k in c), c) for c in cmds[2:]]
  assert kinds == ["semiseg_all_gpu.cfg", "pseudo_label", "semiseg_pretrain_gpu.cfg",
                   "semiseg_all_gpu.cfg", "pseudo_label", "semiseg_pretrain_gpu.cfg",
                   "semiseg_all_gpu.cfg"]
  mains = [c for c in cmds[2:] if "scoat_jax.main" in c]
  assert all("--config.data.fold=3" in c for c in mains)
  # Teachers and pre-training are 1-class; each student fine-tunes 3 classes from its
  # pre-training with the head expanded.
  students = [c for c in mains if "--config.init_from=" in c]
  assert len(students) == 2 and all("--config.init_head=expand" in c for c in students)
  assert [("--config.num_classes=3" in c) for c in mains] == [c in students for c in mains]
  assert "--teacher=" + str(tmp_path / "work" / "student_round1") in cmds[6]
  # Own labels are of the matched slices, and their students train on matched slices.
  assert all("--match_intensity" in c for c in cmds if "pseudo_label" in c)
  on_labels = [c for c in mains if "--config.unlabelled.soft_labels=" in c]
  assert len(on_labels) == 2 and all("--config.unlabelled.match_intensity=True" in c
                                     for c in on_labels)


def test_three_class_script_pretrains_one_class_and_expands_the_head(tmp_path):
  cmds = _commands(_dry(tmp_path, script="semiseg_semi_3class.sh"))
  assert "semiseg_pretrain.cfg" in cmds[2] and "--config.num_classes=3" not in cmds[2]
  assert "--config.num_classes=3" in cmds[3] and "--config.init_head=expand" in cmds[3]
  mix = _commands(_dry(tmp_path, "--method=mix", script="semiseg_semi_3class.sh"))
  assert "--config.num_classes=3" in mix[2] and "init_head" not in mix[2]


@pytest.mark.parametrize("args,expected", [(("--rounds=0",), "--rounds=0"),
                                           (("--method=meanteacher",), "--method=meanteacher"),
                                           (("--nope",), "unknown option --nope")])
def test_launch_script_refuses_bad_options(tmp_path, args, expected):
  proc = _dry(tmp_path, *args)
  assert proc.returncode == 2 and proc.stderr.startswith("error: ") and expected in proc.stderr


@pytest.mark.parametrize("flagfile", ["semiseg_semi.cfg", "semiseg_semi_gpu.cfg",
                                      "semiseg_pretrain.cfg", "semiseg_pretrain_gpu.cfg"])
def test_semi_flagfiles_parse_and_ask_for_the_dataset(tmp_path, flagfile):
  proc = subprocess.run(
      [sys.executable, "-m", "scoat_jax.main", f"--flagfile=launch/{flagfile}",
       f"--config.data.data_dir={tmp_path / 'tfds'}", f"--workdir={tmp_path / 'run'}",
       f"--config.unlabelled.soft_labels={tmp_path}"],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and "datasets.build covid_semiseg" in errors[0], proc.stderr[-2000:]
  assert not (tmp_path / "run").exists()
