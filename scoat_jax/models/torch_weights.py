"""Import weights trained with the authors' PyTorch SCOAT-Net (and export back).

The authors' model (GitHub: Phanzsx/SCOAT-Net) names its modules after the
UNet++ grid; this project's Flax tree uses the names of the paper's figure.
The correspondence (docs/design.md, "PyTorch names"):

    PyTorch                                   Flax (params / batch_stats)
    conv{i}_{j}.conv1|bn1|conv2|bn2           x_{i}_{j}/conv1|bn1|conv2|bn2
    conv{i}_{j}.downsample.0 / .1             x_{i}_{j}/shortcut_conv / shortcut_bn
      (the six attended nodes 1_1 2_1 3_1 1_2 2_2 1_3 put these under x_{i}_{j}/res/)
    conv{i}_{j}.ca.fc.0 / ca.fc.2             x_{i}_{j}/se/fc1 / se/fc2
    att{i}_{j}.W_x.0 / W_x.1                  sam_{i}_{j}/lateral_conv / lateral_bn
    att{i}_{j}.W_y.0 / W_y.1                  sam_{i}_{j}/up_conv / up_bn
    att{i}_{j}.active.0 / active.1            sam_{i}_{j}/psi_conv / psi_bn
    final  (one head)                         head_4
    final1 .. final4 (deep supervision)       head_1 .. head_4

Array layouts: conv `weight` (out, in, kh, kw) <-> `kernel` (kh, kw, in, out);
Linear `weight` (out, in) <-> `kernel` (in, out); BN `weight` <-> `scale`,
`bias` <-> `bias` (params), `running_mean` <-> `mean`, `running_var` <-> `var`
(batch_stats); `num_batches_tracked` is ignored on import.

Typical use:

    sd = read_state_dict('scoat_net.npz')      # or a .pth when torch is installed
    model = get_model('scoat_net', **infer_model_kwargs(sd))
    variables = load(sd)
    logits = model.apply(variables, x, train=False)

Reading a `.pth` needs PyTorch; everything else is NumPy and JAX only.
"""
from __future__ import annotations

import functools
import os
import pathlib
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from scoat_jax.models.scoat_net import DEPTH, SCOATNet

# Keys under which training scripts commonly wrap the state_dict in a checkpoint.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# Prefixes added by torch.nn.DataParallel / DistributedDataParallel and torch.compile.
_PREFIXES = ("module.", "_orig_mod.")
_TORCH_SUFFIXES = (".pth", ".pt", ".pth.tar", ".ckpt")
_IGNORED_LEAVES = ("num_batches_tracked",)

# Flax sub-module name -> PyTorch sub-module name, inside a node or a SAM.
_NODE_PARTS = {
    "conv1": "conv1", "bn1": "bn1", "conv2": "conv2", "bn2": "bn2",
    "shortcut_conv": "downsample.0", "shortcut_bn": "downsample.1",
}
_SE_PARTS = {"fc1": "ca.fc.0", "fc2": "ca.fc.2"}
_SAM_PARTS = {
    "lateral_conv": "W_x.0", "lateral_bn": "W_x.1",
    "up_conv": "W_y.0", "up_bn": "W_y.1",
    "psi_conv": "active.0", "psi_bn": "active.1",
}
# (collection, Flax leaf) -> PyTorch leaf. Kernels are told apart by rank.
_LEAVES = {
    ("params", "kernel"): "weight", ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var",
}
_TORCH_LEAF_ORDER = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # torch colours some error messages
_NODE_RE = re.compile(r"x_(\d)_(\d)$")
_SAM_RE = re.compile(r"sam_(\d)_(\d)$")
_HEAD_RE = re.compile(r"head_(\d)$")


class TorchWeightsError(ValueError):
  """A state_dict that cannot be read or does not fit SCOAT-Net.

  Attributes:
    unknown: names in the state_dict that SCOAT-Net does not have.
    missing: names SCOAT-Net needs that the state_dict lacks.
    misshaped: `(name, got_shape, expected_shape)` for arrays of the wrong shape.
  """

  def __init__(self, message: str, *, unknown=(), missing=(), misshaped=()):
    super().__init__(message)
    self.unknown = list(unknown)
    self.missing = list(missing)
    self.misshaped = list(misshaped)


def _to_numpy(value: Any, name: str) -> np.ndarray:
  if hasattr(value, "detach"):  # A torch tensor: no torch import needed here.
    value = value.detach().cpu()
    try:
      return value.numpy()
    except TypeError:  # bfloat16 has no NumPy twin.
      return value.float().numpy()
  array = np.asarray(value)
  if array.dtype == object:
    raise TorchWeightsError(
        f"state_dict entry {name!r} is a {type(value).__name__}, not an array: pass "
        f"model.state_dict() (names -> tensors), not a whole checkpoint object")
  return array


