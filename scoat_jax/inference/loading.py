"""Trained models for inference, from wherever they are kept.

    models = loading.load_ensemble(["runs/fold0", "runs/fold1"])      # workdirs
    models = loading.load_ensemble(["model/"])                         # an exported bundle
    models = loading.load_ensemble(["scoat.pth"], config=config)       # the authors' weights

A source is one of:

* a training workdir (its best step by validation DSC; the latest for a run
  trained on all cases), its `checkpoints/` folder, or one saved step folder;
* a model bundle written by `python -m scoat_jax.export` (`inference.bundle`):
  every member it holds, so a fold-ensemble bundle is an ensemble;
* the authors' PyTorch SCOAT-Net weights (`.pth`, `.pt` or `.npz` of the state
  dict), which carry no preprocessing: a config must say the input size and
  HU window (`--config=scoat_jax/configs/default.py` is the paper's recipe).

Every model is validated before it is used: the weights must fit the model
its config describes (network, widths, classes, one input channel; the
config's `num_classes` must be the network's), they must be finite with
possible batch statistics and give finite outputs on a probe slice
(`inference.model_checks`), and an ensemble's members must share input size,
classes and HU window.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from scoat_jax import checkpoints, models
from scoat_jax.checkpoints import CheckpointError
from scoat_jax.data.intensity import HU_WINDOW, check_uint8_mode
from scoat_jax.inference import bundle, model_checks
from scoat_jax.models import outputs

TORCH_SUFFIXES = (".pth", ".pt", ".npz")


class InferenceError(ValueError):
  """A bad inference request (slice shape, ensemble, arguments)."""


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedModel:
  """A trained model ready for inference.

  Attributes:
    step_dir: where its weights came from (a saved step, a bundle member, a file).
    config: the training config stored with the weights.
    model: the linen module that config describes.
    variables: {'params', 'batch_stats'} as NumPy arrays.
    meta: the checkpoint's meta JSON (config, step, epoch, intensity, ...).
    postprocessing: the rule its bundle stores (`inference.postprocessing`), or None.
  """
  step_dir: pathlib.Path
  config: ml_collections.ConfigDict
  model: nn.Module
  variables: dict
  meta: dict
  postprocessing: dict | None = None

  @property
  def step(self) -> int | None:
    return self.meta.get("step", _step_from_dir(self.step_dir))

  @property
  def image_size(self) -> int:
    return int(self.config.data.image_size)

  @property
  def num_classes(self) -> int:
    return int(self.config.num_classes)

  @property
  def hu_window(self) -> tuple[float, float]:
    """The window HU volumes are read through: for a model trained on 8-bit exports the
    window estimated from those exports (`export_window`), else config.data.hu_window."""
    if self.export_window is not None:
      return self.export_window
    return tuple(float(v) for v in self.config.data.get("hu_window", HU_WINDOW))

  @property
  def export_window(self) -> tuple[float, float] | None:
    """The HU window its 8-bit training exports were made with, as estimated from them
    (`data.export_window`, stored in its meta and bundle), or None (HU-trained, or trained
    on a dataset built before the estimate was stored)."""
    found = self.meta.get("export_window") if self.intensity == "uint8" else None
    if not isinstance(found, dict) or not found.get("window_hu"):
      return None
    return tuple(float(v) for v in found["window_hu"])

  @property
  def uint8_normalization(self) -> str:
    """How 8-bit slices are normalised for it: 'scale' or 'equalize' (`data.intensity`)."""
    return str(self.config.data.get("uint8_normalization", "scale"))

  @property
  def threshold(self) -> float | None:
    """`config.predict_threshold`: None (0.5 / argmax) or the P(opacity) threshold."""
    return outputs.check_threshold(self.config.get("predict_threshold"))

  @property
  def average_heads(self) -> bool:
    return bool(self.config.get("predict_average_heads", False))

  @property
  def intensity(self) -> str:
    """How its training slices were stored: 'hu' (CT) or 'uint8' (8-bit exports)."""
    return str(self.meta.get("intensity", "hu"))

  @functools.cached_property
  def weights_sha256(self) -> str:
    """The content hash of its parameters and batch statistics (`model_checks`)."""
    return model_checks.weights_sha256(self.variables)

  def describe(self) -> dict:
    """JSON-ready summary for reports: where the weights came from and what they are."""
    out = {"checkpoint": str(self.step_dir), "step": self.step,
           "weights_sha256": self.weights_sha256,
           "model": self.config.model_name, "model_config": self.config.model.to_dict(),
           "loss": self.config.get("loss"), "num_classes": self.num_classes,
           "image_size": self.image_size,
           "fold": self.config.data.get("fold"), "dataset": self.config.data.get("name")}
    for key in ("bundle", "bundle_version"):
      if key in self.meta:
        out[key] = self.meta[key]
    return out


def _step_from_dir(step_dir: pathlib.Path) -> int | None:
  return int(step_dir.name) if step_dir.name.isdigit() else None


def _shapes(tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(np.shape(leaf))
          for path, leaf in flat}


def _check_weights(step_dir, config, model, variables, size: int) -> None:
  """Raises CheckpointError unless the weights fit the model the config describes.

  The shapes come from the network `config.model` builds, while inference reads
  the classes from `config.num_classes`: the two must agree, or 1-class weights
  under a 3-class config would label every voxel ground glass. Then the values
  must be usable (`model_checks.check_values`).
  """
  built = getattr(model, "num_classes", None)
  if built is not None and int(built) != int(config.num_classes):
    raise CheckpointError(
        f"{step_dir}: its config says num_classes={config.num_classes} but describes a network "
        f"of {built} class(es) (config.model.num_classes={built}); the config was edited or "
        "mixed up: restore the config the weights were trained with.")
  multiple = type(model).input_multiple
  if size < multiple or size % multiple:
    raise CheckpointError(f"{step_dir}: config.data.image_size={size} is not a multiple of "
                          f"{multiple}; pass a config with a size the network takes.")
  # Training and inference feed one slice, one channel.
  want = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 1)),
                                           train=False))
  for part in ("params", "batch_stats"):
    have_shapes, want_shapes = _shapes(variables.get(part, {})), _shapes(want.get(part, {}))
    for key in sorted(set(have_shapes) | set(want_shapes)):
      have, need = have_shapes.get(key), want_shapes.get(key)
      if have != need:
        what = ("is missing from the checkpoint" if have is None else
                "is not part of that model" if need is None else
                f"has shape {have} in the checkpoint but {need} in the model")
        raise CheckpointError(
            f"{step_dir}: {part} {key} {what} (config: {config.model_name} "
            f"{config.model.to_dict()}, 1 input channel); the weights belong to another model "
            "or shape: pass a checkpoint trained for it.")
  model_checks.check_values(step_dir, model, variables, size)


def _build(source, config: ml_collections.ConfigDict) -> nn.Module:
  """The model a stored config describes, or CheckpointError naming the source."""
  try:
    model = models.create_model(config)
    window = [float(v) for v in config.data.get("hu_window", HU_WINDOW)]
    if len(window) != 2 or not window[0] < window[1]:
      raise ValueError(f"config.data.hu_window={window} is not (lo, hi) with lo < hi")
    check_uint8_mode(str(config.data.get("uint8_normalization", "scale")))
    outputs.check_threshold(config.get("predict_threshold"))
    int(config.data.image_size)
  except (ValueError, AttributeError, KeyError, TypeError) as e:
    raise CheckpointError(f"{source}: its config does not describe a model this version can "
                          f"build ({str(e).splitlines()[0]}); pass a scoat_jax checkpoint.") from None
  return model


def _load_step(path) -> LoadedModel:
  with checkpoints.quiet_orbax():
    step_dir = checkpoints.resolve_step_dir(path)
  meta = checkpoints.read_meta(step_dir)
  config = ml_collections.ConfigDict(meta["config"])
  model = _build(step_dir, config)
  variables = checkpoints.read_weights(step_dir)
  _check_weights(step_dir, config, model, variables, int(config.data.image_size))
  return LoadedModel(step_dir, config, model, variables, meta)


def _load_torch(path: pathlib.Path, config: ml_collections.ConfigDict | None) -> LoadedModel:
  """The authors' PyTorch weights, with the preprocessing `config` states."""
  from scoat_jax.models import torch_weights
  if config is None:
    raise CheckpointError(f"--checkpoint={path}: PyTorch weights carry no preprocessing; pass "
                          "--config=scoat_jax/configs/default.py (the paper's recipe: 512 px, "
                          "its HU window) or the config they were trained with.")
  if config.model_name != "scoat_net":
    raise CheckpointError(f"--checkpoint={path}: PyTorch weights load into SCOAT-Net only, but "
                          f"the config's network is {config.model_name!r}; use "
                          "--config.model_name=scoat_net.")
  try:
    kwargs = torch_weights.infer_model_kwargs(path)
    variables = jax.tree_util.tree_map(np.asarray, torch_weights.load(path))
  except (ValueError, OSError, ImportError) as e:
    raise CheckpointError(f"--checkpoint={path}: {str(e).splitlines()[0]}") from None
  if kwargs["in_channels"] != 1:
    raise CheckpointError(f"--checkpoint={path}: the weights take {kwargs['in_channels']} input "
                          "channels; CT inference feeds one.")
  config = ml_collections.ConfigDict(config.to_dict())
  config.num_classes = kwargs["num_classes"]
  config.model.widths = list(kwargs["widths"])
  config.model.num_classes = kwargs["num_classes"]
  config.deep_supervision = "mean" if kwargs["deep_supervision"] else "none"
  model = _build(path, config)
  _check_weights(path, config, model, variables, int(config.data.image_size))
  meta = {"config": config.to_dict(), "step": None, "intensity": "hu",
          "source": "pytorch"}
  return LoadedModel(path, config, model, variables, meta)


