"""Test-wide set-up: fake CPU devices and JAX's persistent compilation cache.

Both must be configured before JAX initialises its backends, which is why they
live here (pytest imports conftest before any test module).
"""
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from scoat_jax.common import parallel  # noqa: E402

# Four fake CPU devices: inference shards slices over them, and the batch-size
# checks see a multi-device mesh (single-device tests are unaffected: jit
# places work on device 0). No test takes a cross-device collective in this
# process (the train step's all-reduce runs in data_parallel_worker.py); if one
# ever stalls, XLA aborts after 120 s instead of hanging. Read when JAX creates
# its CPU backend, i.e. at first use, not at import.
os.environ.setdefault("XLA_FLAGS", parallel.fake_cpu_devices_xla_flags(4, collective_timeout_s=120))

_CACHE = pathlib.Path(
    os.environ.get("SCOAT_JAX_TEST_CACHE", pathlib.Path.home() / ".cache" / "scoat_jax" / "jax_test_cache"))
_CACHE.mkdir(parents=True, exist_ok=True)
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

# The shared tiny dataset, trained checkpoint and their helpers (fixtures for all modules).
pytest_plugins = ("trained_checkpoint",)

# Where the real COVID-SemiSeg slices live: $SCOAT_JAX_SEMISEG_DIR, or by default
# beside the checkout (BUILD.md, "Tests").
SEMISEG_DIR = pathlib.Path(os.environ.get(
    "SCOAT_JAX_SEMISEG_DIR",
    pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "covid-semiseg-train"))


# Real CT in HU (LIDC-IDRI slabs with nodule outlines, an abdomen with the lung bases):
# $SCOAT_JAX_REAL_CT_DIR, or by default beside the checkout; tests skip without it.
REAL_CT_DIR = pathlib.Path(os.environ.get(
    "SCOAT_JAX_REAL_CT_DIR",
    pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-ct"))