def _unwrap(src: Mapping) -> Mapping:
  """Strips checkpoint wrappers ({'state_dict': ..., 'epoch': ...})."""
  while True:
    if any(isinstance(k, str) and "." in k for k in src):
      return src  # Parameter names carry dots; a wrapper's keys do not.
    for key in _WRAPPER_KEYS:
      inner = src.get(key)
      if hasattr(inner, "state_dict") and callable(inner.state_dict):
        inner = inner.state_dict()  # A pickled nn.Module.
      if isinstance(inner, Mapping):
        src = inner
        break
    else:
      return src


def _read_torch_file(path: pathlib.Path) -> Mapping:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    stem = str(path)
    for suffix in _TORCH_SUFFIXES:
      if stem.endswith(suffix):
        stem = stem[: -len(suffix)]
        break
    raise TorchWeightsError(
        f"reading {path} needs PyTorch, which is not installed: pip install torch, "
        f"or convert it to .npz once where torch is available: python -c \"import "
        f"torch, numpy as np; sd = torch.load('{path}', map_location='cpu'); "
        f"sd = sd.get('state_dict', sd); np.savez('{stem}.npz', "
        f"**{{k: v.numpy() for k, v in sd.items()}})\"") from None
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types (pickle, zip, runtime).
    raise TorchWeightsError(
        f"torch.load could not read {path} ({type(e).__name__}: "
        f"{' '.join(_ANSI.sub('', str(e)).split())[:200]}): "
        f"save the weights with torch.save(model.state_dict(), path)") from None


def read_state_dict(src) -> dict[str, np.ndarray]:
  """Reads PyTorch weights into a plain `{name: np.ndarray}` dict.

  Args:
    src: a mapping name -> array or torch tensor (a `state_dict`, possibly
      wrapped in a checkpoint dict under 'state_dict', 'model_state_dict' or
      'model'), a torch `nn.Module`, a `.npz` path, or a `.pth`/`.pt` path
      (needs torch). A 'module.' (DataParallel) or '_orig_mod.' (torch.compile)
      prefix on every name is removed. `num_batches_tracked` entries are dropped.

  Returns:
    Names (without prefix) -> NumPy arrays, in the source's order.

  Raises:
    TorchWeightsError: unreadable file, unknown type, torch missing for a `.pth`.
  """
  if isinstance(src, (str, os.PathLike)):
    path = pathlib.Path(src)
    if not path.is_file():
      raise TorchWeightsError(f"weights file {path} does not exist: check the path")
    if path.name.endswith(".npz"):
      try:
        with np.load(path, allow_pickle=False) as data:
          src = {k: data[k] for k in data.files}
      except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise TorchWeightsError(
            f"cannot read {path} as .npz ({e}): write it with "
            f"np.savez(path, **{{name: array}})") from None
    elif path.name.endswith(_TORCH_SUFFIXES):
      src = _read_torch_file(path)
    else:
      raise TorchWeightsError(
          f"unknown weights file type {path.name!r}: use a .npz (names -> arrays) "
          f"or a PyTorch {'/'.join(_TORCH_SUFFIXES)} file")
  elif hasattr(src, "state_dict") and callable(src.state_dict):
    src = src.state_dict()
  if not isinstance(src, Mapping):
    raise TorchWeightsError(
        f"weights must be a mapping name -> array, a .npz or a .pth path; got "
        f"{type(src).__name__}: pass model.state_dict() or a file path")
  src = _unwrap(src)
  names = list(src)
  if not all(isinstance(k, str) for k in names):
    raise TorchWeightsError(
        f"state_dict names must be strings, got {[k for k in names if not isinstance(k, str)][:5]}: "
        f"pass model.state_dict()")
  for prefix in _PREFIXES:
    if names and all(k.startswith(prefix) for k in names):
      src = {k[len(prefix):]: v for k, v in src.items()}
      names = list(src)
  return {
      name: _to_numpy(value, name) for name, value in src.items()
      if name.rsplit(".", 1)[-1] not in _IGNORED_LEAVES
  }