def _load_bundle(path: pathlib.Path) -> list[LoadedModel]:
  loaded = bundle.read(path)
  out = []
  for member in loaded.members:
    config = ml_collections.ConfigDict(member.config)
    model = _build(member.path, config)
    _check_weights(member.path, config, model, member.variables, int(config.data.image_size))
    meta = {**member.meta, "config": member.config, "bundle": str(path),
            "bundle_version": loaded.version}
    out.append(LoadedModel(member.path, config, model, member.variables, meta,
                           postprocessing=loaded.postprocessing))
  return out


def load_sources(path: str | pathlib.Path, *,
                 config: ml_collections.ConfigDict | None = None) -> list[LoadedModel]:
  """Every model one `--checkpoint` names (a bundle may hold several); see the module doc.

  Raises:
    CheckpointError: no checkpoint there, unreadable weights, no stored config,
      a bundle of a newer format, or weights that do not fit their model.
  """
  p = pathlib.Path(path).expanduser()
  if bundle.is_bundle(p):
    return _load_bundle(p)
  if p.is_file() and p.name.lower().endswith(TORCH_SUFFIXES):
    return [_load_torch(p, config)]
  if p.is_file():
    raise CheckpointError(f"--checkpoint={p}: a file that is not PyTorch weights "
                          f"({'/'.join(TORCH_SUFFIXES)}); pass a training workdir, a step "
                          "folder or a bundle from `python -m scoat_jax.export`.")
  return [_load_step(p)]


