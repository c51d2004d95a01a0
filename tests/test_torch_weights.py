"""Import of the authors' PyTorch SCOAT-Net weights (no torch needed).

The PyTorch side is stood in for by (a) state_dicts spelled here from the
naming of the authors' code (docs/design.md, "PyTorch names"), independently of the importer's tables, and
(b) a NumPy forward pass over those names in PyTorch's NCHW layout. Parity with
a real torch model is checked outside CI (see the model's interop notes).
"""
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from scoat_jax.models import get_model, torch_weights
from scoat_jax.models.torch_weights import TorchWeightsError

TINY = (4, 8, 16, 32, 64)  # Attended nodes see >= 24 channels: SE reduction 16 fits.
ATTENDED = ((1, 1), (2, 1), (3, 1), (1, 2), (2, 2), (1, 3))
EPS = 1e-5


# ---------------------------------------------------------------- PyTorch side

def reference_shapes(in_channels, num_classes, deep_supervision, w=TINY):
  """Names and shapes of the authors' state_dict, spelled from the spec."""
  shapes = {}

  def conv(name, cin, cout, k):
    shapes[f"{name}.weight"] = (cout, cin, k, k)
    shapes[f"{name}.bias"] = (cout,)

  def bn(name, c):
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{name}.{leaf}"] = (c,)
    shapes[f"{name}.num_batches_tracked"] = ()

  def res(node, cin, cout):
    conv(f"{node}.conv1", cin, cout, 3)
    bn(f"{node}.bn1", cout)
    conv(f"{node}.conv2", cout, cout, 3)
    bn(f"{node}.bn2", cout)
    conv(f"{node}.downsample.0", cin, cout, 1)
    bn(f"{node}.downsample.1", cout)

  for i in range(5):
    res(f"conv{i}_0", in_channels if i == 0 else w[i - 1], w[i])
  for i in range(4):
    for j in range(1, 5 - i):
      cin = j * w[i] + w[i + 1]
      res(f"conv{i}_{j}", cin, w[i])
      if i:
        shapes[f"conv{i}_{j}.ca.fc.0.weight"] = (cin // 16, cin)
        shapes[f"conv{i}_{j}.ca.fc.2.weight"] = (cin, cin // 16)
        conv(f"att{i}_{j}.W_x.0", w[i], w[i], 1)
        bn(f"att{i}_{j}.W_x.1", w[i])
        conv(f"att{i}_{j}.W_y.0", w[i + 1], w[i], 1)
        bn(f"att{i}_{j}.W_y.1", w[i])
        conv(f"att{i}_{j}.active.0", w[i], 1, 1)
        bn(f"att{i}_{j}.active.1", 1)
  for head in ([f"final{j}" for j in range(1, 5)] if deep_supervision else ["final"]):
    conv(head, w[0], num_classes, 3)
  return shapes


def reference_state_dict(seed, in_channels, num_classes, deep_supervision):
  """Random weights and BN statistics, float32, in PyTorch layout."""
  rng = np.random.default_rng(seed)
  sd = {}
  for name, shape in reference_shapes(in_channels, num_classes, deep_supervision).items():
    leaf = name.rsplit(".", 1)[1]
    if leaf == "num_batches_tracked":
      sd[name] = np.array(7, np.int64)
    elif leaf == "running_var":
      sd[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    elif leaf == "weight" and len(shape) == 1:  # BN scale
      sd[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    elif leaf == "weight":
      fan_in = int(np.prod(shape[1:]))
      sd[name] = (rng.normal(size=shape) * np.sqrt(2 / fan_in)).astype(np.float32)
    else:  # biases and running means
      sd[name] = (0.1 * rng.normal(size=shape)).astype(np.float32)
  return sd


def np_conv(sd, name, x):
  """NCHW conv, stride 1, padding k // 2, with bias (PyTorch's Conv2d)."""
  w, b = sd[f"{name}.weight"].astype(np.float64), sd[f"{name}.bias"]
  k = w.shape[-1]
  p = k // 2
  xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
  h, wd = x.shape[2:]
  out = np.zeros((x.shape[0], w.shape[0], h, wd))
  for dy in range(k):
    for dx in range(k):
      out += np.einsum("oc,bchw->bohw", w[:, :, dy, dx], xp[:, :, dy:dy + h, dx:dx + wd])
  return out + b[None, :, None, None]


def np_bn(sd, name, x):
  g = lambda leaf: sd[f"{name}.{leaf}"][None, :, None, None]
  return (x - g("running_mean")) / np.sqrt(g("running_var") + EPS) * g("weight") + g("bias")


relu = lambda x: np.maximum(x, 0)
sigmoid = lambda x: 1 / (1 + np.exp(-x))


def np_res(sd, node, x):
  y = relu(np_bn(sd, f"{node}.bn1", np_conv(sd, f"{node}.conv1", x)))
  y = np_bn(sd, f"{node}.bn2", np_conv(sd, f"{node}.conv2", y))
  return relu(y + np_bn(sd, f"{node}.downsample.1", np_conv(sd, f"{node}.downsample.0", x)))


def np_up(x):
  """Bilinear x2 with align_corners=True, as interpolation matrices per axis."""
  def matrix(n):
    m = np.zeros((2 * n, n))
    for o in range(2 * n):
      s = o * (n - 1) / (2 * n - 1)
      lo = int(np.floor(s))
      m[o, lo] += 1 - (s - lo)
      m[o, min(lo + 1, n - 1)] += s - lo
    return m
  x = np.einsum("oh,bchw->bcow", matrix(x.shape[2]), x)
  return np.einsum("pw,bchw->bchp", matrix(x.shape[3]), x)


def np_pool(x):
  b, c, h, w = x.shape
  return x.reshape(b, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def np_forward(sd, x, deep_supervision):
  """The authors' SCOAT-Net forward pass in eval mode, NCHW, float64."""
  n = {(0, 0): np_res(sd, "conv0_0", x)}
  for d in range(1, 5):
    n[d, 0] = np_res(sd, f"conv{d}_0", np_pool(n[d - 1, 0]))
    for j in range(1, d + 1):
      i = d - j
      u = np_up(n[i + 1, j - 1])
      if i:
        att = f"att{i}_{j}"
        t = relu(np_bn(sd, f"{att}.W_x.1", np_conv(sd, f"{att}.W_x.0", n[i, j - 1])) +
                 np_bn(sd, f"{att}.W_y.1", np_conv(sd, f"{att}.W_y.0", u)))
        a = sigmoid(np_bn(sd, f"{att}.active.1", np_conv(sd, f"{att}.active.0", t)))
        u = u + a * u
      cat = np.concatenate([n[i, k] for k in range(j)] + [u], axis=1)
      if i:
        g = cat.mean(axis=(2, 3))
        v = sigmoid(relu(g @ sd[f"conv{i}_{j}.ca.fc.0.weight"].T) @ sd[f"conv{i}_{j}.ca.fc.2.weight"].T)
        cat = cat * v[:, :, None, None]
      n[i, j] = np_res(sd, f"conv{i}_{j}", cat)
  if deep_supervision:
    return [np_conv(sd, f"final{j}", n[0, j]) for j in range(1, 5)]
  return [np_conv(sd, "final", n[0, 4])]


# ------------------------------------------------------------------- Flax side

def flax_shapes(in_channels, num_classes, deep_supervision):
  model = get_model("scoat_net", num_classes=num_classes,
                    deep_supervision=deep_supervision, widths=TINY)
  x = jax.ShapeDtypeStruct((1, 32, 32, in_channels), jnp.float32)
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)


def random_variables(seed, shapes):
  """Random values on the Flax tree (variances positive)."""
  rng = np.random.default_rng(seed)
  out = {}
  for c in ("params", "batch_stats"):
    flat = traverse_util.flatten_dict(shapes[c])
    out[c] = traverse_util.unflatten_dict({
        p: (rng.uniform(0.5, 1.5, s.shape) if p[-1] == "var" else rng.normal(size=s.shape)
            ).astype(np.float32)
        for p, s in flat.items()})
  return out


def assert_trees_equal(a, b):
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert set(fa) == set(fb)
  for k in fa:
    assert np.asarray(fb[k]).dtype == np.float32, k
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


# ----------------------------------------------------------------------- tests

CONFIGS = [(c, k, ds) for c in (1, 3) for k in (1, 3) for ds in (False, True)]


@pytest.mark.parametrize("in_channels,num_classes,deep_supervision", CONFIGS)
def test_round_trip_and_authors_naming(in_channels, num_classes, deep_supervision):
  shapes = flax_shapes(in_channels, num_classes, deep_supervision)
  variables = random_variables(in_channels * 10 + num_classes + deep_supervision, shapes)
  sd = torch_weights.to_state_dict(variables)
  # Exactly the authors' names and PyTorch shapes, spelled independently above.
  want = reference_shapes(in_channels, num_classes, deep_supervision)
  assert {k: v.shape for k, v in sd.items()} == want
  assert torch_weights.infer_model_kwargs(sd) == dict(
      num_classes=num_classes, deep_supervision=deep_supervision,
      in_channels=in_channels, widths=TINY)
  loaded = torch_weights.load(sd)
  assert_trees_equal(variables, loaded)
  # And back: PyTorch -> Flax -> PyTorch is the identity too.
  again = torch_weights.to_state_dict(loaded)
  assert list(again) == list(sd)
  for k in sd:
    np.testing.assert_array_equal(again[k], sd[k], err_msg=k)


@pytest.mark.parametrize("in_channels,num_classes,deep_supervision", [(1, 1, False), (3, 3, True)])
def test_loaded_weights_give_the_reference_logits(in_channels, num_classes, deep_supervision):
  sd = reference_state_dict(5, in_channels, num_classes, deep_supervision)
  kw = torch_weights.infer_model_kwargs(sd)
  model = get_model("scoat_net", **{k: v for k, v in kw.items() if k != "in_channels"})
  variables = torch_weights.load(sd)
  x = np.random.default_rng(6).normal(size=(2, in_channels, 32, 32)).astype(np.float32)
  ref = np_forward(sd, x.astype(np.float64), deep_supervision)
  # One compilation instead of op-by-op dispatch of a few hundred ops.
  apply = jax.jit(functools.partial(model.apply, train=False))
  out = apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  out = out if deep_supervision else [out]
  assert len(out) == len(ref)
  for o, r in zip(out, ref):
    r = r.transpose(0, 2, 3, 1)
    assert o.shape == r.shape
    rel = np.linalg.norm(np.asarray(o, np.float64) - r) / np.linalg.norm(r)
    assert rel < 1e-5, rel
  # Identical trees (via the inverse) give identical logits.
  again = torch_weights.load(torch_weights.to_state_dict(variables))
  out2 = apply(again, jnp.asarray(x.transpose(0, 2, 3, 1)))
  for a, b in zip(out, out2 if deep_supervision else [out2]):
    np.testing.assert_array_equal(a, b)


def test_conv_and_dense_layouts_by_hand():
  sd = reference_state_dict(0, 1, 1, False)
  out_c, in_c = sd["conv1_0.conv1.weight"].shape[:2]
  w = np.zeros((out_c, in_c, 3, 3), np.float32)
  for o, i, y, x in np.ndindex(w.shape):
    w[o, i, y, x] = 1000 * o + 100 * i + 10 * y + x
  sd["conv1_0.conv1.weight"] = w
  fc = np.arange(24 * 1, dtype=np.float32).reshape(1, 24)  # (out=24//16, in=24)
  sd["conv1_1.ca.fc.0.weight"] = fc
  params = torch_weights.load(sd)["params"]
  kernel = np.asarray(params["x_1_0"]["conv1"]["kernel"])
  assert kernel.shape == (3, 3, in_c, out_c)
  # kernel[y, x, in, out] == weight[out, in, y, x]
  assert kernel[0, 2, 1, 3] == 3000 + 100 + 0 + 2
  assert kernel[2, 0, 3, 1] == 1000 + 300 + 20 + 0
  assert kernel[1, 2, 0, 7] == 7000 + 0 + 10 + 2
  dense = np.asarray(params["x_1_1"]["se"]["fc1"]["kernel"])
  assert dense.shape == (24, 1) and dense[5, 0] == 5 and dense[23, 0] == 23


def test_unknown_missing_and_misshaped_names_are_listed_together():
  sd = reference_state_dict(1, 1, 1, False)
  sd["conv9_9.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
  sd["att1_1.extra.bias"] = np.zeros(4, np.float32)
  del sd["att2_2.W_y.1.running_var"]
  del sd["conv0_3.downsample.0.bias"]
  sd["conv1_2.ca.fc.2.weight"] = np.zeros((3, 2), np.float32)
  with pytest.raises(TorchWeightsError) as info:
    torch_weights.load(sd)
  err, msg = info.value, str(info.value)
  assert sorted(err.unknown) == ["att1_1.extra.bias", "conv9_9.conv1.weight"]
  assert sorted(err.missing) == ["att2_2.W_y.1.running_var", "conv0_3.downsample.0.bias"]
  assert err.misshaped == [("conv1_2.ca.fc.2.weight", (3, 2), (32, 2))]
  for name in err.unknown + err.missing + ["conv1_2.ca.fc.2.weight"]:
    assert name in msg
  assert "\n" not in msg


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.pop("conv0_0.conv1.weight"), "cannot infer"),
    (lambda sd: sd.pop("final.weight"), "cannot infer"),
    (lambda sd: sd.update({"final1.weight": sd["final.weight"]}), "both 'final'"),
])
def test_architecture_that_cannot_be_inferred(edit, match):
  sd = reference_state_dict(2, 1, 1, False)
  edit(sd)
  with pytest.raises(TorchWeightsError, match=match):
    torch_weights.load(sd)


def test_npz_path_prefix_and_checkpoint_wrapper(tmp_path):
  sd = reference_state_dict(3, 3, 1, True)
  path = tmp_path / "weights.npz"
  np.savez(path, **{f"module.{k}": v for k, v in sd.items()})
  from_file = torch_weights.load(str(path))
  wrapped = torch_weights.load({"epoch": 12, "state_dict": sd})
  assert_trees_equal(from_file, wrapped)
  assert torch_weights.infer_model_kwargs(path)["in_channels"] == 3


def test_pth_without_torch_says_how_to_convert(tmp_path, monkeypatch):
  path = tmp_path / "weights.pth"
  path.write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  with pytest.raises(TorchWeightsError, match=r"needs PyTorch.*pip install torch.*\.npz"):
    torch_weights.load(path)


@pytest.mark.parametrize("src,match", [
    ("does/not/exist.npz", "does not exist"),
    (42, "mapping name -> array"),
])
def test_bad_sources(src, match):
  with pytest.raises(TorchWeightsError, match=match):
    torch_weights.read_state_dict(src)


def test_bad_file_types(tmp_path):
  odd = tmp_path / "weights.h5"
  odd.write_bytes(b"")
  with pytest.raises(TorchWeightsError, match="unknown weights file type"):
    torch_weights.read_state_dict(odd)
  broken = tmp_path / "weights.npz"
  broken.write_bytes(b"garbage")
  with pytest.raises(TorchWeightsError, match="cannot read"):
    torch_weights.read_state_dict(broken)


def test_to_state_dict_needs_both_collections():
  variables = random_variables(0, flax_shapes(1, 1, False))
  with pytest.raises(TorchWeightsError, match="batch_stats"):
    torch_weights.to_state_dict({"params": variables["params"]})
  sd = torch_weights.to_state_dict(variables, num_batches_tracked=False)
  assert not any(k.endswith("num_batches_tracked") for k in sd)