def infer_model_kwargs(src) -> dict[str, Any]:
  """The `get_model('scoat_net', ...)` arguments the weights were trained with.

  Args:
    src: anything `read_state_dict` accepts.

  Returns:
    dict(num_classes, deep_supervision, in_channels, widths), ready for
    `get_model('scoat_net', **kwargs)` (the model then checks the input's
    channels).

  Raises:
    TorchWeightsError: the names that fix the architecture are absent.
  """
  sd = read_state_dict(src)
  needed = [f"conv{i}_0.conv1.weight" for i in range(DEPTH + 1)]
  absent = [n for n in needed if n not in sd]
  multi = [f"final{j}.weight" for j in range(1, DEPTH + 1)]
  has_multi = [n for n in multi if n in sd]
  if "final.weight" in sd and has_multi:
    raise TorchWeightsError(
        f"the state_dict has both 'final' and {has_multi}: it must hold one head "
        f"('final') or the four deep-supervision heads ('final1'..'final4')")
  if "final.weight" not in sd and not has_multi:
    absent.append("final.weight (or final1.weight .. final4.weight)")
  if absent:
    raise TorchWeightsError(
        f"cannot infer the SCOAT-Net architecture: the state_dict lacks {absent}; "
        f"is it a state_dict of the authors' SCOAT-Net?", missing=absent)
  for n in needed + (["final.weight"] if not has_multi else has_multi):
    if sd[n].ndim != 4:
      raise TorchWeightsError(
          f"{n} has shape {sd[n].shape}, expected a conv weight (out, in, kh, kw)",
          misshaped=[(n, sd[n].shape, "rank 4")])
  head = sd["final.weight"] if not has_multi else sd[has_multi[-1]]
  return dict(
      num_classes=int(head.shape[0]),
      deep_supervision=bool(has_multi),
      in_channels=int(sd["conv0_0.conv1.weight"].shape[1]),
      widths=tuple(int(sd[n].shape[0]) for n in needed),
  )


def _torch_module(path: tuple[str, ...], deep_supervision: bool) -> str:
  """PyTorch module name of the Flax module at `path` (without the leaf)."""
  top, rest = path[0], path[1:]
  if m := _NODE_RE.match(top):
    node = f"conv{m[1]}_{m[2]}"
    if rest[:1] == ("res",) and len(rest) == 2 and rest[1] in _NODE_PARTS:
      return f"{node}.{_NODE_PARTS[rest[1]]}"
    if rest[:1] == ("se",) and len(rest) == 2 and rest[1] in _SE_PARTS:
      return f"{node}.{_SE_PARTS[rest[1]]}"
    if len(rest) == 1 and rest[0] in _NODE_PARTS:
      return f"{node}.{_NODE_PARTS[rest[0]]}"
  elif m := _SAM_RE.match(top):
    if len(rest) == 1 and rest[0] in _SAM_PARTS:
      return f"att{m[1]}_{m[2]}.{_SAM_PARTS[rest[0]]}"
  elif (m := _HEAD_RE.match(top)) and not rest:
    return f"final{m[1]}" if deep_supervision else "final"
  raise TorchWeightsError(
      f"Flax module {'/'.join(path)} has no PyTorch counterpart: only SCOAT-Net "
      f"variables can be converted")


def _torch_name(collection: str, path: tuple[str, ...], deep_supervision: bool) -> str:
  key = (collection, path[-1])
  if key not in _LEAVES:
    raise TorchWeightsError(
        f"Flax variable {collection}/{'/'.join(path)} has no PyTorch counterpart")
  return f"{_torch_module(path[:-1], deep_supervision)}.{_LEAVES[key]}"


def _flax_to_torch_array(x: np.ndarray) -> np.ndarray:
  if x.ndim == 4:
    return np.transpose(x, (3, 2, 0, 1))  # (kh, kw, in, out) -> (out, in, kh, kw)
  if x.ndim == 2:
    return x.T  # (in, out) -> (out, in)
  return x


def _torch_to_flax_array(x: np.ndarray) -> np.ndarray:
  if x.ndim == 4:
    return np.transpose(x, (2, 3, 1, 0))  # (out, in, kh, kw) -> (kh, kw, in, out)
  if x.ndim == 2:
    return x.T
  return x


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(reversed(shape)) if len(shape) == 2 else tuple(shape)


@functools.lru_cache(maxsize=16)
def _expected(num_classes: int, deep_supervision: bool, in_channels: int,
              widths: tuple[int, ...]) -> dict[str, tuple[str, tuple[str, ...], tuple]]:
  """torch name -> (collection, Flax path, Flax shape) for the implied model."""
  model = SCOATNet(num_classes=num_classes, deep_supervision=deep_supervision,
                   widths=widths)
  x = jax.ShapeDtypeStruct((1, 2**DEPTH, 2**DEPTH, in_channels), jnp.float32)
  try:
    shapes = jax.eval_shape(functools.partial(model.init, train=False),
                            jax.random.key(0), x)
  except ValueError as e:
    raise TorchWeightsError(
        f"the state_dict implies widths {widths}, which SCOAT-Net cannot build: {e}"
    ) from None
  expected = {}
  for collection in ("params", "batch_stats"):
    flat = traverse_util.flatten_dict(shapes[collection])
    for path, leaf in flat.items():
      name = _torch_name(collection, path, deep_supervision)
      expected[name] = (collection, path, tuple(leaf.shape))
  return expected


