"""The benchmark scripts run end to end and print the JSON the GPU check reads."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--size=32", "--batch=2", "--widths=4,8,16,32,64", "--warmup=0", "--repeats=2", "--json",
        "--cpu_weight_grad=taps"]
KEYS = {"compile_s", "step_s_median", "step_s_min", "step_s_max", "slices_per_s",
        "flops_per_step", "flop_per_s", "peak_rss_gib", "peak_device_gib", "device"}


def _benchmark(script: str, *flags: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  env.pop("XLA_FLAGS", None)  # one device, as a user runs it
  return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *flags],
                        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


def _run(script: str, *flags: str) -> tuple[list[dict], str]:
  proc = _benchmark(script, *TINY, *flags)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return [json.loads(line) for line in proc.stdout.splitlines()], proc.stderr


@pytest.mark.parametrize("script,flags,rows", [
    ("train_step.py", ("--dtype=float32,bfloat16",), 2),
    ("predict.py", ("--model=scoat_net,unet_pp",), 2),
])
def test_json_lines_and_table(script, flags, rows):
  records, table = _run(script, *flags)
  assert len(records) == rows  # stdout holds only the JSON lines, one per point
  for r in records:
    assert KEYS <= r.keys()
    assert r["size"] == 32 and r["batch"] == 2
    assert 0 < r["step_s_min"] <= r["step_s_median"] <= r["step_s_max"]
    assert r["slices_per_s"] == pytest.approx(2 / r["step_s_median"])
    assert r["flops_per_step"] > 0  # XLA's CPU cost analysis
    assert r["flop_per_s"] == pytest.approx(r["flops_per_step"] / r["step_s_median"])
    assert r["peak_rss_gib"] > 0
  assert "| model | size | batch | dtype |" in table  # the table for people goes to stderr


def test_bad_model_is_refused():
  proc = _benchmark("predict.py", "--model=resnet", "--size=32")
  assert proc.returncode == 2 and "--model: 'resnet' is not a network" in proc.stderr


def test_semi_phantom_refuses_bad_flags_before_writing(tmp_path):
  for flag, message in (("--seeds=a", "--seeds=a"), ("--unlabelled=0", "--unlabelled=0")):
    proc = _benchmark("semi_phantom.py", f"--root={tmp_path / 'runs'}", flag)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {message}")
  assert not (tmp_path / "runs").exists()


def test_bad_batch_is_refused():
  proc = _benchmark("train_step.py", "--devices=2", "--batch=3", "--size=32",
                    "--widths=4,8,16,32,64")
  assert proc.returncode != 0
  assert "--batch" in proc.stderr.strip().splitlines()[-1]


def test_quantify_benchmark_runs_and_checks_itself():
  proc = _benchmark("quantify.py", "--size=96", "--depth=24", "--repeats=1", "--json")
  assert proc.returncode == 0, proc.stderr[-2000:]
  records = [json.loads(line) for line in proc.stdout.splitlines()]
  assert [r["step"] for r in records] == ["lung_mask", "lesions", "quantify_volume"]
  assert all(0 < r["s_min"] <= r["s_median"] <= r["s_max"] for r in records)
  assert records[1]["lesions_match"] is True and records[1]["num_lesions"] > 0
  assert abs(records[0]["lung_volume_error_pct"]) < 0.5   # the phantom's truth, within 0.5%
  assert "| step | HU dtype |" in proc.stderr


def test_lung_extent_benchmark_skips_only_slices_without_lung():
  proc = _benchmark("lung_extent.py", f"--checkpoint={ROOT / 'tests/fixtures/legacy_checkpoint'}",
                    "--size=128", "--depth=48", "--slice_mm=10", "--json")
  assert proc.returncode == 0, proc.stderr[-2000:]
  skip, full = [json.loads(line) for line in proc.stdout.splitlines()]
  assert skip["skip"] and not full["skip"] and full["slices"] == 48
  assert 0 < skip["slices"] < 48 and skip["opacity_inside"] and skip["consolidation_inside"]
  # The untrained model labels the neck and abdomen too: skipping them only takes opacity away.
  assert skip["same_mask_inside"] and skip["lov_ml"] <= full["lov_ml"]


def test_semiseg_recipe_search_trains_scores_and_refuses_bad_requests(tmp_path):
  """One tiny fold end to end; its plain row's mean Dice equals the one recomputed here."""
  from PIL import Image
  import numpy as np
  from scoat_jax.datasets import build
  manual = tmp_path / "slices"
  (manual / "Imgs").mkdir(parents=True)
  (manual / "GT").mkdir()
  rng = np.random.default_rng(0)
  for k in range(6):
    raw = rng.integers(0, 255, (36, 28 + 2 * k)).astype(np.uint8)
    Image.fromarray(raw).save(manual / "Imgs" / f"{k}.png")
    Image.fromarray((raw > 128).astype(np.uint8)).save(manual / "GT" / f"{k}.png")
  data_dir = tmp_path / "tfds"
  build.build("covid_semiseg", str(data_dir), str(manual))
  extra = [f"--extra={e}" for e in (
      f"--config.data.data_dir={data_dir}", "--config.data.num_folds=3",
      "--config.data.image_size=32", "--config.model.widths=4,8,16,32,64", "--config.max_steps=2",
      "--config.batch_size=2", "--config.cpu_weight_grad=taps")]
  proc = _benchmark("semiseg_recipes.py", f"--root={tmp_path / 'runs'}", "--variants=base",
                    "--folds=0", "--inference=plain,p0.5,pp", f"--data_dir={data_dir}", "--json",
                    *extra)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = {r["inference"]: r for r in map(json.loads, proc.stdout.splitlines())}
  assert set(rows) == {"plain", "p0.5", "pp"} and rows["plain"]["slices"] == 2
  assert (tmp_path / "runs" / "base" / "fold0" / "train_seconds.txt").exists()
  stamp = (tmp_path / "runs" / "base" / "fold0" / "versions.txt").read_text()
  assert stamp.startswith("jax ") and ", CPU " in stamp   # the CPU too: XLA's code differs by CPU
  # The same fold's validation slices through the public API.
  import scoat_jax
  from scoat_jax.data import folds
  _, val = folds.split_cases([str(k) for k in range(6)], 0, 3, 0)
  model = scoat_jax.load(str(tmp_path / "runs" / "base" / "fold0"))
  dsc = []
  for stem in val:
    raw = np.asarray(Image.open(manual / "Imgs" / f"{stem}.png"))
    truth = raw > 128
    pred = scoat_jax.segment(raw, model).labels > 0
    dsc.append(2 * np.count_nonzero(pred & truth) / (np.count_nonzero(pred) + np.count_nonzero(truth)))
  assert rows["plain"]["dsc_folds_mean"] == pytest.approx(np.mean(dsc), abs=1e-9)
  assert rows["p0.5"]["dsc_folds_mean"] == rows["plain"]["dsc_folds_mean"]   # 0.5 is the default
  # Self-training: the fold's onehead model labels unlabelled slices, its student trains on
  # both; every row gets a paired test against onehead (same slices).
  unlabelled = tmp_path / "unlabelled"
  (unlabelled / "Imgs").mkdir(parents=True)
  for k in range(4):
    Image.fromarray(rng.integers(0, 255, (30, 30)).astype(np.uint8)).save(
        unlabelled / "Imgs" / f"scan{k // 2}_{k % 2}.png")
  build.build("unlabelled_slices", str(data_dir), str(unlabelled))
  proc = _benchmark("semiseg_recipes.py", f"--root={tmp_path / 'runs'}",
                    "--variants=onehead_self,onehead_self_matched", "--paired=onehead", "--folds=0",
                    "--inference=plain", f"--data_dir={data_dir}", "--json", *extra)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = {r["variant"]: r for r in map(json.loads, proc.stdout.splitlines())}
  assert set(rows) == {"onehead_self", "onehead_self_matched", "onehead"}
  for variant, matched in (("onehead_self", False), ("onehead_self_matched", True)):
    soft = json.loads((tmp_path / "runs" / variant / "fold0_soft" / "soft_labels.json")
                      .read_text())
    assert soft["num_slices"] == 4 and soft["teacher_folds"] == [0]
    assert soft["match_intensity"] is matched   # the teacher saw what its student sees
    config = json.loads((tmp_path / "runs" / variant / "fold0" / "config.json").read_text())
    assert config["unlabelled"]["match_intensity"] is matched
  self_row, base = rows["onehead_self"], rows["onehead"]
  assert self_row["slice_ids"] == base["slice_ids"] and "paired_p" not in base
  delta = np.mean(np.subtract(self_row["dsc_per_slice"], base["dsc_per_slice"]))
  assert self_row["paired_delta"] == pytest.approx(delta) and 0 <= self_row["paired_p"] <= 1
  # Semi-Inf-Net's protocol: maps alone first, then fine-tuning from that stage's last step.
  maps = tmp_path / "maps"
  maps.mkdir()
  for k in range(4):
    Image.fromarray(rng.integers(0, 255, (30, 30)).astype(np.uint8)).save(
        maps / f"scan{k // 2}_{k % 2}.png")
  proc = _benchmark("semiseg_recipes.py", f"--root={tmp_path / 'runs'}",
                    "--variants=onehead_infnet_finetune", "--folds=0", "--inference=plain",
                    f"--data_dir={data_dir}", f"--soft_labels={maps}", "--json", *extra)
  assert proc.returncode == 0, proc.stderr[-2000:]
  [row] = map(json.loads, proc.stdout.splitlines())
  assert row["variant"] == "onehead_infnet_finetune" and row["slices"] == 2
  first = tmp_path / "runs" / "onehead_infnet_pretrain" / "fold0"
  config = json.loads((tmp_path / "runs" / "onehead_infnet_finetune" / "fold0" / "config.json")
                      .read_text())
  assert config["init_from"] == str(first / "checkpoints" / "2")
  assert json.loads((first / "config.json").read_text())["unlabelled"]["ratio"] == 1
  for flags, message in ((("--variants=nope",), "--variants: 'nope'"),
                         (("--inference=plain,max",), "--inference: 'max'"),
                         (("--variants=onehead_infnet",), "--variants=onehead_infnet needs"),
                         (("--variants=onehead_infnet_finetune",),
                          "--variants=onehead_infnet_finetune needs")):
    proc = _benchmark("semiseg_recipes.py", f"--root={tmp_path / 'bad'}", *flags)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {message}")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("variant", ["onehead_infnet_pretrain", "onehead_infnet_finetune_200",
                                     "onehead_round2_finetune_200"])
def test_semiseg_recipes_refuses_a_variant_that_needs_the_maps_without_them(tmp_path, variant):
  # The maps may be needed two stages down (round 2 -> its pre-training -> its teacher
  # -> that teacher's pre-training): one error line, exit 2, nothing written.
  proc = _benchmark("semiseg_recipes.py", f"--root={tmp_path / 'runs'}", f"--variants={variant}",
                    "--folds=0")
  assert proc.returncode == 2 and not (tmp_path / "runs").exists()
  assert proc.stderr.strip() == (f"error: --variants={variant} needs --soft_labels=DIR "
                                 "(Semi-Inf-Net's InfNet-pseudo/)")
