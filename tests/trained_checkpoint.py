"""A tiny SCOAT-Net trained for a few steps by the real loop, shared by the inference tests.

conftest.py registers this module as a pytest plugin, so its fixtures
(`tiny_data_dir`, `trained_workdir`, `shifted_workdir`) reach every test module
without an import. Mark a module that uses them
`pytest.mark.xdist_group("tiny_training")`, so that under
`pytest -n 2 --dist loadgroup` one worker trains it once for all of them.
The fixtures are session-scoped: training runs once per worker process,
whichever module asks first; with JAX's persistent compilation cache warm it
takes ~40 s on a 2-core CPU.

The model's quality does not matter for geometry and consistency tests, but
after 4 steps it predicts no opacity at all. `shifted_workdir` therefore
saves a copy whose last head's bias is lowered so that about a third of the
voxels of the test scan are labelled: a mask with structure that still comes
from the network.
"""
from __future__ import annotations

import contextlib
import json
import pathlib
import types

import jax
import numpy as np
import pytest

from scoat_jax import checkpoints
from scoat_jax import inference
from scoat_jax.common import parallel
from scoat_jax.training import train
from scoat_jax.configs import demo
from scoat_jax.data import ct_io, phantom

WIDTHS = (4, 8, 16, 32, 64)
IMAGE_SIZE = 32
SCAN_SHAPE = (8, 40, 56)   # (z, y, x): small, non-square, letterboxed to 32 x 32


def tiny_config(data_dir: str, *, epochs: int = 1, steps: int = 3):
  """The tiny training run every in-process training test shares (same executables)."""
  c = demo.get_config()
  c.model.widths = WIDTHS
  c.data.image_size = IMAGE_SIZE
  c.data.name = "ct_phantom/small"
  c.data.data_dir = data_dir
  c.data.num_folds = 3
  c.num_epochs, c.steps_per_epoch = epochs, steps
  c.eval_every_epochs = 1   # a checkpoint per epoch: the tests resume and compare epochs
  c.data.slices = "lung"    # what the tiny runs were built and measured with
  c.batch_size, c.eval_batch_size = 4, 8
  c.log_every_steps = 1
  c.num_overlays = 1
  c.compilation_cache_dir = ""
  return c


@contextlib.contextmanager
def one_device():
  """Makes training use a one-device mesh in this four-fake-device process.

  Data parallelism has its own tests; on one device the shared tiny runs reuse
  one set of executables from the persistent cache, and Orbax saves in
  seconds instead of slicing every array per fake device.
  """
  first = jax.devices()[:1]
  real = parallel.make_mesh
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(parallel, "make_mesh", lambda devices=None: real(first))
    yield


def test_scan(patient: int = 0, timepoint: int = 1) -> phantom.PhantomScan:
  """A small phantom scan with lesions (not part of the training cohort's shape)."""
  return phantom.generate_scan(3, patient, timepoint, shape=SCAN_SHAPE)


test_scan.__test__ = False  # a helper, not a test


def save_checkpoint(workdir, variables: dict, config: dict, *, step: int = 1,
                    val_dsc: float = 0.5, meta: dict | None = None) -> pathlib.Path:
  """Saves NumPy variables as a training checkpoint (no optimiser state) with meta['config']."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(json.dumps(config))
  manager = checkpoints.make_manager(workdir)
  state = types.SimpleNamespace(step=np.int32(step), params=variables["params"],
                                batch_stats=variables["batch_stats"], opt_state={})
  checkpoints.save(manager, state, meta={"config": config, "step": step, **(meta or {})},
                   metrics={checkpoints.BEST_METRIC: val_dsc})
  return workdir


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> str:
  """ct_phantom/small built once per session (for every tiny training run)."""
  from scoat_jax.datasets import build
  root = tmp_path_factory.mktemp("tfds")
  build.build("ct_phantom/small", str(root))
  return str(root)


@pytest.fixture(scope="session")
def trained_workdir(tiny_data_dir, tmp_path_factory) -> pathlib.Path:
  """A workdir trained for 3 steps on ct_phantom/small (widths 4..64, 32 px, batch 4)."""
  workdir = tmp_path_factory.mktemp("trained") / "workdir"
  with one_device():
    train.train_and_evaluate(tiny_config(tiny_data_dir), str(workdir))
  return workdir


@pytest.fixture(scope="session")
def shifted_workdir(trained_workdir, tmp_path_factory) -> pathlib.Path:
  """The trained model with head_4's bias lowered so ~1/3 of test_scan() is labelled."""
  model = inference.load_model(trained_workdir)
  scan = test_scan()
  _, prob = inference.Predictor([model]).predict_volume(scan.hu, with_probability=True)
  p = np.clip(prob, 1e-6, 1 - 1e-6)
  logit = np.quantile(np.log(p / (1 - p)), 2 / 3)
  variables = {k: {**v} for k, v in model.variables.items()}
  variables["params"] = dict(variables["params"])
  head = dict(variables["params"]["head_4"])
  head["bias"] = head["bias"] - np.float32(logit)
  variables["params"]["head_4"] = head
  root = tmp_path_factory.mktemp("shifted")
  return save_checkpoint(root / "workdir", variables, model.meta["config"],
                         step=int(model.step or 1))


def write_rotated_nifti(scan: phantom.PhantomScan, path) -> ct_io.Geometry:
  """Writes `scan` with an oblique, anisotropic, offset geometry (what a mask must copy)."""
  t = np.deg2rad(20.0)
  direction = (np.cos(t), -np.sin(t), 0.0, np.sin(t), np.cos(t), 0.0, 0.0, 0.0, 1.0)
  geometry = ct_io.Geometry(scan.geometry.size, (0.8, 1.1, 2.5), (12.5, -30.25, -412.0), direction)
  ct_io.write_ct(scan.hu, geometry, path)
  return geometry