def load(src) -> dict[str, Any]:
  """Converts the authors' PyTorch SCOAT-Net weights to Flax variables.

  The architecture (input channels, classes, heads, widths) is read off the
  arrays; build the matching model with `infer_model_kwargs`.

  Args:
    src: anything `read_state_dict` accepts (mapping, module, .npz, .pth).

  Returns:
    `{'params': ..., 'batch_stats': ...}` nested dicts of float32 jax arrays,
    ready for `model.apply(variables, x, train=False)`.

  Raises:
    TorchWeightsError: listing every unknown, missing and mis-shaped name.
  """
  sd = read_state_dict(src)
  kw = infer_model_kwargs(sd)
  expected = _expected(kw["num_classes"], kw["deep_supervision"], kw["in_channels"],
                       kw["widths"])
  unknown = [n for n in sd if n not in expected]
  missing = [n for n in expected if n not in sd]
  misshaped = []
  for name, (_, _, shape) in expected.items():
    if name in sd and tuple(sd[name].shape) != _torch_shape(shape):
      misshaped.append((name, tuple(sd[name].shape), _torch_shape(shape)))
  bad_dtype = [n for n in sd if n in expected and not (
      np.issubdtype(sd[n].dtype, np.floating) or np.issubdtype(sd[n].dtype, np.integer))]
  if unknown or missing or misshaped or bad_dtype:
    parts = []
    if unknown:
      parts.append(f"unknown: {unknown}")
    if missing:
      parts.append(f"missing: {missing}")
    if misshaped:
      parts.append("mis-shaped: " + ", ".join(
          f"{n} {got} (expected {want})" for n, got, want in misshaped))
    if bad_dtype:
      parts.append(f"not numeric: {bad_dtype}")
    raise TorchWeightsError(
        f"the state_dict does not fit SCOAT-Net {kw} ({'; '.join(parts)}): pass the "
        f"state_dict of the authors' SCOAT-Net, unmodified",
        unknown=unknown, missing=missing, misshaped=misshaped)
  flat: dict[str, dict] = {"params": {}, "batch_stats": {}}
  for name, (collection, path, _) in expected.items():
    array = _torch_to_flax_array(np.asarray(sd[name], np.float32))
    flat[collection][path] = jnp.asarray(np.ascontiguousarray(array))
  return {c: traverse_util.unflatten_dict(f) for c, f in flat.items()}


def to_state_dict(variables: Mapping, *, num_batches_tracked: bool = True
                  ) -> dict[str, np.ndarray]:
  """Converts Flax SCOAT-Net variables to a PyTorch-style state_dict.

  Args:
    variables: `{'params': ..., 'batch_stats': ...}` of a SCOAT-Net (an
      'intermediates' collection, if present, is ignored).
    num_batches_tracked: also emit a zero `num_batches_tracked` (int64) per BN,
      so that torch's `load_state_dict(strict=True)` accepts the result.

  Returns:
    Name -> NumPy array in PyTorch layout; `torch.from_numpy` each to load.

  Raises:
    TorchWeightsError: a collection is missing or a variable is not SCOAT-Net's.
  """
  absent = [c for c in ("params", "batch_stats") if c not in variables]
  if absent:
    raise TorchWeightsError(
        f"variables lack {absent}: pass the whole dict returned by model.init "
        f"(or the training state's params and batch_stats together)")
  extra = [c for c in variables if c not in ("params", "batch_stats", "intermediates")]
  if extra:
    raise TorchWeightsError(f"variables have unexpected collections {extra}: "
                            f"pass only 'params' and 'batch_stats'")
  deep_supervision = any(k in variables["params"] for k in ("head_1", "head_2", "head_3"))
  out: dict[str, np.ndarray] = {}
  for collection in ("params", "batch_stats"):
    flat = traverse_util.flatten_dict(variables[collection])
    for path, leaf in flat.items():
      name = _torch_name(collection, path, deep_supervision)
      # A writable copy: torch.from_numpy warns on read-only views of jax arrays.
      out[name] = np.array(_flax_to_torch_array(np.asarray(leaf)), order="C", copy=True)
      if num_batches_tracked and name.endswith(".running_mean"):
        out[name[: -len("running_mean")] + "num_batches_tracked"] = np.array(0, np.int64)
  # PyTorch's order: module by module, weight before bias before BN statistics.
  module_rank = {m: r for r, m in enumerate(dict.fromkeys(n.rsplit(".", 1)[0] for n in out))}
  leaf_rank = {leaf: r for r, leaf in enumerate(_TORCH_LEAF_ORDER)}

  def order(item):
    module, leaf = item[0].rsplit(".", 1)
    return module_rank[module], leaf_rank[leaf]

  return dict(sorted(out.items(), key=order))
