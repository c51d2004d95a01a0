"""The data-parallel test's train steps, in a fresh process (driven by test_data_parallel.py).

Usage: python data_parallel_worker.py OUT.pkl
Takes the test's train step on four fake CPU devices and on one, and pickles
`{4: result, 1: result}`, each (loss, gradients, parameters, BN statistics) as
NumPy arrays. Nothing else runs in this process, its executables are compiled
fresh (no persistent cache), and XLA aborts it if a collective stalls (see
test_data_parallel.py for why).
"""
import os
import pickle
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
# XLA sizes its CPU thread pools max(cores, devices): 4 threads here for 4
# devices. Twice as many, so that device threads blocked in the all-reduce
# rendezvous cannot leave a device that has yet to reach it without a thread
# (our reading of the stall, which we could not reproduce; see
# test_data_parallel.py). Read when JAX creates its CPU backend.
os.environ.setdefault("PJRT_NPROC", "8")

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from scoat_jax.common import parallel  # noqa: E402

os.environ["XLA_FLAGS"] = parallel.fake_cpu_devices_xla_flags(4, collective_timeout_s=120)


def main():
  import test_data_parallel as dp  # Creates the CPU backend (jax.device_count()).
  assert jax.device_count() == 4, jax.devices()
  steps = {count: dp.one_step(dp._config(), jax.devices()[:count]) for count in (4, 1)}
  with open(sys.argv[1], "wb") as f:
    pickle.dump(steps, f)


if __name__ == "__main__":
  main()
