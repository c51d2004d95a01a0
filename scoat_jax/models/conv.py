"""A 'same' convolution whose stride-1 weight gradient is fast on CPUs.

XLA's CPU backend computes the weight gradient of a 3x3 convolution as a
convolution over the batch and spatial axes, which is several times slower
than the forward pass (measured on a 2-core AVX2 machine: 2.4 s against
0.87 s for 2x256x256x64 -> 64; benchmarks/README.md). The same gradient is a sum of
k*k matrix products, one per kernel tap:

    dW[i, j] = sum_{b,h,w} x_pad[b, h+i, w+j, :]^T  g[b, h, w, :]

`conv2d_fast_weight_grad` keeps XLA's forward pass and input gradient (for
1x1 kernels as matrix products: XLA's CPU convolution ran those 3-10x slower
than the same product as a dot, e.g. 2x256x256x192 -> 32: 51 ms against 5 ms)
and swaps in a faster weight gradient through `jax.custom_vjp`:

* the native kernel of `scoat_jax.models.cpu_kernels` (AVX2/AVX-512, all of XLA's
  threads; 1.7-5.6x faster again on the 32-64-channel rows) where it builds, the
  computation runs on a single device, and the shape fits it;
* otherwise `weight_grad_by_taps`: the k*k products as XLA dots, looped with
  `lax.map` so only one shifted copy of the input is alive at a time
  (unrolled, nine copies of a 512x512 activation do not fit).

On GPUs and TPUs the native convolution gradient is already fast: `Conv` uses
the custom gradient only when the default backend is the CPU.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from scoat_jax.models import cpu_kernels

_DIMS = ("NHWC", "HWIO", "NHWC")


def _padding(kernel: jax.Array) -> tuple[tuple[int, int], tuple[int, int]]:
  kh, kw = kernel.shape[:2]
  return ((kh // 2, kh // 2), (kw // 2, kw // 2))


def conv2d_native(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 convolution with 'same' padding for odd kernels, NHWC x HWIO."""
  return lax.conv_general_dilated(x, kernel, (1, 1), _padding(kernel), dimension_numbers=_DIMS)


