"""The training loop's promises: resume after SIGKILL, SIGTERM, NaN, workdir guard, eval.

The resume test runs `python -m scoat_jax.main` in subprocesses exactly as a
user would (tiny widths, 32 px slices of `ct_phantom/small`): once through,
and once killed with SIGKILL after its first checkpoint and started again.
The others run `train.train_and_evaluate` in this process, on one device like
the shared tiny checkpoint (`trained_checkpoint.py`), with a wrapped train
step that injects the failure.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from scoat_jax import checkpoints
from scoat_jax.training import optimization, train
from scoat_jax.configs import demo as demo_config
from trained_checkpoint import one_device
from trained_checkpoint import tiny_config as _tiny

# Same tiny executables as the shared trained checkpoint (one worker).
pytestmark = pytest.mark.xdist_group("tiny_training")


def test_xdist_groups_the_tiny_training_modules(request):
  """`pytest -n 2` (addopts: --dist loadgroup) sends this group to one worker."""
  if getattr(request.config.option, "loadgroup", False):   # set in xdist workers
    assert request.node.nodeid.endswith("@tiny_training"), (
        "pytest-xdist's --dist loadgroup is not grouping tests (pytest 9.2 with xdist 3.8); "
        "install the test extra's pytest (pyproject.toml: pytest<9.2)")


ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(data_dir: str):
  return _tiny(data_dir, epochs=4, steps=3)


@pytest.fixture
def data_dir(tiny_data_dir) -> str:
  return tiny_data_dir


@pytest.fixture(autouse=True)
def _one_device():
  with one_device():
    yield


def _flat(config, prefix: str = "") -> dict:
  """{'data.image_size': 32, ...}: the leaves of a ConfigDict by dotted name."""
  out = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def _cli(data_dir: str, workdir: pathlib.Path, *extra: str) -> list[str]:
  # The demo's flagfile plus every field the tiny config sets differently, so the
  # command line cannot drift from `tiny_config` (the compilation cache stays on).
  tiny = _flat(tiny_config(data_dir)) | {
      "compilation_cache_dir": jax.config.jax_compilation_cache_dir}
  demo = _flat(demo_config.get_config())
  overrides = [f"--config.{k}={v}" for k, v in sorted(tiny.items()) if demo.get(k) != v]
  return [sys.executable, "-m", "scoat_jax.main", "--flagfile=launch/demo.cfg",
          f"--workdir={workdir}", *overrides, *extra]


def _env() -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # one device per process
  return env | {"JAX_PLATFORMS": "cpu"}


def _run_cli(data_dir: str, workdir: pathlib.Path) -> str:
  t0 = time.time()
  run = subprocess.run(_cli(data_dir, workdir), cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  print(f"{workdir.name}: {time.time() - t0:.1f} s")
  return run.stderr


def _records(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_then_same_command_resumes_to_the_same_metrics(data_dir, tmp_path):
  reference = tmp_path / "uninterrupted"
  _run_cli(data_dir, reference)

  killed = tmp_path / "killed"
  proc = subprocess.Popen(_cli(data_dir, killed), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  first = killed / "checkpoints" / "3" / "commit_success.txt"
  deadline = time.time() + 600
  while not first.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  saved = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and saved[-1] < 12, saved

  log = _run_cli(data_dir, killed)
  assert f"Resuming from step {saved[-1]}" in log
  want, got = _records(reference), _records(killed)
  assert [r["step"] for r in got] == [3, 6, 9, 12]
  for key in ("train_loss", "val_dsc", "val_sen", "val_ppv", "val_va", "val_rlp", "val_rlr",
              "learning_rate"):
    np.testing.assert_allclose(got[-1][key], want[-1][key], rtol=1e-6, err_msg=key)

  # --mode=eval scores the saved best checkpoint like the run's own evaluation
  # did (here in a process with other XLA settings: equal up to float rounding).
  best = max(want, key=lambda r: r["val_dsc"])
  aggregate, per_case = train.evaluate_checkpoint(tiny_config(data_dir), str(reference))
  assert per_case and np.isclose(aggregate["val_dsc"], best["val_dsc"], rtol=1e-3)

  # The workdir guard: the same workdir with another model is refused, naming the fix.
  other = tiny_config(data_dir)
  other.model.widths = (8, 16, 32, 64, 128)
  with pytest.raises(checkpoints.CheckpointError, match="--overwrite"):
    checkpoints.check_workdir(reference, other, overwrite=False)


class _Injecting:
  """Wraps the real train step: calls `hook(step_index, metrics)` after each step."""

  def __init__(self, monkeypatch, hook):
    real = optimization.make_train_step
    self.calls = 0

    def make(config, mesh, **kw):
      step = real(config, mesh, **kw)

      def wrapped(state, batch, rng):
        state, metrics = step(state, batch, rng)
        self.calls += 1
        return state, hook(self.calls, metrics)
      return wrapped
    monkeypatch.setattr(optimization, "make_train_step", make)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    data_dir, tmp_path, monkeypatch):
  def poison(calls, metrics):
    return metrics | {"loss": jax.numpy.float32(np.nan)} if calls == 5 else metrics
  _Injecting(monkeypatch, poison)
  with pytest.raises(train.NonFiniteLossError, match="at step 4"):
    train.train_and_evaluate(tiny_config(data_dir), str(tmp_path))
  assert checkpoints.make_manager(tmp_path).latest_step() == 3
  assert [r["step"] for r in _records(tmp_path)] == [3]


def test_sigterm_saves_a_checkpoint_before_exiting(data_dir, tmp_path, monkeypatch):
  def terminate(calls, metrics):
    if calls == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return metrics
  _Injecting(monkeypatch, terminate)
  with pytest.raises(KeyboardInterrupt, match="signal 15 at step 2"):
    train.train_and_evaluate(tiny_config(data_dir), str(tmp_path))
  manager = checkpoints.make_manager(tmp_path)
  assert manager.latest_step() == 2
  _, meta = checkpoints.load_variables(tmp_path / "checkpoints" / "2")
  assert meta["interrupted"] is True