def load_model(path: str | pathlib.Path, *,
               config: ml_collections.ConfigDict | None = None) -> LoadedModel:
  """Loads and validates one trained model (a workdir, step, one-member bundle or .pth).

  Raises:
    CheckpointError: as `load_sources`, or a bundle with several members.
  """
  found = load_sources(path, config=config)
  if len(found) != 1:
    raise CheckpointError(f"{path}: a bundle of {len(found)} models; load it with "
                          "load_ensemble.")
  return found[0]


def load_ensemble(paths: Sequence[str | pathlib.Path], *,
                  config: ml_collections.ConfigDict | None = None) -> list[LoadedModel]:
  """Loads every model the sources name, whose probabilities will be averaged.

  Args:
    paths: workdirs, step folders, bundles (all their members) or PyTorch files.
    config: the config PyTorch weights are read with (ignored by the others).

  Raises:
    CheckpointError: any bad source, the same step twice, members that differ
      in input size, number of classes or HU window, or bundles whose
      post-processing rules differ.
  """
  if not paths:
    raise InferenceError("no checkpoint given; pass --checkpoint=<workdir, step folder, bundle "
                         "or .pth> (repeat it for an ensemble).")
  loaded = [(p, m) for p in paths for m in load_sources(p, config=config)]
  first = loaded[0][1]
  seen = {}
  for p, m in loaded:
    if m.step_dir in seen:
      raise CheckpointError(f"{p} and {seen[m.step_dir]} are the same checkpoint "
                            f"{m.step_dir}; give each ensemble member once.")
    seen[m.step_dir] = p
    for what, a, b in (("input size (config.data.image_size)", m.image_size, first.image_size),
                       ("number of classes", m.num_classes, first.num_classes),
                       ("training intensity (HU or 8-bit exports)", m.intensity,
                        first.intensity),
                       ("HU window (config.data.hu_window, or its exports' window)",
                        m.hu_window, first.hu_window),
                       ("8-bit normalisation (config.data.uint8_normalization)",
                        m.uint8_normalization, first.uint8_normalization),
                       ("threshold (config.predict_threshold)", m.threshold, first.threshold),
                       ("post-processing", m.postprocessing, first.postprocessing)):
      if a != b:
        raise CheckpointError(f"{m.step_dir}: its {what} is {a}, but {first.step_dir} has {b}; "
                              "an ensemble averages models of one config (e.g. its folds).")
  return [m for _, m in loaded]
