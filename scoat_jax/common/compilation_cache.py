"""JAX's persistent compilation cache, on by default for every entry point.

A SCOAT-Net train step takes tens of seconds to compile on a CPU; the cache
makes every later start (a resumed run, the next fold, predict) skip that.
"""
import os

import jax

DEFAULT_DIR = "~/.cache/scoat_jax/jax_cache"


def enable(directory: str | None = DEFAULT_DIR) -> None:
  """Turns the cache on in `directory` ("" or None leaves it off)."""
  if not directory:
    return
  path = os.path.expanduser(directory)
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
