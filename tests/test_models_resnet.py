"""FCN, PSPNet and DeepLabV3 on the dilated ResNet-50: sizes, wiring, names, pooling, resizing."""
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from scoat_jax.models import conv as conv_lib
from scoat_jax.models import count_params, get_model, pspnet, resnet

TINY = (8, 16, 32, 64, 128)
NETWORKS = ("fcn", "pspnet", "deeplabv3")


def _shapes(model, size=32, in_channels=1):
  x = jnp.zeros((1, size, size, in_channels))
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)


def _random_variables(model, seed=0):
  """He-scaled random kernels, unit BN: the model's variables without compiling its init.

  (Compiling the init of a ResNet-50 takes longer on the CPU than its forward
  pass; `model.init` itself is traced by the parameter-count test.)
  """
  rng = np.random.default_rng(seed)

  def leaf(path, shape):
    if path[-1] == "kernel":
      return rng.standard_normal(shape.shape, np.float32) * np.sqrt(2 / np.prod(shape.shape[:-1]))
    return (np.ones if path[-1] in ("scale", "var") else np.zeros)(shape.shape, np.float32)

  flat = traverse_util.flatten_dict(_shapes(model))
  return traverse_util.unflatten_dict({k: leaf(k, v) for k, v in flat.items()})


# Reference counts, torchvision 0.29 in a separate venv, trainable parameters
# (sum of p.numel() for p.requires_grad), each model with
# `m.backbone.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)`:
#   fcn:       fcn_resnet50(weights=None, weights_backbone=None, num_classes=1, aux_loss=False)
#   deeplabv3: deeplabv3_resnet50(same arguments)
#   backbone:  sum over m.backbone.parameters() of either (IntermediateLayerGetter of resnet50)
# PSPNet has no torchvision model: 23,501,760 + 4 x (2048 x 512 + 1,024) + 9 x 4096 x 512
# + 1,024 + 513 (pspnet.py's docstring; hszhao/semseg's PPM and cls).
@pytest.mark.parametrize("name,expected", [
    ("fcn", 32_940_481),
    ("deeplabv3", 39_627_457),
    ("pspnet", 46_576_065),
])
def test_parameter_count_matches_reference(name, expected):
  params = _shapes(get_model(name, num_classes=1))["params"]
  assert count_params(params) == expected
  assert count_params(params["backbone"]) == 23_501_760


@pytest.mark.parametrize("name", NETWORKS)
def test_output_at_input_resolution(name):
  # One compile per mode: eval at 32 px, train (batch statistics) at 64 px.
  model = get_model(name, widths=TINY)
  variables = _random_variables(model)
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 1))
  logits = jax.jit(functools.partial(model.apply, train=False))(variables, x[:, :32, :32])
  assert logits.shape == (2, 32, 32, 1) and logits.dtype == jnp.float32
  trained, updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"],
                                               rngs={"dropout": jax.random.key(2)}))(variables, x)
  assert trained.shape == (2, 64, 64, 1) and trained.dtype == jnp.float32
  assert np.isfinite(np.asarray(trained)).all()
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
      variables["batch_stats"])
  three = get_model(name, widths=TINY, num_classes=3)
  assert _shapes(three, 32)["params"]["classifier"]["kernel"].shape == (1, 1, TINY[4] // (
      8 if name == "deeplabv3" else 4), 3)


def test_in_channels_is_checked():
  model = get_model("fcn", widths=TINY, in_channels=3)
  with pytest.raises(ValueError, match="3 input channel"):
    _shapes(model, 32, in_channels=1)


