"""UNet++ with three other attention modules (paper Table III): sizes, shapes, maps, wiring."""
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoat_jax.models import count_params, get_model, layers
from scoat_jax.models.conv import Conv
from scoat_jax.models.unet_blocks import VGGBlock
from scoat_jax.models.unet_pp_att_v1 import ResidualAttentionNode, SoftMaskBranch
from scoat_jax.models.unet_pp_att_v2 import AttentionGateNode
from scoat_jax.models.unet_pp_att_v3 import PyramidAttention
from scoat_jax.training import optimization

TINY = (4, 8, 16, 32, 64)
VARIANTS = ("unet_pp_att_v1", "unet_pp_att_v2", "unet_pp_att_v3")
ATTENDED = ("x_1_1", "x_2_1", "x_3_1", "x_1_2", "x_2_2", "x_1_3")
F32 = dict(conv=layers.conv_def(Conv, dtype=jnp.float32),
           norm=layers.norm_def(train=False, dtype=jnp.float32))


def _param_shapes(model, size=32):
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                        jnp.zeros((1, size, size, 1)))


def _filled(shapes, seed=0):
  """Variables of the given shapes without compiling an init: He-normal kernels, small
  random biases and BN parameters, unit running variances."""
  rng = np.random.default_rng(seed)
  def fill(path, s):
    leaf = path[-1].key
    if leaf == "kernel":
      return rng.normal(0, np.sqrt(2 / np.prod(s.shape[:-1])), s.shape).astype(np.float32)
    if leaf == "scale":
      return (1 + 0.1 * rng.normal(size=s.shape)).astype(np.float32)
    if leaf == "var":
      return np.ones(s.shape, np.float32)
    return (0.1 * rng.normal(size=s.shape)).astype(np.float32)  # bias, BN bias, mean
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _sown_paths(tree, prefix=()):
  """'/'-joined paths of every module that sowed `attention`, with what it sowed."""
  out = {}
  for key, value in tree.items():
    if key == "attention":
      out["/".join(prefix)] = value
    else:
      out.update(_sown_paths(value, prefix + (key,)))
  return out


# Counted with count_params on eval_shape (no reference implementation exists), and
# equal to hand counts: UNet++ (9,162,753 / 9,162,852, the 4uiiurz1 NestedUNet port) plus
# V1: six mask branches, 9 w (C + w) + 2 w^2 + 12 w each (C node input, w node width): 4,468,992;
# V2: ten gates on skips of C channels gated by u of G, C^2/2 + G C/2 + 3.5 C + 3 each: 212,510;
# V3: three bias-free 1x1 score convolutions of C weights per node: 7,296.
@pytest.mark.parametrize("name,deep_supervision,expected", [
    ("unet_pp_att_v1", False, 13_631_745),
    ("unet_pp_att_v1", True, 13_631_844),
    ("unet_pp_att_v2", False, 9_375_263),
    ("unet_pp_att_v2", True, 9_375_362),
    ("unet_pp_att_v3", False, 9_170_049),
    ("unet_pp_att_v3", True, 9_170_148),
])
def test_parameter_count_matches_docstring(name, deep_supervision, expected):
  model = get_model(name, num_classes=1, deep_supervision=deep_supervision)
  assert count_params(_param_shapes(model)["params"]) == expected
  assert f"{expected:,}" in sys.modules[type(model).__module__].__doc__


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("deep_supervision", [False, True])
def test_output_shapes(name, size, deep_supervision):
  model = get_model(name, num_classes=3, deep_supervision=deep_supervision, widths=TINY)
  x = jax.ShapeDtypeStruct((2, size, size, 1), jnp.float32)
  out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], x)
  heads = out if deep_supervision else [out]
  assert len(heads) == (4 if deep_supervision else 1)
  for h in heads:
    assert h.shape == (2, size, size, 3) and h.dtype == jnp.float32


