"""One process of a two-process train step (driven by test_multihost.py).

Usage: python multihost_worker.py PORT PROCESS_ID OUT.npz
Each process has two fake CPU devices and feeds its half of the global batch;
process 0 writes the step's result (loss, gradients, parameters, BN statistics).
"""
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{sys.argv[1]}"
os.environ["JAX_NUM_PROCESSES"] = "2"
os.environ["JAX_PROCESS_ID"] = sys.argv[2]

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from scoat_jax.common import parallel  # noqa: E402

# Read when JAX creates its CPU backend (first use, below), not at import.
os.environ["XLA_FLAGS"] = parallel.fake_cpu_devices_xla_flags(2)


def main():
  assert parallel.maybe_initialize_distributed()
  import test_data_parallel as dp  # Touches jax.devices(): only after initialize().
  assert jax.process_count() == 2 and jax.device_count() == 4
  config = dp._config()
  batch = dp._batch(config)
  half = config.batch_size // 2
  mine = {k: v[jax.process_index() * half:(jax.process_index() + 1) * half] for k, v in batch.items()}
  result = dp.one_step(config, jax.devices(), local_batch=mine)
  if jax.process_index() == 0:
    leaves = jax.tree_util.tree_leaves(result)
    np.savez(sys.argv[3], **{f"leaf{i:04d}": np.asarray(x) for i, x in enumerate(leaves)})
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
