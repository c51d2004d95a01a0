"""Test-wide set-up: fake CPU devices and JAX's persistent compilation cache.

Both must be configured before JAX initialises its backends, which is why they
live here (pytest imports conftest before any test module).
"""
import os
import pathlib

# Four fake CPU devices let the data-parallel tests run on a one-CPU machine.
# Single-device tests are unaffected: jit places work on device 0.
# XLA's CPU collectives abort the process when one device thread waits too long
# for the others at an all-reduce; on a loaded 2-core machine four device
# threads can fall that far apart, so the limit is raised well above any step.
os.environ.setdefault("XLA_FLAGS", " ".join((
    "--xla_force_host_platform_device_count=4",
    "--xla_cpu_collective_call_terminate_timeout_seconds=1800",
    "--xla_cpu_collective_timeout_seconds=1800",
)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = pathlib.Path(
    os.environ.get("SCOAT_JAX_TEST_CACHE", pathlib.Path.home() / ".cache" / "scoat_jax" / "jax_test_cache"))
_CACHE.mkdir(parents=True, exist_ok=True)
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

# The shared tiny dataset, trained checkpoint and their helpers (fixtures for all modules).
pytest_plugins = ("trained_checkpoint",)

# Where the real COVID-SemiSeg slices live, relative to the project root.
SEMISEG_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "covid-semiseg-train"


@pytest.fixture
def no_persistent_cache():
  """Compiles fresh instead of loading from the persistent cache.

  Executables with cross-device all-reduces over fake CPU devices, loaded from
  the persistent cache, deadlocked in XLA's CPU rendezvous on a 2-core machine
  (jaxlib 0.10.2); compiled fresh they run. Multi-device tests use this.
  """
  previous = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  yield
  jax.config.update("jax_enable_compilation_cache", previous)
