"""Cross-validation report: best checkpoint per fold, pooled statistics, grouping, files."""
import csv
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from trained_checkpoint import save_checkpoint
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
  summary = report.run([str(root / "*")], str(out))
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
    report.run([str(root / "*")], str(out))
  report.run([str(root / "*")], str(out), overwrite=True)


def test_labels_group_runs_and_bad_requests(runs, tmp_path):
  root, dirs, _ = runs
  ws = [str(dirs[k]) for k in ("scoat_f0", "scoat_f1", "unet_f0")]
  summary = report.run(ws, str(tmp_path / "l"), labels=["A,A", "B"])
  assert [(r["model"], r["cases"]) for r in summary] == [("A", 5), ("B", 2)]
  cases = {
      "label count": (dict(labels=["A"]), "2 label\\(s\\)|1 label\\(s\\) for 3"),
      "same fold twice": (dict(labels=["A", "A", "A"]), "both fold 0 of 'A'"),
  }
  for name, (kw, match) in cases.items():
    with pytest.raises(ValueError, match=match):
      report.run(ws, str(tmp_path / name.replace(" ", "_")), **kw)
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
  # `--workdirs runs/fold*` expanded by the shell: the folders after the first are positional.
  root, dirs, _ = runs
  cmd = [sys.executable, "-m", "scoat_jax.report", "--workdirs", str(dirs["scoat_f0"]),
         str(dirs["scoat_f1"]), str(dirs["unet_f0"]), f"--output={tmp_path / 'cli'}"]
  run = dict(cwd=REPO, capture_output=True, encoding="utf-8", timeout=300)
  done = subprocess.run(cmd, **run)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "| unet / dice | 1 | 2 |" in done.stdout
  bad = subprocess.run(cmd[:4] + [f"--output={tmp_path / 'cli'}"], **run)
  assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ")
  assert len(bad.stderr.strip().splitlines()) == 1
