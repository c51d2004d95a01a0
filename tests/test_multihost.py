"""Two processes on loopback (jax.distributed, gloo CPU collectives), two fake
devices each, take the same train step as one process with four devices.

Opt-in (`SCOAT_JAX_MULTIHOST_TEST=1`): three processes compiling SCOAT-Net on
a 2-core machine take ~4 minutes, a third of the suite's budget. BUILD.md
gives the command; run it when changing parallel.py or the train step.
"""
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest

import test_data_parallel as dp

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")


@pytest.mark.skipif(os.environ.get("SCOAT_JAX_MULTIHOST_TEST") != "1",
                    reason="opt-in: SCOAT_JAX_MULTIHOST_TEST=1 (about 4 minutes on 2 cores)")
def test_two_processes_take_the_same_step_as_one(tmp_path):
  port = portpicker.pick_unused_port()
  out = tmp_path / "step.npz"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, str(WORKER), str(port), str(i), str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("two-process step timed out")
  assert all(p.returncode == 0 for p in procs), "\n".join(l[-3000:] for l in logs)

  want = dp.single_process_steps(str(tmp_path / "one_process"))[4]
  leaves, treedef = jax.tree_util.tree_flatten(want)
  saved = np.load(out)
  assert len(saved.files) == len(leaves)
  got = jax.tree_util.tree_unflatten(treedef, [saved[f"leaf{i:04d}"] for i in range(len(leaves))])
  dp.assert_same_step(got, want)