def test_parameter_tree_names_follow_the_figure():
  trees = {name: _shapes(get_model(name, widths=TINY))["params"] for name in NETWORKS}
  assert set(trees["fcn"]) == {"backbone", "head", "classifier"}
  assert set(trees["pspnet"]) == {"backbone", "ppm", "head", "classifier"}
  assert set(trees["pspnet"]["ppm"]) == {"bin_1", "bin_2", "bin_3", "bin_6"}
  assert set(trees["deeplabv3"]) == {"backbone", "aspp", "head", "classifier"}
  assert set(trees["deeplabv3"]["aspp"]) == {
      "conv1x1", "atrous_1", "atrous_2", "atrous_3", "image_pool", "project"}
  backbone = trees["fcn"]["backbone"]
  assert set(backbone) == {"stem", "layer1", "layer2", "layer3", "layer4"}
  assert set(backbone["stem"]) == {"conv", "bn"}
  assert backbone["stem"]["conv"]["kernel"].shape == (7, 7, 1, TINY[0])
  for i, blocks in enumerate(resnet.STAGE_SIZES, start=1):
    layer = backbone[f"layer{i}"]
    assert set(layer) == {f"block{k}" for k in range(blocks)}
    assert set(layer["block0"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample"}
    assert set(layer["block1"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3"}
    inner = TINY[i] // 4
    assert layer["block1"]["conv2"]["kernel"].shape == (3, 3, inner, inner)
    assert layer["block0"]["downsample"]["conv"]["kernel"].shape == (1, 1, TINY[i - 1], TINY[i])
  # Only the classifiers have a bias (every other conv is followed by BN).
  for tree in trees.values():
    for path in traverse_util.flatten_dict(tree):
      if path[-1] == "bias" and "bn" not in path[-2]:
        assert path == ("classifier", "bias"), path
  # The head widths: FCN and PSPNet C // 4, DeepLabV3's ASPP C // 8.
  assert trees["fcn"]["head"]["conv"]["kernel"].shape == (3, 3, 128, 32)
  assert trees["pspnet"]["ppm"]["bin_6"]["conv"]["kernel"].shape == (1, 1, 128, 32)
  assert trees["pspnet"]["head"]["conv"]["kernel"].shape == (3, 3, 256, 32)
  assert trees["deeplabv3"]["aspp"]["project"]["conv"]["kernel"].shape == (1, 1, 80, 16)


_CONV_LOG = []


class _RecordingConv(conv_lib.Conv):
  """Conv that notes (module path, kernel size, stride, dilation) in _CONV_LOG as it is traced."""

  def __call__(self, x):
    _CONV_LOG.append(("/".join(self.scope.path), self.kernel_size, self.strides, self.dilation))
    return super().__call__(x)


def _conv_log(name, **kwargs):
  _CONV_LOG.clear()
  _shapes(get_model(name, widths=TINY, conv=_RecordingConv, **kwargs), 32)
  return {path: rest for path, *rest in _CONV_LOG}


def test_strides_and_dilations_match_torchvision():
  # torchvision's resnet50(replace_stride_with_dilation=[False, True, True]):
  # layer2.0 strides 2; layer3.0.conv2 dilation 1, layer3.{1-5}.conv2 2;
  # layer4.0.conv2 2, layer4.{1,2}.conv2 4; shortcuts stride 1 except layer2's.
  convs = _conv_log("deeplabv3")
  expected = {"backbone/stem/conv": [7, 2, 1]}
  dilations = {1: (1, 1), 2: (1, 1), 3: (1, 2), 4: (2, 4)}
  for i, blocks in enumerate(resnet.STAGE_SIZES, start=1):
    for k in range(blocks):
      block = f"backbone/layer{i}/block{k}"
      stride = 2 if (i, k) == (2, 0) else 1
      expected[f"{block}/conv1"] = [1, 1, 1]
      expected[f"{block}/conv2"] = [3, stride, dilations[i][0 if k == 0 else 1]]
      expected[f"{block}/conv3"] = [1, 1, 1]
    expected[f"backbone/layer{i}/block0/downsample/conv"] = [1, 2 if i == 2 else 1, 1]
  expected.update({"aspp/conv1x1/conv": [1, 1, 1], "aspp/atrous_1/conv": [3, 1, 12],
                   "aspp/atrous_2/conv": [3, 1, 24], "aspp/atrous_3/conv": [3, 1, 36],
                   "aspp/image_pool/conv": [1, 1, 1], "aspp/project/conv": [1, 1, 1],
                   "head/conv": [3, 1, 1], "classifier": [1, 1, 1]})
  assert convs == expected
  assert _conv_log("deeplabv3", atrous_rates=(6, 12, 18))["aspp/atrous_3/conv"] == [3, 1, 18]
  assert resnet.stage_plan((False, True, True)) == [(1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 4)]
  assert resnet.stage_plan((False, False, True)) == [(1, 1, 1), (2, 1, 1), (2, 1, 1), (1, 1, 2)]


def test_backbone_output_stride_is_8():
  backbone = resnet.ResNet(TINY, conv=conv_lib.Conv,
                           norm=functools.partial(nn.BatchNorm, use_running_average=True))
  out = jax.eval_shape(lambda: backbone.init_with_output(
      jax.random.key(0), jnp.zeros((1, 64, 48, 1)))[0])
  assert {k: v.shape[1:3] for k, v in out.items()} == {
      "stem": (16, 12), "layer1": (16, 12), "layer2": (8, 6), "layer3": (8, 6), "layer4": (8, 6)}
  assert {k: v.shape[3] for k, v in out.items()} == dict(
      zip(("stem", "layer1", "layer2", "layer3", "layer4"), TINY))


def _adaptive_pool_direct(x, bins):
  """PyTorch's AdaptiveAvgPool2d, one bin at a time: [floor(i n / b), ceil((i + 1) n / b))."""
  b_, h, w, c = x.shape
  out = np.zeros((b_, bins, bins, c), np.float64)
  for i in range(bins):
    r0, r1 = (i * h) // bins, -(-((i + 1) * h) // bins)
    for j in range(bins):
      c0, c1 = (j * w) // bins, -(-((j + 1) * w) // bins)
      out[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
  return out


def test_adaptive_pool_matches_direct_computation():
  # Length 5 into 3 bins: [0, 2), [1, 4), [3, 5), overlapping.
  np.testing.assert_allclose(pspnet.adaptive_pool_matrix(5, 3), [
      [1 / 2, 1 / 2, 0, 0, 0], [0, 1 / 3, 1 / 3, 1 / 3, 0], [0, 0, 0, 1 / 2, 1 / 2]])
  # Length 2 into 3 bins repeats pixels: [0, 1), [0, 2), [1, 2).
  np.testing.assert_allclose(pspnet.adaptive_pool_matrix(2, 3),
                             [[1, 0], [1 / 2, 1 / 2], [0, 1]])
  x = np.random.default_rng(0).standard_normal((2, 7, 10, 3)).astype(np.float32)
  for bins in (1, 2, 3, 6, 4):
    np.testing.assert_allclose(pspnet.adaptive_avg_pool(jnp.asarray(x), bins),
                               _adaptive_pool_direct(x, bins), atol=1e-6)
  small = x[:, :4, :5]
  np.testing.assert_allclose(pspnet.adaptive_avg_pool(jnp.asarray(small), 6),
                             _adaptive_pool_direct(small, 6), atol=1e-6)


def _torch_bilinear_axis(n_in, n_out):
  """(n_out, n_in) weights of F.interpolate(bilinear, align_corners=False) on one axis."""
  m = np.zeros((n_out, n_in))
  for o in range(n_out):
    s = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = min(int(np.floor(s)), n_in - 1)
    i1 = min(i0 + 1, n_in - 1)
    m[o, i0] += 1 - (s - i0)
    m[o, i1] += s - i0
  return m


@pytest.mark.parametrize("shape_in,shape_out", [
    ((4, 4), (32, 32)), ((5, 7), (13, 9)), ((6, 6), (4, 4)), ((1, 1), (5, 6)), ((3, 5), (8, 2))])
def test_resize_bilinear_is_pytorchs_align_corners_false(shape_in, shape_out):
  x = np.random.default_rng(1).standard_normal((2, *shape_in, 3))
  rows = _torch_bilinear_axis(shape_in[0], shape_out[0])
  cols = _torch_bilinear_axis(shape_in[1], shape_out[1])
  expected = np.einsum("ph,bhwc,qw->bpqc", rows, x, cols)
  out = resnet.resize_bilinear(jnp.asarray(x, jnp.float32), *shape_out)
  np.testing.assert_allclose(out, expected, atol=1e-5)


# len(m.state_dict()) of the reference constructors above (num_batches_tracked included).
@pytest.mark.parametrize("name,torchvision_tensors", [("fcn", 326), ("deeplabv3", 362)])
def test_torchvision_name_map_covers_the_tree(name, torchvision_tensors):
  module = importlib.import_module(f"scoat_jax.models.{name}")
  variables = _shapes(get_model(name))
  # A state dict with torchvision's names and layouts, built through the inverse map:
  # it must have torchvision's size, and converting it must give back our tree.
  head = module.TORCHVISION_HEAD if name == "fcn" else module.torchvision_head_map()
  flax_to_torch = {v: k for k, v in {**resnet.torchvision_backbone_map(), **head}.items()}
  torch_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}
  state_dict = {}
  for path, leaf in traverse_util.flatten_dict(variables["params"]).items():
    torch_module, shape = flax_to_torch["/".join(path[:-1])], leaf.shape
    if path[-1] == "kernel":
      shape = (shape[3], shape[2], *shape[:2])
    state_dict[f"{torch_module}.{torch_leaf[path[-1]]}"] = np.zeros(shape)
    if path[-1] == "scale":
      for stat in ("running_mean", "running_var"):
        state_dict[f"{torch_module}.{stat}"] = np.zeros(shape)
      state_dict[f"{torch_module}.num_batches_tracked"] = np.zeros(())
  assert len(state_dict) == torchvision_tensors
  keys = ["backbone.layer3.0.downsample.1.running_var", "backbone.layer4.2.conv2.weight",
          "classifier.4.bias"]
  if name == "deeplabv3":
    keys += ["classifier.0.convs.4.1.weight", "classifier.0.project.1.bias"]
  assert set(keys) <= set(state_dict)
  converted = module.from_torchvision(state_dict)
  shapes = lambda tree: {k: np.shape(v) for k, v in traverse_util.flatten_dict(tree).items()}
  assert shapes(converted) == shapes(variables)