def weight_grad_by_taps(x: jax.Array, g: jax.Array, kernel_shape) -> jax.Array:
  """dL/dkernel of `conv2d_native` as one matrix product per kernel tap.

  Tap (i, j) of the gradient is the product of two (positions x channels)
  matrices, one of them shifted by the tap. The shifted operand is copied
  once per tap, so the narrower of `x` and `g` is the one shifted:

  * C_in <= C_out: dW[i, j] = sum_p x_pad[p + (i, j)]^T g[p];
  * otherwise, with g zero-extended by 2 * pad around the padded grid,
    dW[i, j] = sum_q x_pad[q]^T g_ext[q - (i, j)] over the padded grid q.

  The unshifted operand is laid out as (channels, positions) once, outside
  the tap loop: XLA's CPU dot wants its left operand that way and would
  otherwise transpose a fresh copy for every tap.

  Args:
    x: the convolution's input (B, H, W, C_in).
    g: the gradient of its output (B, H, W, C_out).
    kernel_shape: (kh, kw, C_in, C_out), kh and kw odd.

  Returns:
    The kernel gradient, shape `kernel_shape`, dtype of `x`.
  """
  kh, kw, cin, cout = kernel_shape
  batch, height, width, _ = x.shape
  ph, pw = kh // 2, kw // 2
  # Accumulate in float32 also for bfloat16 activations. XLA's CPU dot has no
  # bfloat16 x bfloat16 -> float32 kernel, so the operands are widened first.
  acc = jnp.promote_types(x.dtype, jnp.float32)
  out_dtype = x.dtype
  x, g = x.astype(acc), g.astype(acc)
  if kh == kw == 1:
    # The dot's left operand is the one XLA transposes: make it the narrower.
    if cin <= cout:
      d_kernel = jnp.einsum("bhwi,bhwo->io", x, g, preferred_element_type=acc)
    else:
      d_kernel = jnp.einsum("bhwo,bhwi->oi", g, x, preferred_element_type=acc).T
    return d_kernel.reshape(kernel_shape).astype(out_dtype)
  x_pad = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  taps = jnp.arange(kh * kw)

  if cin <= cout:
    g_t = g.reshape(-1, cout).T  # (C_out, positions)

    def shift_x(t):
      shifted = lax.dynamic_slice(x_pad, (0, t // kw, t % kw, 0), (batch, height, width, cin))
      return jnp.dot(g_t, shifted.reshape(-1, cin), preferred_element_type=acc)

    d_kernel = jnp.swapaxes(lax.map(shift_x, taps), 1, 2)  # (taps, C_out, C_in) -> (taps, C_in, C_out)
  else:
    x_t = x_pad.reshape(-1, cin).T  # (C_in, padded positions)
    g_ext = jnp.pad(g, ((0, 0), (2 * ph, 2 * ph), (2 * pw, 2 * pw), (0, 0)))
    padded = (batch, height + 2 * ph, width + 2 * pw, cout)

    def shift_g(t):
      shifted = lax.dynamic_slice(g_ext, (0, 2 * ph - t // kw, 2 * pw - t % kw, 0), padded)
      return jnp.dot(x_t, shifted.reshape(-1, cout), preferred_element_type=acc)

    d_kernel = lax.map(shift_g, taps)  # (taps, C_in, C_out)
  return d_kernel.reshape(kernel_shape).astype(out_dtype)


WEIGHT_GRADS = ("auto", "native", "taps", "xla")


def uses_native_kernel(x_shape, kernel_shape, dtype, weight_grad: str = "auto") -> bool:
  """Whether `weight_grad_cpu` takes the native kernel for this convolution.

  The kernel needs float32 and C_out % 8 == 0 and a single CPU device
  (`cpu_kernels.usable`). 'auto' also asks for a size at which it made the
  train step faster (`cpu_kernels.faster_than_xla`); 'native' takes it
  wherever it applies. The shape checks come first, so a model whose
  convolutions never qualify never builds it.
  """
  if weight_grad not in ("auto", "native"):
    return False
  return (cpu_kernels.supports(kernel_shape, dtype)
          and (weight_grad == "native" or cpu_kernels.faster_than_xla(x_shape, kernel_shape))
          and cpu_kernels.usable())


def weight_grad_cpu(x: jax.Array, g: jax.Array, kernel_shape, weight_grad: str = "auto"
                    ) -> jax.Array:
  """dL/dkernel of `conv2d_native`: the native kernel where chosen, else the per-tap dots."""
  if uses_native_kernel(x.shape, kernel_shape, x.dtype, weight_grad):
    return cpu_kernels.conv_weight_grad(x, g, kernel_shape)
  return weight_grad_by_taps(x, g, kernel_shape)


def conv2d_cpu(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv2d_native`, with 1x1 kernels as a matrix product over channels."""
  if kernel.shape[:2] == (1, 1):
    return lax.dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())))
  return conv2d_native(x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d_fast_weight_grad(x: jax.Array, kernel: jax.Array, weight_grad: str = "auto"
                            ) -> jax.Array:
  """`conv2d_cpu` with the weight gradient of `weight_grad_cpu`."""
  del weight_grad
  return conv2d_cpu(x, kernel)


def _fwd(x, kernel, weight_grad):
  del weight_grad
  return conv2d_cpu(x, kernel), (x, kernel)


def _bwd(weight_grad, residuals, g):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x_: conv2d_cpu(x_, kernel), x)
  (dx,) = input_vjp(g)
  return dx, weight_grad_cpu(x, g, kernel.shape, weight_grad).astype(kernel.dtype)


conv2d_fast_weight_grad.defvjp(_fwd, _bwd)


class Conv(nn.Module):
  """'Same' convolution, optionally strided or dilated, with or without bias.

  Same parameter names and shapes as `flax.linen.Conv` (`kernel`, and `bias`
  when `use_bias`), so checkpoints do not depend on which gradient is used.
  Networks receive it as their `conv` (a `functools.partial` of this class,
  see `scoat_jax.models.create_model`). Padding is PyTorch's
  `padding=dilation * (k // 2)` on both sides: a stride-s convolution of an
  input whose size divides by s gives size / s.

  Attributes:
    features: output channels.
    kernel_size: odd square kernel size.
    strides: stride of both spatial axes.
    dilation: kernel dilation of both spatial axes (atrous convolution).
    use_bias: add a learnt bias (convolutions followed by BatchNorm in ResNets
      have none).
    weight_grad: how the weight gradient of a stride-1, undilated convolution
      is computed on the CPU backend (GPUs and TPUs, and every other
      convolution, use XLA's): 'auto' (the native kernel where it is faster,
      else 'taps'), 'native' (the kernel wherever it applies), 'taps' (one XLA
      dot per kernel tap), 'xla' (XLA's own convolution gradient).
    dtype: compute dtype; parameters are float32.
    kernel_init, bias_init: initialisers.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  dilation: int = 1
  use_bias: bool = True
  weight_grad: str = "auto"
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kernel_size % 2 != 1:
      raise ValueError(f"kernel_size must be odd for 'same' padding, got {self.kernel_size}")
    if self.weight_grad not in WEIGHT_GRADS:
      raise ValueError(f"weight_grad={self.weight_grad!r}: use one of {WEIGHT_GRADS}")
    shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.strides != 1 or self.dilation != 1:
      pad = self.dilation * (self.kernel_size // 2)
      y = lax.conv_general_dilated(
          x, kernel, (self.strides, self.strides), ((pad, pad), (pad, pad)),
          rhs_dilation=(self.dilation, self.dilation), dimension_numbers=_DIMS)
    elif self.weight_grad == "xla" or jax.default_backend() != "cpu":
      y = conv2d_native(x, kernel)
    else:
      y = conv2d_fast_weight_grad(x, kernel, self.weight_grad)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y
