"""U-Net, UNet++ and Attention U-Net (Table II baselines) and their shared blocks."""
import dataclasses
import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoat_jax.models import count_params, get_model, layers
from scoat_jax.models.attention_unet import AttentionUNet, UpConv
from scoat_jax.models.unet import UNet
from scoat_jax.models.unet_blocks import VGGBlock, VGGNode
from scoat_jax.models.unet_pp import UNetPlusPlus

TINY = (4, 8, 16, 32, 64)
ENCODER = {f"x_{i}_0" for i in range(5)}
UNET_DECODER = {"x_3_1", "x_2_2", "x_1_3", "x_0_4"}
UNETPP_DECODER = {f"x_{i}_{j}" for j in range(1, 5) for i in range(5 - j)}
ATTENDED = ("x_1_1", "x_2_1", "x_3_1", "x_1_2", "x_2_2", "x_1_3")


def _params_shape(model, size=64):
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                             jnp.zeros((1, size, size, 1)))
  return variables["params"]


def _variables(model, x):
  """Random variables of the right tree, drawn with NumPy.

  Eager `model.init` compiles one random-number kernel per parameter shape
  (~20 s for one tiny network on a 2-core machine); the tree comes from the
  same `init`, abstractly evaluated.
  """
  rng = np.random.default_rng(0)
  fill = lambda path, leaf: (
      jnp.ones(leaf.shape) if path[-1].key in ("scale", "var") else
      jnp.asarray(0.3 * rng.standard_normal(leaf.shape), jnp.float32))
  return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(model.init, jax.random.key(0), x))


def _apply(model, variables, x, **kwargs):
  """model.apply, compiled once (eager op-by-op dispatch compiles every op: ~3x slower here)."""
  return jax.jit(functools.partial(model.apply, **kwargs))(variables, x)


def _init_apply(model, size, batch=2, **kwargs):
  x = jax.random.normal(jax.random.key(1), (batch, size, size, 1))
  if size > 32:  # shapes only: abstract evaluation keeps the file fast
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    return variables, jax.eval_shape(functools.partial(model.apply, **kwargs), variables, x)
  variables = _variables(model, x)
  return variables, _apply(model, variables, x, **kwargs)


# Reference counts: trainable parameters (sum of p.numel() for p.requires_grad)
# at 1 input channel, 1 class, computed with torch 2.14 / MONAI 1.6 in /tmp/refvenv:
# - UNet, NestedUNet: a reproduction of 4uiiurz1/pytorch-nested-unet archs.py
#   (commit 4e36fdd), UNet(input_channels=1, num_classes=1) and
#   NestedUNet(input_channels=1, num_classes=1, deepsupervision=False / True);
# - monai.networks.nets.AttentionUnet(spatial_dims=2, in_channels=1,
#   out_channels=1, channels=(32, 64, 128, 256, 512), strides=(2, 2, 2, 2)).
@pytest.mark.parametrize("name, kwargs, expected", [
    ("unet", {}, 7_851_969),
    ("unet_pp", {"deep_supervision": False}, 9_162_753),
    ("unet_pp", {"deep_supervision": True}, 9_162_852),
    ("attention_unet", {}, 7_939_745),
])
def test_parameter_count_matches_reference(name, kwargs, expected):
  assert count_params(_params_shape(get_model(name, **kwargs))) == expected


def test_only_unet_pp_has_deep_supervision():
  fields = lambda cls: [f.name for f in dataclasses.fields(cls)]
  assert "deep_supervision" in fields(UNetPlusPlus)
  assert "deep_supervision" not in fields(UNet)
  assert "deep_supervision" not in fields(AttentionUNet)
  assert [f for f in fields(UNetPlusPlus) if f in ("conv", "node")] == ["conv", "node"]


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("cls", [UNet, AttentionUNet])
def test_single_head_output_shape(cls, size):
  _, y = _init_apply(cls(num_classes=3, widths=TINY), size)
  assert y.shape == (2, size, size, 3) and y.dtype == jnp.float32


