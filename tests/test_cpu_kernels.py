"""The native CPU weight-gradient kernel against the definition and XLA."""
import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoat_jax.models import conv as conv_lib
from scoat_jax.models import cpu_kernels
from scoat_jax.models import get_model

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None, reason="no C++ compiler: the kernel cannot be built here")


def weight_grad_by_definition(x, g, kh, kw):
  """dW[i, j] = sum_{b,h,w} x_pad[b, h+i, w+j]^T g[b, h, w], in float64 NumPy."""
  _, height, width, _ = x.shape
  x_pad = np.pad(x.astype(np.float64), ((0, 0), (kh // 2,) * 2, (kw // 2,) * 2, (0, 0)))
  g = g.astype(np.float64)
  return np.stack([
      np.stack([np.einsum("bhwi,bhwo->io", x_pad[:, i:i + height, j:j + width], g)
                for j in range(kw)]) for i in range(kh)])


def kernel_grad(x, g, kernel_shape):
  assert cpu_kernels.available()
  assert cpu_kernels.supports(kernel_shape, x.dtype)
  return np.asarray(cpu_kernels.conv_weight_grad(jnp.asarray(x), jnp.asarray(g), kernel_shape))


def test_hand_case():
  # One pixel of ones: only the centre tap sees it, so dW is g there, 0 elsewhere.
  x = np.ones((1, 1, 1, 1), np.float32)
  g = np.arange(1, 9, dtype=np.float32).reshape(1, 1, 1, 8)
  expected = np.zeros((3, 3, 1, 8), np.float32)
  expected[1, 1, 0] = np.arange(1, 9)
  np.testing.assert_array_equal(kernel_grad(x, g, (3, 3, 1, 8)), expected)


# Every register-block remainder: C_in % 6 in 0..5, C_out of 8 (one 8-wide
# block), 16 and 24 (16 + 8); several images, rows that are not a multiple of
# the chunk, non-square images, 1x1, 3x3 and 5x5 kernels, a kernel larger than
# the image (taps whose every input pixel is padding, which the kernel skips).
DEFINITION_CASES = [
    (1, 5, 7, 1, 8, 3), (2, 9, 4, 7, 16, 3), (3, 4, 6, 13, 24, 3), (2, 6, 5, 6, 8, 1),
    (2, 8, 8, 32, 32, 3), (1, 7, 9, 5, 16, 5), (2, 3, 200, 4, 8, 3), (2, 40, 3, 2, 24, 1),
    (2, 2, 3, 3, 8, 5),
    # The AVX-512 blocks (12 x 32, 12 x 16, then 8 columns by AVX2) and their remainders.
    (2, 5, 9, 11, 40, 3), (1, 6, 7, 12, 48, 3), (2, 4, 5, 25, 56, 3), (1, 3, 17, 23, 8, 1),
]


@pytest.mark.parametrize("batch,height,width,cin,cout,k", DEFINITION_CASES)
def test_matches_definition(batch, height, width, cin, cout, k):
  rng = np.random.default_rng(cin * 100 + cout)
  x = rng.normal(size=(batch, height, width, cin)).astype(np.float32)
  g = rng.normal(size=(batch, height, width, cout)).astype(np.float32)
  expected = weight_grad_by_definition(x, g, k, k)
  np.testing.assert_allclose(kernel_grad(x, g, (k, k, cin, cout)), expected, rtol=1e-5, atol=1e-4)


def test_every_scoat_net_convolution_matches_xla():
  # Every convolution of the paper-width SCOAT-Net that the kernel can compute
  # (also those where XLA is faster and used), at 8x8 pixels: the kernel's
  # loops depend on the channels, not on the size.
  model = get_model("scoat_net", deep_supervision=True)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 16, 16, 1))))
  shapes = {tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
            if path[-1].key == "kernel" and leaf.ndim == 4}
  taken = sorted(s for s in shapes if cpu_kernels.supports(s, jnp.float32))
  assert len(taken) >= 20, taken  # all but the one-channel attention and head convs
  rng = np.random.default_rng(0)
  for shape in taken:
    kh, kw, cin, cout = shape
    x = jnp.asarray(rng.normal(size=(2, 8, 8, cin)).astype(np.float32))
    g = jnp.asarray(rng.normal(size=(2, 8, 8, cout)).astype(np.float32))
    w = jnp.zeros(shape)
    _, vjp = jax.vjp(lambda w_: conv_lib.conv2d_native(x, w_), w)
    (expected,) = vjp(g)
    got = kernel_grad(x, g, shape)
    rel = float(np.linalg.norm(got - expected) / np.linalg.norm(expected))
    assert rel <= 1e-5, (shape, rel)


def test_supports():
  assert cpu_kernels.supports((3, 3, 32, 32), jnp.float32)
  assert not cpu_kernels.supports((3, 3, 32, 32), jnp.bfloat16)
  assert not cpu_kernels.supports((3, 3, 32, 1), jnp.float32)  # C_out % 8
  assert not cpu_kernels.supports((2, 2, 32, 32), jnp.float32)  # even


