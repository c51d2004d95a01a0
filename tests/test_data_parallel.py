"""One train step on 4 (fake CPU) devices equals the same step on 1 device.

BatchNorm statistics are taken over the global batch in both cases, so the
two steps compute the same function; only the order of float additions
differs. One subtlety: every SCOAT-Net conv except the heads feeds a
BatchNorm, which removes any constant offset, so those convs' biases have an
exact gradient of zero and a computed gradient of pure rounding noise (~1e-9).
Adam's first step is lr * g / (|g| + 1e-8) per element: it turns any
gradient at the rounding-noise level (those biases, dead ReLU channels) into
a step of up to the learning rate in either direction. So the Adam step is
compared on the elements whose gradient stands clear of rounding noise and
the BN-cancelled biases are checked to have a ~zero gradient; the gradients
themselves are compared in full (so an SGD step, p - lr * g, would agree on
every parameter).

The steps run in a fresh process (`data_parallel_worker.py`), not in the test
worker: twice in CI the four-device step, run inside a pytest worker that had
run other tests, stalled in XLA's CPU all-reduce (jaxlib 0.10.2, 2 cores).
The first time XLA aborted after its 40 s limit, saying only 3 of the 4 device
threads had reached the rendezvous; the second time, with the limit raised to
30 minutes, it aborted the same way and CI overran its 90 minutes. Standalone
loops of the same step (300 steps; under CPU load; with fresh state each time)
never stalled. In the worker XLA gives up after 120 s, and a run that ends
that way (XLA's "Termination timeout" message, or no result within 20
minutes) is retried once and reported; any other failure, and any numerical
difference, fails at once.
"""
import os
import pathlib
import pickle
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

from scoat_jax import models
from scoat_jax.common import parallel
from scoat_jax.training import optimization
from scoat_jax.configs import default
from scoat_jax.training.schedule import paper_schedule

WORKER = pathlib.Path(__file__).with_name("data_parallel_worker.py")
XLA_STALL = "Termination timeout"   # XLA's message when it aborts a stalled collective
WORKER_TIMEOUT_S = 1200   # a backstop: XLA itself aborts a stalled collective after 120 s


def _config():
  config = default.get_config()
  config.model.widths = (4, 8, 16, 32, 64)
  config.data.image_size = 32
  config.batch_size = 8
  return config


def _batch(config):
  rng = np.random.default_rng(0)
  image = rng.uniform(size=(config.batch_size, 32, 32, 1)).astype(np.float32)
  # Blobs, so Dice and BCE both have something to fit.
  yy, xx = np.mgrid[:32, :32]
  mask = np.stack([((yy - 8 - k) ** 2 + (xx - 12 - k) ** 2 < 30 + 5 * k)
                   for k in range(config.batch_size)])
  return {"image": image, "mask": mask.astype(np.int32)}


def _host(tree):
  return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), tree)


def one_step(config, devices, local_batch=None, tx=None):
  """One train step over `devices`; this process feeds `local_batch`.

  Returns host copies of (loss, gradients, updated params, updated batch stats).
  """
  mesh = parallel.make_mesh(devices)
  model = models.create_model(config)
  tx = tx or optimization.create_optimizer(paper_schedule(steps_per_epoch=10))
  state = optimization.create_train_state(config, model, tx, jax.random.key(0), mesh)
  batch = parallel.global_batch(_batch(config) if local_batch is None else local_batch, mesh)
  new_state, metrics = optimization.make_train_step(config, mesh, with_grads=True)(
      state, batch, jax.random.key(1))
  return _host((metrics["loss"], metrics["grads"], new_state.params, new_state.batch_stats))


def _rel(a, b):
  a = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(a)])
  b = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(b)])
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _bn_cancelled(path) -> bool:
  """A conv bias followed by BatchNorm: every conv bias except the heads'."""
  names = [p.key for p in path]
  return names[-1] == "bias" and "conv" in names[-2] and not names[-2].startswith("head")


def _split(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  cancelled = [leaf for path, leaf in flat if _bn_cancelled(path)]
  rest = [leaf for path, leaf in flat if not _bn_cancelled(path)]
  return cancelled, rest


def assert_same_step(got, want):
  """Asserts two `one_step` results agree (see the module docstring)."""
  (loss1, grads1, params1, stats1), (loss2, grads2, params2, stats2) = want, got
  assert np.isfinite(loss1)
  np.testing.assert_allclose(loss2, loss1, rtol=1e-5)
  assert _rel(grads2, grads1) <= 1e-5
  assert _rel(stats2, stats1) <= 1e-5
  # The step changed the statistics: the comparison is not vacuous.
  assert _rel(stats1, jax.tree_util.tree_map(np.zeros_like, stats1)) > 0

  (noise1, signal1), (noise2, _) = _split(grads1), _split(grads2)
  scale = max(np.abs(g).max() for g in signal1)
  assert max(np.abs(g).max() for g in noise1 + noise2) < 1e-5 * scale
  g = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(grads1)])
  clear = np.abs(g) > 1e-4 * scale
  assert clear.mean() > 0.9  # the comparison covers most of the network
  p1, p2 = (np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(p)])
            for p in (params1, params2))
  assert np.linalg.norm(p2[clear] - p1[clear]) / np.linalg.norm(p1[clear]) <= 1e-5


def _run_worker(out: pathlib.Path) -> tuple[bool, str]:
  """Runs data_parallel_worker.py once; returns (stalled in XLA, log)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.Popen([sys.executable, str(WORKER), str(out)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    log = proc.communicate(timeout=WORKER_TIMEOUT_S)[0]
  except subprocess.TimeoutExpired:
    proc.kill()
    return True, proc.communicate()[0] + f"\n(no result within {WORKER_TIMEOUT_S} s)"
  if proc.returncode == 0:
    return False, log
  if XLA_STALL in log:
    return True, log
  pytest.fail(f"data_parallel_worker.py exited {proc.returncode}:\n{log[-5000:]}")


def single_process_steps(tmp_dir: str) -> dict:
  """{4: step on four fake devices, 1: step on one device}, from a fresh process."""
  out = pathlib.Path(tmp_dir) / "steps.pkl"
  out.parent.mkdir(parents=True, exist_ok=True)
  for attempt in (1, 2):
    stalled, log = _run_worker(out)
    if not stalled:
      break
    if attempt == 2:
      pytest.fail(f"XLA's CPU collective stalled twice:\n{log[-5000:]}")
    warnings.warn(f"data_parallel_worker.py: XLA's CPU collective stalled; retrying once.\n"
                  f"{log[-2000:]}")
  with open(out, "rb") as f:
    return pickle.load(f)   # written by the worker just now, in our own temp dir


def test_four_devices_equal_one_device(tmp_path_factory):
  steps = single_process_steps(str(tmp_path_factory.mktemp("data_parallel")))
  assert_same_step(steps[4], steps[1])


def test_batch_must_divide_by_devices():
  mesh = parallel.make_mesh(jax.devices()[:4])
  with pytest.raises(ValueError, match="multiple of the device count"):
    parallel.check_batch_size(6, mesh)
