"""Training survives its faults: a kill while a checkpoint is written (the first or a later
one), a damaged latest checkpoint, a full disk, a run refused before its first step.

Each faulty run is followed by the same call again; the final metrics must equal an
uninterrupted run's and metrics.jsonl must hold each evaluation once. The faults are
injected into Orbax's `CheckpointManager.save` in this process: the patched save leaves
a half-written `<step>.orbax-checkpoint-tmp-*` folder and then stops the run with an
exception nothing in the loop catches (a kill), or raises ENOSPC (a full disk). The
last test kills a real process with `os._exit` inside the save.
"""
from __future__ import annotations

import errno
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from scoat_jax import checkpoints
from scoat_jax.training import train
from trained_checkpoint import one_device
from trained_checkpoint import tiny_config as _tiny

pytestmark = pytest.mark.xdist_group("tiny_training_b")

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = [3, 6, 9, 12]


def tiny_config(data_dir: str, **fields):
  config = _tiny(data_dir, epochs=4, steps=3)
  config.update(fields)
  return config


class _Killed(BaseException):
  """Stands for SIGKILL: no handler of the loop runs after it."""


def _records(workdir: pathlib.Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def _leftovers(workdir: pathlib.Path) -> list[str]:
  return sorted(p.name for p in (workdir / "checkpoints").glob("*orbax-checkpoint-tmp*"))


@pytest.fixture(autouse=True)
def _one_device():
  with one_device():
    yield


@pytest.fixture(scope="module")
def reference(tiny_data_dir, tmp_path_factory) -> list[dict]:
  workdir = tmp_path_factory.mktemp("faults") / "uninterrupted"
  with one_device():
    train.train_and_evaluate(tiny_config(tiny_data_dir), str(workdir))
  return _records(workdir)


def _same_as_reference(workdir: pathlib.Path, reference: list[dict], rtol: float = 1e-6) -> None:
  got = _records(workdir)
  assert [r["step"] for r in got] == STEPS
  for key in ("train_loss", "val_dsc", "val_sen", "val_ppv", "learning_rate"):
    np.testing.assert_allclose(got[-1][key], reference[-1][key], rtol=rtol, err_msg=key)
  assert _leftovers(workdir) == []


def _patch_save(monkeypatch, at_step: int, fault: BaseException):
  real = checkpoints.ocp.CheckpointManager.save

  def save(manager, step, *args, **kwargs):
    if step == at_step:
      partial = pathlib.Path(manager.directory) / f"{step}.orbax-checkpoint-tmp-1234" / "state"
      partial.mkdir(parents=True)
      (partial / "d").write_bytes(b"half a checkpoint")
      raise fault
    return real(manager, step, *args, **kwargs)
  monkeypatch.setattr(checkpoints.ocp.CheckpointManager, "save", save)


@pytest.mark.parametrize("at_step", [3, 9], ids=["first checkpoint", "later checkpoint"])
def test_a_kill_while_a_checkpoint_is_written(tiny_data_dir, tmp_path, monkeypatch, reference,
                                              at_step):
  workdir = tmp_path / "run"
  with monkeypatch.context() as patch:
    _patch_save(patch, at_step, _Killed())
    with pytest.raises(_Killed):
      train.train_and_evaluate(tiny_config(tiny_data_dir), str(workdir))
  assert [r["step"] for r in _records(workdir)] == [s for s in STEPS if s < at_step]
  train.train_and_evaluate(tiny_config(tiny_data_dir), str(workdir))
  _same_as_reference(workdir, reference)


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(
    tiny_data_dir, tmp_path, reference, caplog):
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(tiny_data_dir, max_steps=6), str(workdir))
  files = sorted((workdir / "checkpoints" / "6" / "state").rglob("*"), key=lambda p: p.stat().st_size)
  largest = [p for p in files if p.is_file()][-1]
  largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 3])
  train.train_and_evaluate(tiny_config(tiny_data_dir), str(workdir))
  assert "step 6 cannot be read" in caplog.text
  assert (workdir / "checkpoints" / "6.damaged").is_dir()   # moved aside, not deleted
  _same_as_reference(workdir, reference)