@pytest.mark.parametrize("size", [32, 64])
def test_unet_pp_output_shapes_and_heads(size):
  variables, y = _init_apply(UNetPlusPlus(num_classes=2, deep_supervision=True, widths=TINY), size)
  assert isinstance(y, list) and len(y) == 4
  assert all(h.shape == (2, size, size, 2) and h.dtype == jnp.float32 for h in y)
  assert {f"head_{j}" for j in range(1, 5)} <= set(variables["params"])
  single = _params_shape(UNetPlusPlus(widths=TINY), size)
  assert {k for k in single if k.startswith("head")} == {"head_4"}


def test_names_follow_the_figure():
  unet = _params_shape(UNet(widths=TINY))
  assert set(unet) == ENCODER | UNET_DECODER | {"head"}
  assert set(unet["x_0_4"]) == {"conv1", "bn1", "conv2", "bn2"}

  unet_pp = _params_shape(UNetPlusPlus(widths=TINY))
  assert set(unet_pp) == ENCODER | UNETPP_DECODER | {"head_4"}
  for name in UNETPP_DECODER:  # rows 1-3 through the node (one more level), row 0 plain
    assert set(unet_pp[name]) == ({"block"} if name in ATTENDED else {"conv1", "bn1", "conv2", "bn2"})

  att = _params_shape(AttentionUNet(widths=TINY))
  gates, ups = {f"gate_{i}" for i in range(4)}, {f"up_{i}" for i in range(4)}
  assert set(att) == ENCODER | UNET_DECODER | gates | ups | {"head"}
  assert AttentionUNet.attention_maps == ("gate_0", "gate_1", "gate_2", "gate_3")
  assert UNet.attention_maps == () and UNetPlusPlus.attention_maps == ()
  assert UNet.input_multiple == UNetPlusPlus.input_multiple == AttentionUNet.input_multiple == 16


def test_wiring_matches_reference_widths():
  """Input widths of every node's first conv, as in the port's and MONAI's constructors."""
  w = TINY
  unet = _params_shape(UNet(widths=w))
  for i in range(4):
    assert unet[f"x_{i}_{4 - i}"]["conv1"]["kernel"].shape == (3, 3, w[i] + w[i + 1], w[i])
  assert unet["head"]["kernel"].shape == (1, 1, w[0], 1)

  unet_pp = _params_shape(UNetPlusPlus(widths=w))
  for name in UNETPP_DECODER:
    i, j = int(name[2]), int(name[4])
    block = unet_pp[name]["block"] if name in ATTENDED else unet_pp[name]
    assert block["conv1"]["kernel"].shape == (3, 3, w[i] * j + w[i + 1], w[i])

  att = _params_shape(AttentionUNet(widths=w))
  for i in range(4):
    assert att[f"up_{i}"]["conv"]["kernel"].shape == (3, 3, w[i + 1], w[i])
    assert att[f"gate_{i}"]["gating_conv"]["kernel"].shape == (1, 1, w[i], w[i] // 2)
    assert att[f"gate_{i}"]["psi_conv"]["kernel"].shape == (1, 1, w[i] // 2, 1)
    assert att[f"x_{i}_{4 - i}"]["conv"]["kernel"].shape == (3, 3, 2 * w[i], w[i])
    assert att[f"x_{i}_{4 - i}"]["prelu"]["negative_slope"].shape == ()
  assert att["x_1_0"]["conv1"]["kernel"].shape == (3, 3, w[0], w[1])


def test_attention_unet_sows_one_map_per_gate():
  model = AttentionUNet(widths=TINY)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 1))
  _, state = _apply(model, _variables(model, x), x, mutable=["intermediates"])
  for i, path in enumerate(model.attention_maps):
    (a,) = state["intermediates"][path]["attention"]
    size = 32 // 2**i
    assert a.shape == (2, size, size, 1) and bool(jnp.all((a >= 0) & (a <= 1)))


def _torch_conv_transpose(x, w):
  """PyTorch's ConvTranspose2d(k=3, stride=2, padding=1, output_padding=1), no bias, by definition.

  x: (B, H, W, C_in); w: PyTorch layout (C_in, C_out, 3, 3). Each input pixel
  (h, w) adds x * w[..., a, b] at (2h + a, 2w + b) of a (2H + 1)-grid; padding
  1 drops the first row/column, output_padding 1 keeps the last: 2H rows.
  """
  b, h, wd, _ = x.shape
  full = np.zeros((b, 2 * h + 1, 2 * wd + 1, w.shape[1]))
  for a in range(3):
    for c in range(3):
      full[:, a:a + 2 * h:2, c:c + 2 * wd:2] += np.einsum("bhwi,io->bhwo", x, w[:, :, a, c])
  return full[:, 1:, 1:]


