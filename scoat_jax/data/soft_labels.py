"""Soft labels: a folder of 8-bit confidence maps, one per unlabelled slice.

`<folder>/<name>.png`, grey, the slice's own size, 0..255 = a teacher's
P(opacity) x 255 (any class), where `<name>` is the slice's key in an
unlabelled dataset's index (`scoat_jax.datasets.unlabelled`). Semi-Inf-Net's
`InfNet-pseudo/` maps are such a folder as published; `python -m
scoat_jax.pseudo_label` writes one from any teacher, with `soft_labels.json`
beside the maps (the teacher, the dataset, per-slice confidence).

Confidence of a pixel with probability p is |2p - 1| (0 where the teacher is
undecided, 1 where it is sure either way); training may ignore pixels below
a minimum confidence (`config.unlabelled.min_confidence`).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

import numpy as np

MANIFEST = "soft_labels.json"


class SoftLabelError(ValueError):
  """A soft-label folder that does not fit its dataset; the message names the file and the fix."""


def path_of(folder: str, name: str) -> str:
  return os.path.join(folder, name + ".png")


def check_folder(folder: str, shapes: Mapping[str, Iterable[int]], flag: str) -> None:
  """Checks that every slice has its map, of its size, before training starts.

  Args:
    folder: the soft-label folder.
    shapes: slice name -> (H, W) of its image.
    flag: the config field or flag that named the folder, for messages.

  Raises:
    SoftLabelError: a missing folder, a missing map (the first few are named),
      a map of another size or mode.
  """
  from PIL import Image, UnidentifiedImageError
  if not os.path.isdir(folder):
    raise SoftLabelError(f"{flag}={folder} is not a folder; give the folder of <name>.png "
                         "confidence maps (InfNet-pseudo/ or the output of "
                         "python -m scoat_jax.pseudo_label)")
  present = {os.path.splitext(f)[0] for f in os.listdir(folder) if f.lower().endswith(".png")}
  missing = [n for n in shapes if n not in present]
  if missing:
    raise SoftLabelError(f"{flag}={folder}: {len(missing)} of {len(shapes)} slices have no map "
                         f"(e.g. {', '.join(m + '.png' for m in missing[:3])}); label them with "
                         "python -m scoat_jax.pseudo_label or fix the folder")
  for name, shape in shapes.items():
    path = path_of(folder, name)
    try:
      with Image.open(path) as im:
        size, mode = im.size, im.mode
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
      raise SoftLabelError(f"{path}: cannot read this map ({str(e).splitlines()[0]}); "
                           "replace it") from None
    if (size[1], size[0]) != tuple(int(v) for v in shape):
      raise SoftLabelError(f"{path}: map is {size[0]}x{size[1]} but its slice is "
                           f"{shape[1]}x{shape[0]}; give every map its slice's size")
    if mode not in ("L", "P", "1"):
      raise SoftLabelError(f"{path}: a {mode} image; confidence maps are 8-bit grey (0..255)")


def read(folder: str, name: str) -> np.ndarray:
  """The map of slice `name` as float32 probabilities in [0, 1] (checked by `check_folder`)."""
  from PIL import Image
  with Image.open(path_of(folder, name)) as im:
    arr = np.asarray(im.convert("L") if im.mode != "L" else im)
  return arr.astype(np.float32) / np.float32(255.0)


def encode(probability: np.ndarray) -> np.ndarray:
  """P(opacity) in [0, 1] -> the stored 0..255 map (rounded)."""
  return np.clip(np.rint(np.asarray(probability, np.float64) * 255.0), 0, 255).astype(np.uint8)


def confidence(probability: np.ndarray) -> np.ndarray:
  """|2p - 1| per pixel."""
  return np.abs(2.0 * np.asarray(probability, np.float32) - 1.0)


def write(folder: str, name: str, probability: np.ndarray) -> None:
  """Writes one map (`folder` must exist; the caller renames a finished folder into place)."""
  from PIL import Image
  Image.fromarray(encode(probability), mode="L").save(path_of(folder, name), optimize=False)


def write_manifest(folder: str, content: dict) -> None:
  with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
    json.dump(content, f, indent=1, sort_keys=True)
    f.write("\n")


def read_manifest(folder: str) -> dict | None:
  """`soft_labels.json` of a folder written by pseudo_label, or None (e.g. InfNet-pseudo/)."""
  path = os.path.join(folder, MANIFEST)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)
