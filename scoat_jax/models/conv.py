"""A stride-1 'same' convolution whose weight gradient is fast on CPUs.

XLA's CPU backend computes the weight gradient of a 3x3 convolution as a
convolution over the batch and spatial axes, which is several times slower
than the forward pass (measured on a 2-core AVX2 machine: 2.4 s against
0.87 s for 2x256x256x64 -> 64; see BUILD.md). The same gradient is a sum of
k*k matrix products, one per kernel tap:

    dW[i, j] = sum_{b,h,w} x_pad[b, h+i, w+j, :]^T  g[b, h, w, :]

which the CPU runs as well-tuned GEMMs. `conv2d` keeps XLA's forward pass and
input gradient and swaps in that weight gradient through `jax.custom_vjp`.
The taps are looped with `lax.map` so only one shifted copy of the input is
alive at a time (unrolled, nine copies of a 512x512 activation do not fit).
On GPUs and TPUs the native convolution gradient is already fast: `Conv` uses
the custom gradient only when the default backend is the CPU.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_DIMS = ("NHWC", "HWIO", "NHWC")


def _padding(kernel: jax.Array) -> tuple[tuple[int, int], tuple[int, int]]:
  kh, kw = kernel.shape[:2]
  return ((kh // 2, kh // 2), (kw // 2, kw // 2))


def conv2d_native(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 convolution with 'same' padding for odd kernels, NHWC x HWIO."""
  return lax.conv_general_dilated(x, kernel, (1, 1), _padding(kernel), dimension_numbers=_DIMS)


def weight_grad_by_taps(x: jax.Array, g: jax.Array, kernel_shape) -> jax.Array:
  """dL/dkernel of `conv2d_native` as one matrix product per kernel tap.

  Args:
    x: the convolution's input (B, H, W, C_in).
    g: the gradient of its output (B, H, W, C_out).
    kernel_shape: (kh, kw, C_in, C_out), kh and kw odd.

  Returns:
    The kernel gradient, shape `kernel_shape`, dtype of `x`.
  """
  kh, kw, cin, cout = kernel_shape
  batch, height, width, _ = x.shape
  # Accumulate in float32 also for bfloat16 activations.
  acc = jnp.promote_types(x.dtype, jnp.float32)
  if kh == kw == 1:
    return jnp.einsum("bhwi,bhwo->io", x, g, preferred_element_type=acc).reshape(
        kernel_shape).astype(x.dtype)
  x_pad = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))

  def tap(t):
    shifted = lax.dynamic_slice(x_pad, (0, t // kw, t % kw, 0), (batch, height, width, cin))
    return jnp.einsum("bhwi,bhwo->io", shifted, g, preferred_element_type=acc)

  return lax.map(tap, jnp.arange(kh * kw)).reshape(kernel_shape).astype(x.dtype)


@jax.custom_vjp
def conv2d_fast_weight_grad(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv2d_native` with the weight gradient of `weight_grad_by_taps`."""
  return conv2d_native(x, kernel)


def _fwd(x, kernel):
  return conv2d_native(x, kernel), (x, kernel)


def _bwd(residuals, g):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x_: conv2d_native(x_, kernel), x)
  (dx,) = input_vjp(g)
  return dx, weight_grad_by_taps(x, g, kernel.shape).astype(kernel.dtype)


conv2d_fast_weight_grad.defvjp(_fwd, _bwd)


class Conv(nn.Module):
  """Stride-1 'same' convolution with bias (parameters `kernel`, `bias`).

  Same parameter names and shapes as `flax.linen.Conv`, so checkpoints do not
  depend on which gradient is used.

  Attributes:
    features: output channels.
    kernel_size: odd square kernel size (1 or 3 in SCOAT-Net).
    fast_cpu_grad: use `weight_grad_by_taps` when running on the CPU.
    dtype: compute dtype; parameters are float32.
    kernel_init, bias_init: initialisers.
  """
  features: int
  kernel_size: int = 3
  fast_cpu_grad: bool = True
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kernel_size % 2 != 1:
      raise ValueError(f"kernel_size must be odd for 'same' padding, got {self.kernel_size}")
    shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    use_fast = self.fast_cpu_grad and jax.default_backend() == "cpu"
    y = (conv2d_fast_weight_grad if use_fast else conv2d_native)(x, kernel)
    return y + bias
