"""`covid_semiseg`: 8-bit CT slices with GGO/consolidation masks (COVID-SemiSeg layout).

manual_dir holds `Imgs/<k>.jpg` (8-bit grey, lung window, sizes vary) and
`GT/<k>.png` (palette PNG: 0 background, 1 ground-glass opacity, 2
consolidation), as in the COVID-SemiSeg set of Inf-Net (Fan et al., IEEE TMI
2020) cropped from the MedSeg COVID-19 CT segmentation dataset.

Features per slice: `image` (H, W) uint8 exactly as decoded from the JPEG (sizes
kept), `mask` (H, W) uint8 in {0, 1, 2}, `case_id` = `scan_id` = the file stem
(no patient ids exist, so every slice is its own case and folds split by
slice), `slice_index` = int(stem) (the slice number in MedSeg; 0 for non-numeric
stems), `spacing` = (0, 0, 0) because pixel spacing is unknown (any volume
computed from it is 0, never a made-up number). Intensity source: 'uint8'.
"""
from __future__ import annotations

import os
import re

import numpy as np
import tensorflow_datasets as tfds

from scoat_jax.data import readers
from scoat_jax.datasets import base

_IMAGE_EXTS = (".jpg", ".jpeg", ".png")
_MASK_EXTS = (".png",)


def _decode(path: str, kind: str) -> np.ndarray:
  """An image through the reader inference uses (`readers.read_slice_image`), a mask as stored."""
  try:
    return readers.read_slice_image(path) if kind == "image" else readers.read_label_image(path)
  except readers.InputError as e:
    raise base.DatasetError(str(e)) from None


def _sort_key(stem: str):
  return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def _list(folder: str, exts: tuple[str, ...]) -> dict[str, str]:
  out = {}
  for fname in os.listdir(folder):
    stem, ext = os.path.splitext(fname)
    if ext.lower() in exts and not fname.startswith("."):
      if stem in out:
        raise base.DatasetError(f"{folder}: two files for slice {stem!r} ({os.path.basename(out[stem])}, "
                                f"{fname}); keep one")
      out[stem] = os.path.join(folder, fname)
  return out


def pairs(manual_dir: str) -> list[tuple[str, str, str]]:
  """(stem, image path, mask path) of every slice, checked for completeness.

  Args:
    manual_dir: the folder holding Imgs/ and GT/.

  Returns:
    One triple per slice, sorted by slice number.

  Raises:
    DatasetError: a missing folder, an empty folder, an image without its mask
      or a mask without its image.
  """
  imgs, gts = os.path.join(manual_dir, "Imgs"), os.path.join(manual_dir, "GT")
  for d in (imgs, gts):
    if not os.path.isdir(d):
      raise base.DatasetError(f"{d} is missing; --manual_dir must hold Imgs/<k>.jpg and GT/<k>.png")
  images, masks = _list(imgs, _IMAGE_EXTS), _list(gts, _MASK_EXTS)
  if not images:
    raise base.DatasetError(f"{imgs} holds no .jpg/.png image; put the slices there or fix --manual_dir")
  for stem, path in sorted(images.items()):
    if stem not in masks:
      raise base.DatasetError(f"{path} has no mask {os.path.join(gts, stem + '.png')}; "
                              "add the mask or remove the image")
  for stem, path in sorted(masks.items()):
    if stem not in images:
      raise base.DatasetError(f"{path} has no image {os.path.join(imgs, stem + '.jpg')}; "
                              "add the image or remove the mask")
  return [(s, images[s], masks[s]) for s in sorted(images, key=_sort_key)]


class CovidSemiseg(base.SliceBuilder):
  """COVID-SemiSeg 8-bit CT slices with GGO (1) / consolidation (2) masks."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "A folder with Imgs/<k>.jpg and GT/<k>.png (COVID-SemiSeg layout)."
  INTENSITY = "uint8"
  HAS_LUNG = False
  BUILD_HINT = "--manual_dir=<folder with Imgs/ and GT/>"

  @classmethod
  def check_manual_dir(cls, manual_dir):
    pairs(manual_dir)

  def _features(self):
    return base.slice_features(np.uint8, lung=False)

  def _scans(self, dl_manager):
    for stem, image_path, mask_path in pairs(self._manual_dir(dl_manager)):
      image = _decode(image_path, "image")
      mask = _decode(mask_path, "mask")
      if image.shape != mask.shape:
        raise base.DatasetError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                                f"{image_path} is {image.shape[1]}x{image.shape[0]}; "
                                "give the mask the image's size")
      bad = np.setdiff1d(np.unique(mask), [0, 1, 2])
      if bad.size:
        raise base.DatasetError(f"{mask_path}: mask values {bad.tolist()} are not in {{0 background, "
                                "1 GGO, 2 consolidation}; save it as a palette PNG of indices 0/1/2")
      example = {"image": image, "mask": mask, "case_id": stem, "scan_id": stem,
                 "slice_index": int(stem) if re.fullmatch(r"\d{1,9}", stem) else 0,
                 "spacing": np.zeros(3, np.float32)}
      yield stem, stem, [example], {}
