"""The CPU convolution with per-tap weight gradients equals the native one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoat_jax.training import optimization
from scoat_jax.models import conv as conv_lib
from scoat_jax.models import get_model, make_conv


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# Every (kernel, C_in, C_out) pattern of SCOAT-Net, at tiny sizes: 3x3 body
# convs, 1x1 shortcuts and SAM convs, the 1x1 conv to one channel, 3x3 heads.
@pytest.mark.parametrize("k,cin,cout,size", [
    (3, 1, 8, 32), (3, 8, 8, 32), (3, 24, 8, 16), (1, 24, 8, 16),
    (1, 8, 1, 16), (3, 8, 1, 32), (3, 48, 16, 8), (1, 3, 4, 8),
])
def test_gradients_match_native(k, cin, cout, size):
  kx, kw, kg = jax.random.split(jax.random.key(k * 100 + cin), 3)
  x = jax.random.normal(kx, (2, size, size + 16, cin))
  w = jax.random.normal(kw, (k, k, cin, cout)) / np.sqrt(k * k * cin)
  g = jax.random.normal(kg, (2, size, size + 16, cout))
  fast_out, fast_vjp = jax.vjp(conv_lib.conv2d_fast_weight_grad, x, w)
  ref_out, ref_vjp = jax.vjp(conv_lib.conv2d_native, x, w)
  (dx_fast, dw_fast), (dx_ref, dw_ref) = fast_vjp(g), ref_vjp(g)
  if k == 1:  # a matrix product over channels: the same sums in another order
    assert _rel(fast_out, ref_out) <= 1e-6 and _rel(dx_fast, dx_ref) <= 1e-6
  else:  # XLA's own forward pass and input gradient
    np.testing.assert_array_equal(fast_out, ref_out)
    np.testing.assert_array_equal(dx_fast, dx_ref)
  assert _rel(dw_fast, dw_ref) <= 1e-5


def test_one_by_one_forward_hand_case():
  # y[b, h, w, o] = sum_c x[b, h, w, c] * W[0, 0, c, o]: per pixel, a 1x2 @ 2x3 product.
  x = jnp.asarray([[[[1.0, 2.0]], [[3.0, -1.0]]]])  # (1, 2, 1, 2)
  w = jnp.asarray([[[[1.0, 0.0, 2.0], [0.5, -1.0, 1.0]]]])  # (1, 1, 2, 3)
  expected = np.array([[[[2.0, -2.0, 4.0]], [[2.5, 1.0, 5.0]]]], np.float32)
  np.testing.assert_array_equal(conv_lib.conv2d_fast_weight_grad(x, w), expected)


def test_weight_grad_hand_case():
  # 1x1 input of ones, 3x3 kernel, one channel: only the centre tap sees
  # the input, so dW is g at the centre and 0 elsewhere.
  x = jnp.ones((1, 1, 1, 1))
  g = jnp.full((1, 1, 1, 1), 2.5)
  dw = conv_lib.weight_grad_by_taps(x, g, (3, 3, 1, 1))
  expected = np.zeros((3, 3, 1, 1), np.float32)
  expected[1, 1] = 2.5
  np.testing.assert_array_equal(dw, expected)


@pytest.mark.parametrize("cin,cout", [(2, 3), (3, 2)])  # x shifted; g shifted
def test_weight_grad_matches_numpy_loop(cin, cout):
  # The definition, dW[i, j] = sum_{b,h,w} x_pad[b, h+i, w+j]^T g[b, h, w], as loops.
  rng = np.random.default_rng(cin)
  x = rng.normal(size=(2, 4, 5, cin)).astype(np.float32)
  g = rng.normal(size=(2, 4, 5, cout)).astype(np.float32)
  x_pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  expected = np.zeros((3, 3, cin, cout), np.float64)
  for i in range(3):
    for j in range(3):
      for h in range(4):
        for w in range(5):
          expected[i, j] += np.einsum("bi,bo->io", x_pad[:, h + i, w + j], g[:, h, w])
  dw = conv_lib.weight_grad_by_taps(jnp.asarray(x), jnp.asarray(g), (3, 3, cin, cout))
  np.testing.assert_allclose(dw, expected, rtol=1e-5, atol=1e-5)


def test_model_gradients_match_with_and_without_fast_grad():
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
  kwargs = dict(widths=(4, 8, 16, 32, 64), deep_supervision=True)
  fast = get_model("scoat_net", conv=make_conv("taps"), **kwargs)
  native = get_model("scoat_net", conv=make_conv("xla"), **kwargs)
  # Initialisation compiles unoptimised (3x faster; as in optimization.create_train_state).
  variables = jax.jit(lambda k: fast.init(k, x, train=False),
                      compiler_options=optimization.INIT_COMPILER_OPTIONS)(jax.random.key(1))

  def grads(model):
    def loss(params):
      out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                           train=True, mutable=["batch_stats"])
      return sum(jnp.mean(o ** 2) for o in out)
    return jax.jit(jax.grad(loss))(variables["params"])

  g_fast, g_native = grads(fast), grads(native)
  flat = lambda t: jnp.concatenate([jnp.ravel(l) for l in jax.tree_util.tree_leaves(t)])
  assert _rel(flat(g_fast), flat(g_native)) <= 1e-5


@pytest.mark.parametrize("k", [1, 3])
def test_bfloat16_gradients_run_on_cpu_and_match_float32(k):
  # The bfloat16 train step on the CPU goes through this gradient; XLA's CPU dot
  # has no bfloat16 x bfloat16 -> float32 kernel, so this once failed at run time.
  kx, kw, kg = jax.random.split(jax.random.key(7), 3)
  x = jax.random.normal(kx, (2, 16, 16, 8))
  w = jax.random.normal(kw, (k, k, 8, 4)) / np.sqrt(8 * k * k)
  g = jax.random.normal(kg, (2, 16, 16, 4))
  for wide_input in (True, False):  # both shifting branches: C_in > C_out and C_in < C_out
    xs, ws, gs = (x, w, g) if wide_input else (g, jnp.swapaxes(w, 2, 3), x)
    ref = jax.jit(lambda a, b: conv_lib.weight_grad_by_taps(a, b, ws.shape))(xs, gs)
    _, vjp = jax.vjp(jax.jit(conv_lib.conv2d_fast_weight_grad),
                     xs.astype(jnp.bfloat16), ws.astype(jnp.bfloat16))
    dx, dw = vjp(gs.astype(jnp.bfloat16))
    assert dw.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16
    assert _rel(dw.astype(jnp.float32), ref) <= 2e-2