def test_used_only_where_it_was_faster():
  assert cpu_kernels.faster_than_xla((2, 256, 256, 32), (3, 3, 32, 32))
  assert cpu_kernels.faster_than_xla((2, 512, 512, 1), (3, 3, 1, 32))
  assert cpu_kernels.faster_than_xla((2, 32, 32, 768), (3, 3, 768, 256))  # large dW
  assert not cpu_kernels.faster_than_xla((2, 16, 16, 768), (3, 3, 768, 256))  # few pixels
  assert not cpu_kernels.faster_than_xla((2, 128, 128, 8), (3, 3, 8, 8))  # the demo's row 0


def test_multi_device_runs_keep_the_xla_gradient():
  # conftest gives 4 fake devices: a custom call there would gather sharded
  # operands onto every device, so the dispatcher must use XLA's dots.
  assert jax.device_count() > 1
  x = jnp.ones((2, 8, 8, 8))
  g = jnp.ones((2, 8, 8, 8))
  hlo = jax.jit(lambda a, b: conv_lib.weight_grad_cpu(a, b, (3, 3, 8, 8))).lower(x, g).as_text()
  assert cpu_kernels.TARGET not in hlo
  assert cpu_kernels.TARGET in jax.jit(
      lambda a, b: cpu_kernels.conv_weight_grad(a, b, (3, 3, 8, 8))).lower(x, g).as_text()


def test_build_failure_falls_back_with_one_warning(tmp_path, monkeypatch):
  monkeypatch.setenv("SCOAT_JAX_KERNEL_DIR", str(tmp_path))
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  with pytest.raises(cpu_kernels.KernelBuildError, match="no C.. compiler"):
    cpu_kernels.build()
  monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
  with pytest.raises(cpu_kernels.KernelBuildError, match="false failed"):
    cpu_kernels.build()
  assert not list(tmp_path.rglob("*.so"))  # nothing half-written is left
  cpu_kernels.available.cache_clear()
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      assert not cpu_kernels.available()
    assert len(caught) == 1 and "per-tap XLA gradient" in str(caught[0].message)
  finally:
    cpu_kernels.available.cache_clear()


def test_compiler_messages_need_not_be_ascii(tmp_path, monkeypatch):
  # GCC quotes names with UTF-8 quotation marks, which once crashed the build
  # with UnicodeDecodeError in a process whose locale had become ASCII. Here a
  # compiler prints those and a byte that is not UTF-8 at all, then compiles,
  # or fails.
  if shutil.which("c++") is None:
    pytest.skip("no c++ on PATH")
  noisy = tmp_path / "noisy-c++"
  noisy.write_bytes(b"#!/bin/sh\nprintf '\\342\\200\\230x\\342\\200\\231: warning \\377\\n' >&2\n"
                    b"exec c++ \"$@\"\n")
  noisy.chmod(0o755)
  monkeypatch.setenv("SCOAT_JAX_KERNEL_DIR", str(tmp_path / "kernels"))
  monkeypatch.setenv("CXX", str(noisy))
  assert cpu_kernels.build().exists()
  monkeypatch.setenv("SCOAT_JAX_KERNEL_DIR", str(tmp_path / "failing"))
  noisy.write_bytes(b"#!/bin/sh\nprintf 'x.cc:1: error: \\342\\200\\230y\\342\\200\\231 \\377\\n' >&2\nexit 1\n")
  with pytest.raises(cpu_kernels.KernelBuildError, match="error: \u2018y\u2019"):
    cpu_kernels.build()


def test_same_result_on_every_run():
  # Each thread sums a fixed range of rows and the ranges are added in order,
  # so thread timing cannot change the float sums (train runs stay repeatable).
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 64, 64, 8)).astype(np.float32)
  g = rng.normal(size=(2, 64, 64, 16)).astype(np.float32)
  first = kernel_grad(x, g, (3, 3, 8, 16))
  for _ in range(5):
    np.testing.assert_array_equal(kernel_grad(x, g, (3, 3, 8, 16)), first)


def test_avx2_block_on_an_avx512_cpu(tmp_path):
  # Built for this CPU the kernel takes its AVX-512 block; CI machines differ,
  # so the AVX2 block is built here too (-march=haswell) and checked against
  # the definition, including the remainders, in a fresh process.
  flags = pathlib.Path("/proc/cpuinfo").read_text() if pathlib.Path("/proc/cpuinfo").exists() else ""
  if " avx512f" not in flags:
    pytest.skip("this CPU has no AVX-512: the other tests already run the AVX2 block")
  env = {**os.environ, "SCOAT_JAX_KERNEL_MARCH": "haswell", "SCOAT_JAX_KERNEL_DIR": str(tmp_path)}
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
       __file__, "-k", "hand_case or matches_definition"],
      capture_output=True, text=True, env=env, timeout=600,
      cwd=pathlib.Path(__file__).resolve().parents[1])
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert f"{len(DEFINITION_CASES) + 1} passed" in proc.stdout, proc.stdout[-500:]
  assert list(tmp_path.glob("*/*.so")), "the haswell build did not land in its folder"