def test_parameter_trees_name_the_figure():
  trees = {n: _param_shapes(get_model(n, widths=TINY))["params"] for n in VARIANTS}
  for params in trees.values():
    assert set(params["x_0_2"]) == {"conv1", "bn1", "conv2", "bn2"}  # row 0 stays plain
    assert "head_4" in params
  v1, v2, v3 = (trees[n] for n in VARIANTS)
  for n in ATTENDED:
    assert set(v1[n]) == {"trunk", "mask"}
    assert set(v1[n]["mask"]) == {"bottom", "conv1", "bn1", "conv2", "bn2"}
    assert set(v3[n]) == {"pyramid", "block"}
    assert set(v3[n]["pyramid"]) == {"scale_1_conv", "scale_2_conv", "scale_4_conv"}
    assert set(v3[n]["pyramid"]["scale_2_conv"]) == {"kernel"}  # no bias under a softmax
    j = int(n[-1])
    assert set(v2[n]) == {f"gate_{k}" for k in range(j)} | {"block"}
  assert set(v2["x_1_3"]["gate_2"]) == {
      "W_x_conv", "W_x_bn", "W_g_conv", "W_g_bn", "psi_conv", "psi_bn"}
  # F_int = half the skip's channels; the gating signal is u = up(x_2_2) (16 channels).
  assert v2["x_1_3"]["gate_2"]["W_x_conv"]["kernel"].shape == (1, 1, 8, 4)
  assert v2["x_1_3"]["gate_2"]["W_g_conv"]["kernel"].shape == (1, 1, 16, 4)


@pytest.fixture(scope="module", params=VARIANTS)
def tiny_forward(request):
  model = get_model(request.param, deep_supervision=True, widths=TINY)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 1))
  variables = _filled(_param_shapes(model))
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]),
                  compiler_options=optimization.INIT_COMPILER_OPTIONS)
  logits, state = apply(variables, x)
  return model, logits, state["intermediates"]


def test_attention_maps_are_sown_once_at_every_listed_path(tiny_forward):
  model, logits, intermediates = tiny_forward
  names = type(model).attention_maps
  assert len(names) == (10 if type(model).__name__ == "UNetPlusPlusAttentionGates" else 6)
  sown = _sown_paths(intermediates)
  assert set(sown) == set(names)
  for name, values in sown.items():
    (attention,) = values  # sown exactly once
    i = int(name.split("/")[0].split("_")[1])
    assert attention.shape == (2, 32 >> i, 32 >> i, 1)
    assert attention.dtype == jnp.float32
    assert np.all((attention >= 0) & (attention <= 1)) and np.all(np.isfinite(attention))
    assert float(np.ptp(attention)) > 0, name  # a map, not a constant
  assert all(np.all(np.isfinite(h)) for h in logits)


def test_residual_attention_node_is_one_plus_mask_times_trunk():
  keys = jax.random.split(jax.random.key(2), 3)
  same_row = [jax.random.normal(keys[0], (2, 8, 8, 8)), jax.random.normal(keys[1], (2, 8, 8, 8))]
  up = jax.random.normal(keys[2], (2, 8, 8, 16))
  node = ResidualAttentionNode(8, **F32)
  variables = _filled(jax.eval_shape(node.init, jax.random.key(0), same_row, up))
  out, state = node.apply(variables, same_row, up, mutable=["intermediates"],
                          capture_intermediates=True)
  trunk = state["intermediates"]["trunk"]["__call__"][0]
  mask = state["intermediates"]["mask"]["__call__"][0]
  assert mask.shape == trunk.shape == (2, 8, 8, 8)
  assert np.all((mask > 0) & (mask < 1))
  np.testing.assert_allclose(out, (1 + mask) * trunk, rtol=1e-6)
  # The trunk is the plain UNet++ node on cat(same_row, up).
  plain = VGGBlock(8, **F32).apply(
      {k: v["trunk"] for k, v in variables.items()}, jnp.concatenate(same_row + [up], -1))
  np.testing.assert_allclose(trunk, plain, rtol=1e-6)
  np.testing.assert_allclose(state["intermediates"]["mask"]["attention"][0],
                             mask.mean(-1, keepdims=True), rtol=1e-6)


