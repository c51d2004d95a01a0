"""Cross-validation report: best checkpoint per fold, pooled statistics, grouping, p-values,
costs, files."""
import csv
import functools
import itertools
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from trained_checkpoint import save_checkpoint
from scoat_jax import models
from scoat_jax.configs.default import get_config as default_config
from scoat_jax.evaluation import cv_report as report

# Shares the tiny trained checkpoint with the other inference tests (one worker).
pytestmark = pytest.mark.xdist_group("tiny_training")

REPO = pathlib.Path(__file__).resolve().parents[1]
METRICS = report.METRICS
_DUMMY = {"params": {"w": np.zeros(2, np.float32)}, "batch_stats": {"m": np.zeros(1, np.float32)}}


def _cases(prefix, values):
  return [{"case_id": f"{prefix}{k}", **{m: float(v[i]) for i, m in enumerate(METRICS)}}
          for k, v in enumerate(values)]


def _workdir(root, name, *, model, loss, fold, best, later=None):
  """A workdir whose best step (by val_dsc) holds `best` and a later, worse step `later`."""
  config = {"model": model, "loss": loss, "data": {"fold": fold}}
  w = save_checkpoint(root / name, _DUMMY, config, step=10, val_dsc=0.9, meta={"per_case": best})
  if later is not None:
    save_checkpoint(root / name, _DUMMY, config, step=20, val_dsc=0.1, meta={"per_case": later})
  return w


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  rng = np.random.default_rng(0)
  data = {
      "scoat_f0": ("scoat_net", "bce_dice", 0, _cases("a", rng.uniform(0.5, 1, (3, 6)))),
      "scoat_f1": ("scoat_net", "bce_dice", 1, _cases("b", rng.uniform(0.5, 1, (2, 6)))),
      "unet_f0": ("unet", "dice", 0, _cases("a", rng.uniform(0.2, 0.8, (2, 6)))),
  }
  dirs = {}
  for name, (model, loss, fold, cases) in data.items():
    worse = [{**c, "dsc": 0.0} for c in cases]
    dirs[name] = _workdir(root, name, model=model, loss=loss, fold=fold, best=cases, later=worse)
  return root, dirs, data


def test_pooled_statistics_of_best_steps(runs, tmp_path):
  root, dirs, data = runs
  out = tmp_path / "out"
  summary = report.run([str(root / "*")], str(out), costs=False)
  assert [row["model"] for row in summary] == ["scoat_net / bce_dice", "unet / dice"]
  assert [(row["runs"], row["cases"]) for row in summary] == [(2, 5), (1, 2)]
  pooled = [data["scoat_f0"][3] + data["scoat_f1"][3], data["unet_f0"][3]]
  for row, cases in zip(summary, pooled):
    for m in METRICS:
      values = np.array([c[m] for c in cases])        # the best step's values, not the later 0.0
      assert row[f"{m}_mean"] == pytest.approx(values.mean())
      assert row[f"{m}_std"] == pytest.approx(values.std())
      assert row[f"{m}_median"] == pytest.approx(np.median(values))
  with open(out / "cv_report.csv", encoding="utf-8") as f:
    table = list(csv.DictReader(f))
  assert float(table[0]["dsc_mean"]) == pytest.approx(summary[0]["dsc_mean"])
  with open(out / "cv_per_case.csv", encoding="utf-8") as f:
    per_case = list(csv.DictReader(f))
  assert len(per_case) == 7 and {r["step"] for r in per_case} == {"10"}
  md = (out / "cv_report.md").read_text(encoding="utf-8")
  row = summary[0]
  assert (f"| scoat_net / bce_dice | 2 | 5 | {row['dsc_mean']:.4f} ± {row['dsc_std']:.4f} "
          f"({row['dsc_median']:.4f}) |") in md
  for m in METRICS:
    with Image.open(out / f"boxplot_{m}.png") as im:
      assert im.format == "PNG"
  # Refused without --overwrite, replaced with it.
  with pytest.raises(ValueError, match="earlier report"):
    report.run([str(root / "*")], str(out), costs=False)
  report.run([str(root / "*")], str(out), overwrite=True, costs=False)


