"""SCOAT-Net: exact size, wiring, shapes, up-sampling and input checks."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from scoat_jax.training import optimization
from scoat_jax.models import available_models, count_params, get_model, layers

TINY = (4, 8, 16, 32, 64)
ATTENDED = ("1_1", "2_1", "3_1", "1_2", "2_2", "1_3")
# One worker builds the module's tiny model once (`tiny_model_and_variables`).
pytestmark = pytest.mark.xdist_group("tiny_model")


def _shapes(model, in_channels, size=32):
  x = jnp.zeros((1, size, size, in_channels))
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)


@pytest.mark.parametrize("in_channels,deep_supervision,expected", [
    (1, False, 10_208_723),
    (1, True, 10_209_590),
    (3, False, 10_209_363),
])
def test_parameter_count_matches_authors_model(in_channels, deep_supervision, expected):
  model = get_model("scoat_net", num_classes=1, deep_supervision=deep_supervision)
  variables = _shapes(model, in_channels)
  assert count_params(variables["params"]) == expected


def test_parameter_tree_names_follow_the_figure():
  variables = _shapes(get_model("scoat_net", deep_supervision=True, widths=TINY), 1)
  params = variables["params"]
  nodes = {f"x_{i}_{j}" for i in range(5) for j in range(5 - i)}
  sams = {f"sam_{n}" for n in ATTENDED}
  heads = {f"head_{j}" for j in range(1, 5)}
  assert set(params) == nodes | sams | heads
  for n in ATTENDED:
    assert set(params[f"x_{n}"]) == {"se", "res"}
    assert set(params[f"sam_{n}"]) == {
        "lateral_conv", "lateral_bn", "up_conv", "up_bn", "psi_conv", "psi_bn"}
  assert set(params["x_0_3"]) == {
      "conv1", "bn1", "conv2", "bn2", "shortcut_conv", "shortcut_bn"}
  # SE has no biases; every conv has one.
  assert set(params["x_1_1"]["se"]["fc1"]) == {"kernel"}
  assert set(params["head_2"]) == {"kernel", "bias"}
  assert params["head_2"]["kernel"].shape == (3, 3, TINY[0], 1)
  # BN running statistics live beside their parameters.
  assert set(variables["batch_stats"]["sam_2_2"]["psi_bn"]) == {"mean", "var"}


def test_single_head_model_has_only_the_last_head():
  params = _shapes(get_model("scoat_net", widths=TINY), 1)["params"]
  assert [k for k in params if k.startswith("head")] == ["head_4"]


def test_upsample_align_corners_hand_computed_2x2():
  x = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
  # Output sample o of a length-2 axis sits at source o / 3: taps 0, 1/3, 2/3, 1.
  # Columns add 1 across the image and rows add 2, so out[r, c] = 1 + (c + 2r) / 3.
  expected = np.array([
      [3, 4, 5, 6],
      [5, 6, 7, 8],
      [7, 8, 9, 10],
      [9, 10, 11, 12],
  ], np.float32) / 3
  out = layers.upsample2x_align_corners(x)
  np.testing.assert_allclose(np.asarray(out)[0, :, :, 0], expected, rtol=1e-6)
  # Half-pixel resizing (jax.image.resize) is a different function.
  half_pixel = jax.image.resize(x, (1, 4, 4, 1), "bilinear")
  assert not np.allclose(half_pixel, out)


def test_max_pool_hand_case_and_gradient():
  x = jnp.asarray([[1.0, 5.0, 2.0, 0.0],
                   [3.0, 4.0, 7.0, 6.0]]).reshape(1, 2, 4, 1)
  np.testing.assert_array_equal(layers.max_pool2x(x).ravel(), [5.0, 7.0])
  # Gradient: each window's maximum gets the output's gradient, the rest 0.
  grad = jax.grad(lambda v: jnp.sum(layers.max_pool2x(v) * jnp.asarray([2.0, 3.0]).reshape(1, 1, 2, 1)))(x)
  np.testing.assert_array_equal(grad.reshape(2, 4), [[0, 2, 0, 0], [0, 0, 3, 0]])
  # Distinct values: the same forward and gradient as Flax's windowed max-pool.
  y = jax.random.normal(jax.random.key(0), (2, 8, 6, 3))
  ref = lambda v: jnp.sum(jnp.sin(nn.max_pool(v, (2, 2), strides=(2, 2))))
  ours = lambda v: jnp.sum(jnp.sin(layers.max_pool2x(v)))
  np.testing.assert_array_equal(ours(y), ref(y))
  np.testing.assert_array_equal(jax.grad(ours)(y), jax.grad(ref)(y))
  with pytest.raises(ValueError, match="even height and width"):
    layers.max_pool2x(jnp.zeros((1, 3, 4, 1)))


def _align_corners_matrix(n):
  """(2n, n) interpolation matrix of align-corners x2 up-sampling, by definition."""
  m = np.zeros((2 * n, n))
  for o in range(2 * n):
    s = o * (n - 1) / (2 * n - 1)
    lo = int(np.floor(s))
    hi = min(lo + 1, n - 1)
    m[o, lo] += 1 - (s - lo)
    m[o, hi] += s - lo
  return m


@pytest.mark.parametrize("height,width", [(3, 5), (1, 2), (8, 1)])
def test_upsample_align_corners_matches_reference_formula(height, width):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, height, width, 4)).astype(np.float32)
  out = np.asarray(layers.upsample2x_align_corners(jnp.asarray(x)))
  # Reference: explicit interpolation matrices, built from the definition.
  rows, cols = _align_corners_matrix(height), _align_corners_matrix(width)
  ref = np.einsum("oh,pw,bhwc->bopc", rows, cols, x)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  # Corners of input and output grids coincide.
  np.testing.assert_allclose(out[:, [0, -1]][:, :, [0, -1]], x[:, [0, -1]][:, :, [0, -1]], rtol=1e-6)
  # The gradient is the transposed interpolation.
  g = rng.normal(size=out.shape).astype(np.float32)
  grad = jax.grad(lambda v: jnp.sum(layers.upsample2x_align_corners(v) * g))(jnp.asarray(x))
  np.testing.assert_allclose(grad, np.einsum("oh,pw,bopc->bhwc", rows, cols, g), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("height,width", [(32, 32), (48, 32), (32, 80)])
@pytest.mark.parametrize("deep_supervision", [False, True])
@pytest.mark.parametrize("num_classes", [1, 3])
def test_output_shapes(height, width, deep_supervision, num_classes):
  model = get_model("scoat_net", num_classes=num_classes,
                    deep_supervision=deep_supervision, widths=TINY)
  x = jnp.zeros((2, height, width, 1))
  variables = _shapes(model, 1)
  out = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
  expected = (2, height, width, num_classes)
  if deep_supervision:
    assert isinstance(out, list) and [o.shape for o in out] == [expected] * 4
  else:
    assert out.shape == expected
    assert out.dtype == jnp.float32


@pytest.mark.parametrize("shape", [(1, 100, 100, 1), (1, 64, 72, 1)])
def test_sizes_not_multiple_of_16_are_refused(shape):
  model = get_model("scoat_net", widths=TINY)
  with pytest.raises(ValueError, match="divisible by 16"):
    model.init(jax.random.key(0), jnp.zeros(shape), train=False)


def test_missing_channel_axis_is_refused():
  model = get_model("scoat_net", widths=TINY)
  with pytest.raises(ValueError, match="NHWC"):
    model.init(jax.random.key(0), jnp.zeros((1, 32, 32)), train=False)


def test_unknown_model_and_bad_argument():
  assert "scoat_net" in available_models()
  with pytest.raises(ValueError, match="unknown model"):
    get_model("scoatnet")
  with pytest.raises(ValueError, match="bad arguments"):
    get_model("scoat_net", num_clases=1)


@pytest.fixture(scope="session")  # built once per worker, even if other modules' tests come between
def tiny_model_and_variables():
  model = get_model("scoat_net", num_classes=1, deep_supervision=True, widths=TINY)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 1))
  # Initialisation compiles unoptimised (3x faster; as in optimization.create_train_state).
  variables = jax.jit(functools.partial(model.init, train=False),
                      compiler_options=optimization.INIT_COMPILER_OPTIONS)(jax.random.key(0), x)
  return model, variables, x


def test_attention_maps_are_retrievable(tiny_model_and_variables):
  model, variables, x = tiny_model_and_variables
  logits, state = model.apply(variables, x, train=False, mutable=["intermediates"])
  maps = state["intermediates"]
  assert set(maps) == {f"sam_{n}" for n in ATTENDED}
  for name, sown in maps.items():
    i, j = (int(c) for c in name.split("_")[1:])
    (attention,) = sown["attention"]
    assert attention.shape == (2, 32 >> i, 32 >> i, 1)
    # A sigmoid: in (0, 1) mathematically, saturating to 1.0 in float32 for
    # untrained running statistics.
    assert np.all((attention > 0) & (attention <= 1))
  # Sowing does not change the forward function.
  plain = model.apply(variables, x, train=False)
  for a, b in zip(plain, logits):
    np.testing.assert_array_equal(a, b)


def test_train_mode_updates_running_statistics(tiny_model_and_variables):
  model, variables, x = tiny_model_and_variables
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  old = variables["batch_stats"]["x_0_0"]["bn1"]["mean"]
  new = updates["batch_stats"]["x_0_0"]["bn1"]["mean"]
  # Running mean starts at 0; one step moves it by 0.1 x the batch mean.
  assert np.all(old == 0) and np.any(new != 0)
  h = model.apply(variables, x, train=False)
  assert all(np.all(np.isfinite(o)) for o in h)


def test_bfloat16_compute_keeps_float32_params_and_close_logits(tiny_model_and_variables):
  model, variables, x = tiny_model_and_variables
  bf16 = get_model("scoat_net", num_classes=1, deep_supervision=True, widths=TINY,
                   dtype=jnp.bfloat16)
  assert jax.tree_util.tree_all(
      jax.tree_util.tree_map(lambda p: p.dtype == jnp.float32, variables["params"]))
  ref = model.apply(variables, x, train=False)[-1]
  low = bf16.apply(variables, x, train=False)[-1]
  assert low.dtype == jnp.float32
  rel = float(jnp.linalg.norm(low - ref) / jnp.linalg.norm(ref))
  assert rel < 0.05, rel


def test_every_network_shares_the_base_attributes_and_checks():
  """All ten networks are `base.Network`s: the five shared fields, their facts, one shape check."""
  from scoat_jax.models import base, model_class
  shared = ("num_classes", "widths", "dtype", "in_channels", "conv")
  for name in available_models():
    cls = model_class(name)
    assert issubclass(cls, base.Network), name
    fields = [f.name for f in dataclasses.fields(cls)]
    assert fields[:5] == list(shared), (name, fields)
    assert cls.input_multiple in (8, 16, 32), name
    with pytest.raises(ValueError, match=f"divisible by {cls.input_multiple} "):
      cls(widths=TINY if issubclass(cls, base.GridNetwork) else (4, 8, 8, 8, 8)).init(
          jax.random.key(0), jnp.zeros((1, cls.input_multiple + 4, cls.input_multiple, 1)))


def test_grid_memory_estimate_hand_computed():
  # Rows of 4, 8, 16, 32, 64 channels at 32, 16, 8, 4, 2 px: 4*1024 + 8*256 + 16*64 + 32*16
  # + 64*4 = 7936 pixel-channels; SCOAT-Net keeps 12 such arrays of 4-byte floats alive.
  model = get_model("scoat_net", widths=TINY)
  assert model.inference_bytes_per_slice(32) == 12 * 4 * 7936
  assert get_model("unet", widths=TINY).inference_bytes_per_slice(32) == 6 * 4 * 7936
  half = get_model("scoat_net", widths=TINY, dtype=jnp.bfloat16)
  assert half.inference_bytes_per_slice(32) == 12 * 2 * 7936


def test_grid_widths_must_give_five_rows():
  with pytest.raises(ValueError, match="widths must give 5 row widths"):
    get_model("unet", widths=(4, 8, 16)).init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