def test_closed_attention_gate_removes_its_skip():
  keys = jax.random.split(jax.random.key(3), 4)
  skips = [jax.random.normal(k, (2, 8, 8, 8)) for k in keys[:2]]
  up = jax.random.normal(keys[2], (2, 8, 8, 16))
  node = AttentionGateNode(8, **F32)
  variables = _filled(jax.eval_shape(node.init, jax.random.key(0), skips, up))
  # gate_1's psi BN outputs -1e4 whatever its input: alpha = sigmoid(-1e4) = 0.
  psi_bn = variables["params"]["gate_1"]["psi_bn"]
  psi_bn["scale"], psi_bn["bias"] = np.zeros(1, np.float32), np.full(1, -1e4, np.float32)
  out, state = node.apply(variables, skips, up, mutable=["intermediates"])
  assert np.all(state["intermediates"]["gate_1"]["attention"][0] == 0)
  noise = 10 * jax.random.normal(keys[3], skips[1].shape)
  np.testing.assert_array_equal(node.apply(variables, [skips[0], noise], up), out)
  # ... equal to the block seeing zeros there; the open gate_0 still passes its skip.
  gated0 = node.apply(variables, skips, up, mutable=["intermediates"])[1]["intermediates"]
  alpha0 = gated0["gate_0"]["attention"][0]
  block = {k: v["block"] for k, v in variables.items()}
  expected = VGGBlock(8, **F32).apply(
      block, jnp.concatenate([alpha0 * skips[0], jnp.zeros_like(skips[1]), up], -1))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  assert not np.allclose(node.apply(variables, [noise, skips[1]], up), out)


def test_pyramid_attention_hand_case_uniform_scores():
  x = jax.random.normal(jax.random.key(4), (2, 8, 8, 6))
  module = PyramidAttention(conv=F32["conv"])
  variables = jax.tree_util.tree_map(  # all scores 0: uniform softmaxes
      lambda s: jnp.zeros(s.shape), jax.eval_shape(module.init, jax.random.key(0), x))
  y, state = module.apply(variables, x, mutable=["intermediates"])
  # Each scale's map is 1/positions: A = (1/64 + 1/16 + 1/4) / 3 = 21/192 everywhere.
  np.testing.assert_allclose(y, (1 + 21 / 192) * x, rtol=1e-6)
  np.testing.assert_allclose(state["intermediates"]["attention"][0], 1.0, rtol=1e-6)


def test_pyramid_attention_matches_a_numpy_reference():
  x = jax.random.normal(jax.random.key(5), (2, 8, 8, 6))
  module = PyramidAttention(conv=F32["conv"])
  variables = _filled(jax.eval_shape(module.init, jax.random.key(0), x))
  y, state = module.apply(variables, x, mutable=["intermediates"])
  xn = np.asarray(x, np.float64)
  total = 0
  for s in (1, 2, 4):
    pooled = xn.reshape(2, 8 // s, s, 8 // s, s, 6).max(axis=(2, 4))
    score = pooled @ np.asarray(variables["params"][f"scale_{s}_conv"]["kernel"][0, 0])
    e = np.exp(score - score.max(axis=(1, 2, 3), keepdims=True))
    l = e / e.sum(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(l.sum(axis=(1, 2, 3)), 1.0)
    for _ in range(s.bit_length() - 1):
      l = np.asarray(layers.upsample2x_align_corners(jnp.asarray(l, jnp.float32)))
    total = total + l
  attention = total / 3
  np.testing.assert_allclose(y, (1 + attention) * xn, rtol=1e-5)
  np.testing.assert_allclose(state["intermediates"]["attention"][0],
                             attention / attention.max(axis=(1, 2, 3), keepdims=True), rtol=1e-5)


def test_sizes_the_modules_cannot_take_are_refused():
  x = jnp.zeros((1, 6, 6, 4))
  with pytest.raises(ValueError, match="divide by 4"):
    PyramidAttention(conv=F32["conv"]).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="even height and width"):
    SoftMaskBranch(4, **F32).init(jax.random.key(0), jnp.zeros((1, 5, 5, 4)))
  # Networks: UNet++'s multiple of 16 for V1 and V2; 32 for V3 (row-3 nodes down-sampled by 4).
  assert [get_model(n).input_multiple for n in VARIANTS] == [16, 16, 32]
  for name, size in [("unet_pp_att_v1", 24), ("unet_pp_att_v2", 40), ("unet_pp_att_v3", 48)]:
    model = get_model(name, widths=TINY)
    with pytest.raises(ValueError, match="divisible by"):
      _param_shapes(model, size)
  # V1 down to 16 px input (row-3 nodes 2x2, their masks pooled to 1x1).
  assert count_params(_param_shapes(get_model("unet_pp_att_v1", widths=TINY), 16)["params"]) > 0