def test_labels_group_runs_and_bad_requests(runs, tmp_path):
  root, dirs, _ = runs
  ws = [str(dirs[k]) for k in ("scoat_f0", "scoat_f1", "unet_f0")]
  summary = report.run(ws, str(tmp_path / "l"), labels=["A,A", "B"], costs=False)
  assert [(r["model"], r["cases"]) for r in summary] == [("A", 5), ("B", 2)]
  cases = {
      "label count": (dict(labels=["A"]), "2 label\\(s\\)|1 label\\(s\\) for 3"),
      "same fold twice": (dict(labels=["A", "A", "A"]), "both fold 0 of 'A'"),
  }
  for name, (kw, match) in cases.items():
    with pytest.raises(ValueError, match=match):
      report.run(ws, str(tmp_path / name.replace(" ", "_")), costs=False, **kw)
    assert not (tmp_path / name.replace(" ", "_")).exists()
  # A case validated in two folds of one row (a split mistake) is refused.
  twice = _workdir(root / "x", "dup", model="scoat_net", loss="bce_dice", fold=2,
                   best=_cases("a", np.full((1, 6), 0.5)))
  with pytest.raises(ValueError, match="case a0 is validated in both"):
    report.run([ws[0], str(twice)], str(tmp_path / "dup"))
  # A best step without per-case metrics, or a folder that is no workdir.
  bare = save_checkpoint(root / "x" / "bare", _DUMMY, {"model": "m", "loss": "l"}, step=1)
  with pytest.raises(ValueError, match="no per-case metrics"):
    report.run([str(bare)], str(tmp_path / "bare"))
  with pytest.raises(ValueError, match="no readable config.json"):
    report.run([str(tmp_path)], str(tmp_path / "none"))
  with pytest.raises(ValueError, match="matches no folder"):
    report.run([str(root / "nothing*")], str(tmp_path / "none"))


def test_real_training_workdir_and_cli(trained_workdir, runs, tmp_path):
  # The per-case metrics training stores are read as they are.
  [row] = report.run([str(trained_workdir)], str(tmp_path / "real"))
  assert row["model"] == "scoat_net / bce_dice" and row["cases"] >= 1
  # Its network's cost: the tiny SCOAT-Net the run trained, at 512 px, timed here.
  config = report.load_run(trained_workdir).config
  model = models.create_model(ml_collections.ConfigDict(
      {**default_config().to_dict(), **config, "deep_supervision": "none"}))
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             jnp.zeros((1, 64, 64, 1)))
  assert row["params"] == models.count_params(variables["params"])
  assert row["gflops"] > 0 and row["forward_ms"] > 0
  md = (tmp_path / "real" / "cv_report.md").read_text(encoding="utf-8")
  assert f"| {row['params']:,} | {row['gflops']:.2f} |" in md
  # `--workdirs runs/fold*` expanded by the shell: the folders after the first are positional.
  root, dirs, _ = runs
  cmd = [sys.executable, "-m", "scoat_jax.report", "--workdirs", str(dirs["scoat_f0"]),
         str(dirs["scoat_f1"]), str(dirs["unet_f0"]), f"--output={tmp_path / 'cli'}", "--nocosts"]
  run = dict(cwd=REPO, capture_output=True, encoding="utf-8", timeout=300)
  done = subprocess.run(cmd, **run)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "| unet / dice | 1 | 2 |" in done.stdout
  bad = subprocess.run(cmd[:4] + [f"--output={tmp_path / 'cli'}"], **run)
  assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ")
  assert len(bad.stderr.strip().splitlines()) == 1


def _exact_wilcoxon(diff):
  """Two-sided exact p of the signed-rank statistic, by enumerating every sign pattern."""
  ranks = stats_rank(np.abs(diff))
  observed = ranks[diff > 0].sum()
  totals = np.array([sum(r for r, s in zip(ranks, signs) if s)
                     for signs in itertools.product([0, 1], repeat=len(diff))])
  lower, upper = np.mean(totals <= observed), np.mean(totals >= observed)
  return min(1.0, 2 * min(lower, upper))


def stats_rank(values):
  order = np.argsort(values)
  ranks = np.empty(len(values))
  ranks[order] = np.arange(1, len(values) + 1)
  return ranks


