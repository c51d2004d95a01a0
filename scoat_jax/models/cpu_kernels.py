"""The native CPU kernel for convolution weight gradients, built on first use.

`csrc/conv_weight_grad.cc` computes dL/dkernel of a stride-1 'same'
convolution with AVX2 (or, where the compiler targets it, AVX-512) fused
multiply-adds on all of XLA's intra-op threads (see that file). XLA's CPU
backend runs the same long-contraction product on one thread: for the
32-64-channel rows of SCOAT-Net the kernel is 1.7-5.6x faster than the per-tap
XLA dots on a 2-core AVX2 machine, and 1.7-4.9x on a 2-core AVX-512 one
(benchmarks/README.md has the tables).

The kernel is compiled with the system's C++ compiler the first time it is
needed (a few seconds) into `~/.cache/scoat_jax/kernels/<source hash>/`
($SCOAT_JAX_KERNEL_DIR overrides the folder) and registered with the XLA FFI.
Where it cannot be built (no compiler, no AVX2) `available()` is False, one
warning says why, and `scoat_jax.models.conv` keeps its pure-XLA path.
`config.cpu_weight_grad` chooses the path ('auto', 'native', 'taps', 'xla').
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

SOURCE = Path(__file__).parent / "csrc" / "conv_weight_grad.cc"
TARGET = "scoat_conv_weight_grad"
DEFAULT_DIR = "~/.cache/scoat_jax/kernels"
# With config.cpu_weight_grad='auto' the kernel is used only at sizes where it
# beat XLA's per-tap dots in the whole train step on a 2-core CPU
# (`benchmarks/conv_weight_grad.py`, benchmarks/README.md). Below this many
# pixels in the batch (the contraction's length) the threads' private copies of
# dW, zeroed and then added up, cost more than the short sum they hold, and
# XLA's dot wins (3x3 512 -> 512 over 2x16x16 px: 0.7x; 768 -> 256 over
# 2x16x16: 0.8x; over 2x32x32: 1.2x faster).
MIN_PIXELS = 1024
# Below this many multiply-adds (pixels x kernel elements) the kernel wins
# alone but not in the step: there XLA already runs small independent
# gradients side by side on its threads, which the kernel then takes over
# (the demo's quarter-width net, all below 2^27: 0.37-0.39 s per step with the
# kernel against 0.35-0.37 s without; paper widths at 128 px, mostly above:
# 5-14% faster with it, in two runs).
MIN_MULTIPLY_ADDS = 1 << 27


class KernelBuildError(RuntimeError):
  """The native kernel could not be compiled or loaded."""


def _compile_flags() -> list[str]:
  # SCOAT_JAX_KERNEL_MARCH (default native) lets a test build the AVX2 block on
  # an AVX-512 CPU (`haswell`); it is part of the cache key like every flag.
  march = os.environ.get("SCOAT_JAX_KERNEL_MARCH", "native")
  return ["-O3", f"-march={march}", "-std=c++17", "-shared", "-fPIC",
          "-I" + jax.ffi.include_dir()]


def _cpu_features() -> str:
  """The CPU's feature flags: -march=native code must not run on another CPU."""
  try:
    with open("/proc/cpuinfo") as f:
      return next((line for line in f if line.startswith("flags")), "")
  except OSError:
    return platform.processor()


def _compiler() -> str:
  return os.environ.get("CXX", "c++")


def _library_path() -> Path:
  compiler = _compiler()
  key = hashlib.sha256()
  key.update(SOURCE.read_bytes())
  key.update(" ".join([compiler] + _compile_flags() + [jax.__version__]).encode())
  key.update(_cpu_features().encode())  # home folders shared by hosts of several CPU types
  root = Path(os.path.expanduser(os.environ.get("SCOAT_JAX_KERNEL_DIR", DEFAULT_DIR)))
  return root / key.hexdigest()[:16] / "conv_weight_grad.so"


def build() -> Path:
  """Compiles the kernel if it is not in the cache; returns the library's path.

  Raises:
    KernelBuildError: not x86-64, no C++ compiler, or the compiler failed
      (for instance a CPU without AVX2 under -march=native).
  """
  library = _library_path()
  if library.exists():
    return library
  if platform.machine().lower() not in ("x86_64", "amd64"):
    raise KernelBuildError(f"the kernel is written for x86-64 (AVX2/AVX-512), this is {platform.machine()}")
  compiler = _compiler()
  if shutil.which(compiler) is None:
    raise KernelBuildError(f"no C++ compiler {compiler!r} on PATH (set CXX or install g++)")
  library.parent.mkdir(parents=True, exist_ok=True)
  # Compile to a private name and rename: concurrent first uses (test
  # workers, hosts sharing a home folder) never load a half-written file.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=library.parent)
  os.close(fd)
  try:
    result = subprocess.run([compiler, *_compile_flags(), str(SOURCE), "-o", tmp],
                            capture_output=True)
    # GCC quotes names with UTF-8 quotation marks under a UTF-8 locale, while
    # Python's locale encoding can be ASCII by then (a C library imported
    # earlier may have called setlocale): decode the bytes ourselves.
    stderr = result.stderr.decode("utf-8", errors="replace")
    if result.returncode != 0:
      first_error = next((line for line in stderr.splitlines() if "error" in line),
                         stderr.strip()[-300:])
      raise KernelBuildError(f"{compiler} failed on {SOURCE.name}: {first_error}")
    os.replace(tmp, library)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return library


@functools.cache
def available() -> bool:
  """Builds and registers the kernel once; False (with one warning) if it cannot."""
  try:
    library = ctypes.cdll.LoadLibrary(str(build()))
  except (KernelBuildError, OSError) as e:
    warnings.warn(f"scoat_jax: native CPU weight-gradient kernel unavailable ({e}); "
                  "using the per-tap XLA gradient instead (config.cpu_weight_grad='taps' "
                  "chooses it without this warning).", RuntimeWarning, stacklevel=2)
    return False
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.ScoatConvWeightGrad),
                              platform="cpu")
  return True


def usable() -> bool:
  """Built, and this process computes on a single CPU device.

  Under a multi-device jit XLA's partitioner would gather a custom call's
  sharded operands onto every device, so data-parallel CPU runs (fake test
  devices, several hosts) keep the XLA dots.
  """
  return jax.default_backend() == "cpu" and jax.device_count() == 1 and available()


def supports(kernel_shape, dtype) -> bool:
  """Whether `conv_weight_grad` can compute this gradient at all."""
  kh, kw, _, cout = kernel_shape
  return jnp.dtype(dtype) == jnp.float32 and kh % 2 == 1 and kw % 2 == 1 and cout % 8 == 0


def faster_than_xla(x_shape, kernel_shape) -> bool:
  """Whether the kernel beat the per-tap XLA dots for this size (see above)."""
  pixels = math.prod(x_shape[:-1])
  return pixels >= MIN_PIXELS and pixels * math.prod(kernel_shape) >= MIN_MULTIPLY_ADDS


def conv_weight_grad(x: jax.Array, g: jax.Array, kernel_shape) -> jax.Array:
  """dL/dkernel of a stride-1 'same' NHWC x HWIO convolution, by the native kernel.

  Call only where `available()` and `supports(...)` are True.

  Args:
    x: the convolution's input (B, H, W, C_in), float32.
    g: the gradient of its output (B, H, W, C_out), float32, C_out % 8 == 0.
    kernel_shape: (kh, kw, C_in, C_out), kh and kw odd.

  Returns:
    The kernel gradient, float32, shape `kernel_shape`.
  """
  out = jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32)
  return jax.ffi.ffi_call(TARGET, out)(x, g)