def test_up_conv_equals_pytorch_transposed_conv():
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 5, 4, 3)))
  w = np.asarray(jax.random.normal(jax.random.key(1), (3, 6, 3, 3)))
  identity = lambda name: (lambda y: y)  # no BN; ReLU applied to the reference too
  params = {"conv": {"kernel": jnp.asarray(w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)),
                     "bias": jnp.zeros(6)}}
  y = UpConv(6, norm=identity).apply({"params": params}, jnp.asarray(x))
  assert y.shape == (2, 10, 8, 6)
  np.testing.assert_allclose(y, np.maximum(_torch_conv_transpose(x, w), 0), atol=1e-5)


class _GatedNode(nn.Module):
  """A test node with the `UNetPlusPlus.node` interface: sows a map, gates the up-sampled input."""
  features: int
  conv: Any
  norm: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, same_row, up):
    assert all(s.shape[-1] == self.features for s in same_row)
    assert up.shape[:3] == same_row[0].shape[:3]
    a = nn.sigmoid(self.conv(1, 1, name="gate")(same_row[-1]))
    self.sow("intermediates", "attention", a)
    self.sow("intermediates", "row_length", len(same_row))
    return VGGNode(self.features, conv=self.conv, norm=self.norm, dtype=self.dtype,
                   name="node")(same_row, up * a)


class _GatedUNetPlusPlus(UNetPlusPlus):
  node: Any = _GatedNode
  attention_maps: ClassVar[tuple[str, ...]] = ATTENDED


def test_subclass_node_extension_point():
  model = _GatedUNetPlusPlus(widths=TINY, deep_supervision=True)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 1))
  variables = _variables(model, x)
  heads, state = _apply(model, variables, x, mutable=["intermediates"])
  assert len(heads) == 4 and heads[-1].shape == (2, 32, 32, 1)
  params = variables["params"]
  for name in ATTENDED:
    i, j = int(name[2]), int(name[4])
    assert set(params[name]) == {"gate", "node"}
    (a,) = state["intermediates"][name]["attention"]
    assert a.shape == (2, 32 // 2**i, 32 // 2**i, 1)
    assert [int(n) for n in state["intermediates"][name]["row_length"]] == [j]
  assert set(state["intermediates"]) == set(ATTENDED)
  assert set(params["x_0_3"]) == {"conv1", "bn1", "conv2", "bn2"}  # row 0 stays plain
  # The base network sows nothing.
  plain = UNetPlusPlus(widths=TINY)
  _, state = jax.eval_shape(functools.partial(plain.apply, mutable=["intermediates"]),
                            _variables(plain, x), x)
  assert not state.get("intermediates")


def test_vgg_block_middle_and_stride():
  block = VGGBlock(8, conv=layers.conv_def(dtype=jnp.float32), norm=lambda name: (lambda y: y),
                   middle=5, strides=2)
  x = jnp.ones((1, 8, 8, 3))
  params = jax.eval_shape(block.init, jax.random.key(0), x)["params"]
  assert params["conv1"]["kernel"].shape == (3, 3, 3, 5)
  assert params["conv2"]["kernel"].shape == (3, 3, 5, 8)
  assert jax.eval_shape(block.apply, {"params": params}, x).shape == (1, 4, 4, 8)


@pytest.mark.parametrize("cls", [UNet, UNetPlusPlus, AttentionUNet])
def test_rejects_bad_sizes_and_channels(cls):
  with pytest.raises(ValueError, match="16"):
    jax.eval_shape(cls(widths=TINY).init, jax.random.key(0), jnp.zeros((1, 40, 40, 1)))
  with pytest.raises(ValueError, match="2 input channel"):
    jax.eval_shape(cls(widths=TINY, in_channels=2).init, jax.random.key(0),
                   jnp.zeros((1, 32, 32, 1)))