def test_paired_wilcoxon_against_exact_enumeration(tmp_path):
  def run(label, dsc, ids):
    return report.Run(tmp_path, label, 0, 1, [{"case_id": i, "dsc": d} for i, d in zip(ids, dsc)])
  ref = run("ref", [0.5, 0.6, 0.7, 0.8, 0.9, 0.4], "abcdef")
  # Paired by id (order differs), distinct |differences|, mixed signs; case 'z' is unpaired.
  other = run("x", [0.91, 0.83, 0.45, 0.725, 0.58, 0.3, 0.2], "edacbfz")
  p, n = report.paired_wilcoxon([other], [ref])
  diff = np.array([0.45 - 0.5, 0.58 - 0.6, 0.725 - 0.7, 0.83 - 0.8, 0.91 - 0.9, 0.3 - 0.4])
  assert n == 6 and p == pytest.approx(_exact_wilcoxon(diff))
  # All better: the smallest two-sided p for n = 5 is 2 / 2^5.
  better = run("b", [0.51, 0.62, 0.73, 0.84, 0.95], "abcde")
  assert report.paired_wilcoxon([better], [ref])[0] == pytest.approx(2 / 32)
  assert report.paired_wilcoxon([ref], [ref]) == (1.0, 6)
  with pytest.raises(ValueError, match="share no validation case"):
    report.paired_wilcoxon([run("y", [0.5], "q")], [ref])


def test_three_class_runs_report_dsc_per_class_and_over_folds(tmp_path):
  # Two folds of a 3-class run; case b1 shows no consolidation in truth or prediction (null).
  base = {m: 0.5 for m in METRICS}
  f0 = [{**base, "case_id": "a1", "dsc": 0.8, "dsc_ggo": 0.6, "dsc_consolidation": 0.4},
        {**base, "case_id": "a2", "dsc": 0.6, "dsc_ggo": 0.5, "dsc_consolidation": 0.2}]
  f1 = [{**base, "case_id": "b1", "dsc": 0.9, "dsc_ggo": 0.7, "dsc_consolidation": None}]
  for fold, cases in ((0, f0), (1, f1)):
    _workdir(tmp_path, f"f{fold}", model="scoat_net", loss="ce_dice", fold=fold, best=cases,
             later=cases)
  [row] = report.run([str(tmp_path / "f*")], str(tmp_path / "out"), costs=False)
  # Folds' mean DSC: 0.7 and 0.9 -> 0.8 +- 0.1; pooled cases: 0.7667.
  assert row["dsc_folds_mean"] == pytest.approx(0.8) and row["dsc_folds_std"] == pytest.approx(0.1)
  assert row["dsc_mean"] == pytest.approx((0.8 + 0.6 + 0.9) / 3)
  assert row["dsc_ggo_mean"] == pytest.approx(0.6) and row["dsc_ggo_cases"] == 3
  assert row["dsc_consolidation_mean"] == pytest.approx(0.3)
  assert row["dsc_consolidation_cases"] == 2
  md = (tmp_path / "out" / "cv_report.md").read_text(encoding="utf-8")
  assert ("| Model / loss | DSC | SEN | PPV | VA | RLP | RLR | DSC GGO | DSC consolidation |\n"
          in md)
  assert ("| 0.8000 ± 0.1000 | " + "0.5000 ± 0.0000 | " * 5
          + "0.6000 ± 0.0816 (n = 3) | 0.3000 ± 0.1000 (n = 2) |") in md


def test_last_evaluated_checkpoint_and_every_metric_over_folds(runs, tmp_path):
  root, dirs, data = runs
  workdirs = [str(d) for d in dirs.values()]
  # --at=last scores the later (worse) step, DSC 0 in every case; the other metrics are equal.
  [scoat, _] = report.run(workdirs, str(tmp_path / "last"), costs=False, at="last")
  assert scoat["dsc_mean"] == 0.0 and scoat["dsc_folds_mean"] == 0.0
  assert "each fold scored at its last evaluated checkpoint" in (
      tmp_path / "last" / "cv_report.md").read_text(encoding="utf-8")
  [best, _] = report.run(workdirs, str(tmp_path / "best"), costs=False)
  folds = [data["scoat_f0"][3], data["scoat_f1"][3]]
  for m in METRICS:
    per_fold = [np.mean([c[m] for c in cases]) for cases in folds]
    assert best[f"{m}_folds_mean"] == pytest.approx(np.mean(per_fold))
    assert best[f"{m}_folds_std"] == pytest.approx(np.std(per_fold))
    if m != "dsc":
      assert scoat[f"{m}_folds_mean"] == pytest.approx(best[f"{m}_folds_mean"])
  with pytest.raises(ValueError, match="--at=first"):
    report.run(workdirs, str(tmp_path / "bad"), costs=False, at="first")
  assert not (tmp_path / "bad").exists()
