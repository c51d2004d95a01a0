"""Keeps freed host memory in the process, so XLA's CPU buffers are not re-faulted each step.

XLA's CPU runtime allocates an executable's scratch buffer afresh on every call
(about 2 GB for a 256-px SCOAT-Net train step of batch 2) from one of its
worker threads. glibc serves a request that large from a fresh `mmap` and
returns it with `munmap` on free, so the kernel maps and zeroes every page of
it again on the next call: 0.5 million page faults and ~0.8 s of system time
per 256-px step on the 2-core machine, a quarter of its CPU time.

`keep_freed_memory` tells glibc to serve every thread from its main heap, to
never use `mmap` for large blocks, and never to give freed heap back to the
system. The next call then reuses the pages of the last. The cost is memory:
the process holds its high-water mark until it exits, and a large block that no
longer fits the hole it left grows the heap once more (a 512-px prediction
loop settled at 4.6 GiB against 2.3 GiB without; benchmarks/README.md).

Only the command-line entry points call it (training, prediction, follow-up,
report, benchmarks), before JAX starts its threads: a library import must not change
the allocator of the program importing it. It does nothing outside glibc
(macOS, musl) and when `SCOAT_JAX_KEEP_HOST_MEMORY=0`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

_applied: bool | None = None


def keep_freed_memory() -> bool:
  """Configures glibc's malloc as described above; True if it was applied.

  Call before JAX creates its CPU client (the first `jax.devices()` or
  computation): threads that already have a malloc arena of their own keep it.
  Calling it again does nothing.
  """
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  if os.environ.get("SCOAT_JAX_KEEP_HOST_MEMORY", "1") == "0":
    return False
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  # One arena: glibc serves a block too large for a thread's own arena by mmap,
  # whatever M_MMAP_MAX says. A trim threshold of -1 turns trimming off (mallopt(3)).
  settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
  _applied = all(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1
                 for param, value in settings)
  return _applied
