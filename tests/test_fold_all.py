"""Fold -1 (or 'all'): the final model trains on every case, validates on none, and resumes.

One tiny run of the real loop (tiny widths, 32 px slices of `ct_phantom/small`,
three patients, one device, the shared tiny executables): first stopped after
its first epoch by `max_steps`, then started again to finish its three epochs.
It must read slices of every patient, write metrics.jsonl lines without any
val_ key, keep the KEEP_LATEST latest checkpoints, resolve a workdir to its
latest step, and be refused by `--mode=eval` and by the cross-validation report.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import sys
import types

import pytest

from scoat_jax import checkpoints, models
from scoat_jax.data import folds
from scoat_jax.datasets import base as ds_base
from scoat_jax.evaluation import cv_report
from scoat_jax.training import input_pipeline, train
from trained_checkpoint import one_device, tiny_config

# Same tiny executables as the shared trained checkpoint (one worker).
pytestmark = pytest.mark.xdist_group("tiny_training_b")

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH, EPOCHS = 3, 3


def _config(data_dir: str, fold=-1):
  c = tiny_config(data_dir, epochs=EPOCHS, steps=STEPS_PER_EPOCH)
  c.data.fold = fold
  return c


def _steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _records(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def final_run(tiny_data_dir, tmp_path_factory):
  """(workdir, case ids training read, log of the second start, first and last records)."""
  workdir = tmp_path_factory.mktemp("fold_all") / "final"
  seen: set[str] = set()
  real_read = input_pipeline._SliceReader.read

  def read(self, record, rng):
    image, mask, ex = real_read(self, record, rng)
    case = ex["case_id"]
    seen.add(case.decode() if isinstance(case, bytes) else str(case))
    return image, mask, ex

  handler = _Collect()
  absl_logger = logging.getLogger("absl")
  with one_device(), pytest.MonkeyPatch.context() as mp:
    mp.setattr(input_pipeline._SliceReader, "read", read)
    first = _config(tiny_data_dir, fold="all")
    first.max_steps = STEPS_PER_EPOCH             # stops after the first epoch's checkpoint
    first_record = train.train_and_evaluate(first, str(workdir))
    steps_after_first = _steps(workdir)
    absl_logger.addHandler(handler)
    old_level = absl_logger.level
    absl_logger.setLevel(logging.INFO)
    try:   # `-1` and `all` are one run: the same workdir resumes
      last_record = train.train_and_evaluate(_config(tiny_data_dir, fold=-1), str(workdir))
    finally:
      absl_logger.removeHandler(handler)
      absl_logger.setLevel(old_level)
  return types.SimpleNamespace(workdir=workdir, seen=seen, log="\n".join(handler.lines),
                               first_record=first_record, last_record=last_record,
                               steps_after_first=steps_after_first)


class _Collect(logging.Handler):
  def __init__(self):
    super().__init__(logging.INFO)
    self.lines: list[str] = []

  def emit(self, record):
    self.lines.append(record.getMessage())


def test_training_reads_every_case_and_the_pool_is_every_slice(final_run, tiny_data_dir):
  cfg = _config(tiny_data_dir)
  ds = ds_base.open_source(cfg.data.name, cfg.data.data_dir)
  every = ds.case_ids()
  assert len(every) == 3                                   # ct_phantom/small: 3 patients
  assert sorted(final_run.seen) == every                   # training read slices of each
  assert input_pipeline.case_ids(cfg.data) == every
  assert input_pipeline.case_ids(cfg.data, "validation") == []
  assert input_pipeline.eval_case_ids(cfg.data) == []
  # The training pool is every lung slice of every scan (slices='lung'), counted from the index.
  lung = sum(int(ds_base.keep_slice("lung", int(f))) for s in ds.scans for f in s.flags)
  assert input_pipeline.num_train_examples(cfg.data) == lung
  fold0 = _config(tiny_data_dir, fold=0)
  assert input_pipeline.num_train_examples(fold0.data) < lung
  assert "fold -1 trains on all 3 cases without validation" in final_run.log


def test_metrics_have_no_validation_keys_and_the_config_stores_minus_one(final_run):
  records = _records(final_run.workdir)
  assert [r["step"] for r in records] == [3, 6, 9]
  for r in records:
    assert set(r) == {"step", "epoch", "learning_rate", "train_loss"}, r
  assert [r["epoch"] for r in records] == [1.0, 2.0, 3.0]
  assert final_run.first_record == records[0] and final_run.last_record == records[-1]
  config = json.loads((final_run.workdir / "config.json").read_text())
  assert config["data"]["fold"] == -1                     # given as 'all', stored as -1
  events = b"".join(p.read_bytes() for p in (final_run.workdir / "tensorboard").iterdir())
  assert b"train/epoch_loss" in events and b"train/loss" in events
  assert b"eval/" not in events and b"overlay/" not in events


def test_checkpoints_keep_the_latest_and_a_workdir_resolves_to_the_latest(final_run):
  assert final_run.steps_after_first == [3]
  # Saved at 3, 6, 9 without metrics: no best, the KEEP_LATEST (2) latest stay.
  assert checkpoints.KEEP_LATEST == 2 and _steps(final_run.workdir) == [6, 9]
  workdir = final_run.workdir
  assert checkpoints.resolve_step_dir(workdir) == (workdir / "checkpoints" / "9").absolute()
  assert checkpoints.resolve_step_dir(workdir / "checkpoints").name == "9"
  assert checkpoints.make_manager(workdir).best_step() is None
  variables, meta = checkpoints.load_variables(workdir)
  assert meta["step"] == 9 and meta["record"]["step"] == 9 and "per_case" not in meta
  assert "params" in variables and "batch_stats" in variables


def test_a_restart_resumes_from_the_checkpoint(final_run):
  assert "Resuming from step 3" in final_run.log
  assert final_run.log.count("fold -1 trains on all") == 1
  assert "did not provide metrics" not in final_run.log   # Orbax's warning, expected here


def test_report_refuses_the_run_naming_the_workdir(final_run, tmp_path):
  out = tmp_path / "report"
  for given in (str(final_run.workdir), str(final_run.workdir.parent / "fin*")):
    with pytest.raises(cv_report.ReportError,
                       match=rf"^{final_run.workdir}: trained with data.fold=-1 on every case"):
      cv_report.run([given], str(out), costs=False)
  assert not out.exists()


def test_eval_refuses_the_run_and_fold_minus_one(final_run, tiny_data_dir):
  with pytest.raises(train.NoValidationError, match="a fold -1 run trained on every case"):
    train.evaluate_checkpoint(_config(tiny_data_dir, fold=0), str(final_run.workdir))
  with pytest.raises(train.NoValidationError, match="fold=-1 trains on every case"):
    train.evaluate_checkpoint(_config(tiny_data_dir, fold="all"), str(final_run.workdir))
  cfg = _config(tiny_data_dir)
  with pytest.raises(train.NoValidationError, match="has no validation cases"):
    train.Validator(cfg, models.create_model(cfg))        # nothing to average over


def test_other_negative_folds_stay_an_error(tiny_data_dir):
  with pytest.raises(folds.FoldError, match=r"fold=-2 is out of range .* or to -1 \(all\)"):
    input_pipeline.num_train_examples(_config(tiny_data_dir, fold=-2).data)


def _command(*args: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


def test_commands_refuse_with_one_line(final_run, tmp_path):
  run = _command("scoat_jax.main", "--flagfile=launch/demo.cfg", "--mode=eval",
                 f"--checkpoint={final_run.workdir}", "--config.data.fold=all")
  assert run.returncode == 2, run.stderr[-2000:]
  lines = run.stderr.strip().splitlines()
  assert lines[-1].startswith("error: --config.data.fold=-1 trains on every case and has no "
                              "validation cases: evaluate another fold's run"), run.stderr
  assert "Traceback" not in run.stderr
  out = tmp_path / "report"
  run = _command("scoat_jax.report", f"--workdirs={final_run.workdir}", f"--output={out}",
                 "--nocosts")
  assert run.returncode == 2, run.stderr[-2000:]
  assert run.stderr.strip().splitlines()[-1].startswith(f"error: {final_run.workdir}: trained "
                                                        "with data.fold=-1"), run.stderr
  assert "Traceback" not in run.stderr and not out.exists()