def test_two_recent_checkpoints_are_kept_besides_the_best(tiny_data_dir, tmp_path):
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(tiny_data_dir), str(workdir))
  kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert kept[-2:] == [9, 12] and len(kept) <= 3


def test_a_full_disk_is_one_error_and_the_earlier_checkpoint_is_intact(
    tiny_data_dir, tmp_path, monkeypatch, reference):
  workdir = tmp_path / "run"
  with monkeypatch.context() as patch:
    _patch_save(patch, 6, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(checkpoints.CheckpointError) as err:
      train.train_and_evaluate(tiny_config(tiny_data_dir), str(workdir))
  message = str(err.value)
  assert "\n" not in message and str(workdir) in message and "disk is full" in message
  assert "MiB" in message and "resumes from step 3" in message
  assert _leftovers(workdir) == []
  assert [r["step"] for r in _records(workdir)] == [3]
  assert (workdir / "checkpoints" / "3" / "commit_success.txt").exists()
  train.train_and_evaluate(tiny_config(tiny_data_dir), str(workdir))
  _same_as_reference(workdir, reference)


def test_a_run_refused_before_its_first_step_leaves_the_workdir_as_found(tiny_data_dir, tmp_path):
  fresh = tmp_path / "fresh"
  with pytest.raises(ValueError, match="init_from"):
    train.train_and_evaluate(tiny_config(tiny_data_dir, init_from=str(tmp_path / "nowhere")),
                             str(fresh))
  assert not fresh.exists()
  kept = tmp_path / "kept"
  kept.mkdir()
  (kept / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="init_from|no such checkpoint"):
    train.train_and_evaluate(tiny_config(tiny_data_dir, init_from=str(tmp_path / "nowhere")),
                             str(kept))
  assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]
  # The corrected command is then accepted (not refused as "another config").
  train.train_and_evaluate(tiny_config(tiny_data_dir, max_steps=3), str(kept))
  assert [r["step"] for r in _records(kept)] == [3]


def test_a_process_killed_inside_a_later_save_resumes(tiny_data_dir, tmp_path, reference):
  """A real abrupt death: os._exit inside Orbax's save of step 9, then the same command."""
  import jax
  workdir = tmp_path / "run"
  script = (
      "import os, pathlib, sys\n"
      "sys.path.insert(0, 'tests')\n"
      "from scoat_jax import checkpoints\n"
      "from scoat_jax.training import train\n"
      "from trained_checkpoint import tiny_config\n"
      "real = checkpoints.ocp.CheckpointManager.save\n"
      "def save(manager, step, *a, **k):\n"
      "  if step == 9:\n"
      "    part = pathlib.Path(manager.directory) / '9.orbax-checkpoint-tmp-77' / 'state'\n"
      "    part.mkdir(parents=True)\n"
      "    (part / 'd').write_bytes(b'half')\n"
      "    os._exit(137)\n"
      "  return real(manager, step, *a, **k)\n"
      "checkpoints.ocp.CheckpointManager.save = save\n"
      f"c = tiny_config({tiny_data_dir!r}, epochs=4, steps=3)\n"
      f"c.compilation_cache_dir = {jax.config.jax_compilation_cache_dir!r}\n"
      f"train.train_and_evaluate(c, {str(workdir)!r})\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 137, proc.stderr[-2000:]
  assert [r["step"] for r in _records(workdir)] == [3, 6]
  assert _leftovers(workdir) == ["9.orbax-checkpoint-tmp-77"]
  train.train_and_evaluate(tiny_config(tiny_data_dir), str(workdir))
  # The first six steps ran in another process with other XLA flags: equal up to rounding.
  _same_as_reference(workdir, reference, rtol=1e-3)
