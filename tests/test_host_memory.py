"""host_memory.keep_freed_memory: a large block freed by a worker thread is reused, not re-faulted."""
import os
import platform
import subprocess
import sys

import pytest

# In a fresh process: a worker thread allocates, touches and frees 256 MiB
# twice (as XLA's threads do with a step's scratch buffer); print the minor
# page faults of the second round. 256 MiB is 65,536 pages of 4 KiB.
_CHILD = r"""
import ctypes, ctypes.util, resource, threading
from scoat_jax.common import host_memory
applied = host_memory.keep_freed_memory()
assert host_memory.keep_freed_memory() == applied  # a second call changes nothing
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 256 * 2**20
def round_trip():  # plain malloc, as XLA's allocator (NumPy would ask for huge pages)
  block = libc.malloc(SIZE)
  ctypes.memset(block, 1, SIZE)
  libc.free(block)
faults = []
for _ in range(2):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  worker = threading.Thread(target=round_trip)
  worker.start()
  worker.join()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, faults[1])
"""

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="keep_freed_memory configures glibc's malloc only")


def _second_round_faults(keep: str) -> tuple[str, int]:
  env = {**os.environ, "SCOAT_JAX_KEEP_HOST_MEMORY": keep}
  proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                        env=env, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  applied, faults = proc.stdout.split()
  return applied, int(faults)


def test_freed_block_is_reused_without_page_faults():
  applied, faults = _second_round_faults("1")
  assert applied == "True"
  assert faults < 2_000, faults  # none of the 65,536 pages is faulted in again


def test_opt_out_leaves_glibc_as_it_is():
  # Without it, glibc maps the block afresh each time: every page faults again.
  applied, faults = _second_round_faults("0")
  assert applied == "False"
  assert faults > 60_000, faults
