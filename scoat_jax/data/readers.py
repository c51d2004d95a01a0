"""One reader interface for every input a command takes: CT files, DICOM series, 2-D slices.

`discover_inputs(path)` lists what a path names (a volume file, a DICOM series
folder, a folder of scans, a folder of 8-bit slice images, or a folder holding
`Imgs/` as COVID-SemiSeg ships), in natural name order, each an `Item`;
`read_item(item)` reads one in full and checks it (`ct_io.read_ct` for
volumes: geometry, HU values, truncated NIfTI; `read_slice_image` for slices).
Every bad input raises a ValueError whose one-line message names the file and
the fix.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import NamedTuple

import numpy as np

from scoat_jax.data import ct_io, orientation, writers

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VOLUME_SUFFIXES = ct_io.READ_SUFFIXES
# Volumes named like label masks (the phantom's <stem>_label / _lung, our own
# outputs) are not scans: a folder of scans may hold them beside the images.
MASK_NAME = re.compile(r"_(mask|label|labels|lung|seg|probability)$", re.IGNORECASE)


class InputError(ValueError):
  """An input path or file that cannot be segmented as given; one line naming the fix."""


@dataclasses.dataclass(frozen=True)
class Item:
  """One input: a CT volume (file or DICOM folder) or one 2-D slice image."""
  name: str
  path: pathlib.Path
  kind: str  # 'volume' | 'image'


class Loaded(NamedTuple):
  """An input read in full.

  Attributes:
    array: (z, y, x) HU for a volume, in the canonical axial orientation
      (`data.orientation`); (H, W) uint8 for a slice image.
    geometry: the grid of `array`; None for a slice image.
    metadata: DICOM tags of interest (patient_id, study_date, ...); may be empty.
    reorientation: how the file's own grid maps to `geometry` (volumes only):
      outputs go back onto the stored grid through it.
  """
  array: np.ndarray
  geometry: ct_io.Geometry | None
  metadata: dict
  reorientation: orientation.Reorientation | None = None


def _volume_name(path: pathlib.Path) -> str:
  name = path.name
  for suffix in VOLUME_SUFFIXES:
    if name.lower().endswith(suffix):
      return name[:-len(suffix)]
  return path.stem


def _is_dicom_dir(path: pathlib.Path) -> bool:
  import SimpleITK as sitk
  with ct_io.quiet_itk():  # 'no series found' is an answer here
    return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))


def _natural(path: pathlib.Path):
  """Sort key: '2.png' before '10.png' (numbers compared as numbers)."""
  return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", path.name)]


def _refuse_beside_loose_slices(folder: pathlib.Path) -> None:
  """Refuses a DICOM series folder that also holds other scans (they would be left out)."""
  for child in sorted(folder.iterdir(), key=_natural):
    if child.name.startswith(".") or writers.is_output(child.name):
      continue
    low = child.name.lower()
    if child.is_symlink() and not child.exists():
      what = f"a broken link (to {os.readlink(child)})"
    elif child.is_file() and low.endswith(VOLUME_SUFFIXES) and \
        not MASK_NAME.search(_volume_name(child)):
      what = "a scan file"
    elif child.is_dir() and _is_dicom_dir(child):
      what = "a DICOM series folder"
    else:
      continue
    raise InputError(f"--input={folder}: holds loose DICOM slices and {what}, {child.name}, "
                     "which would be left out; put each scan (and each series) in its own folder.")


def discover_inputs(path: str | pathlib.Path) -> list[Item]:
  """The scans or slice images that `--input` names.

  Args:
    path: a volume file, a DICOM series folder, a folder of volumes and DICOM
      sub-folders, or a folder of 2-D images (or one holding `Imgs/`). In a
      folder, volumes named like masks (`*_mask`, `*_label(s)`, `*_lung`,
      `*_seg`, `*_probability`) and this tool's outputs are skipped.

  Returns:
    Items in natural name order ('2' before '10').

  Raises:
    InputError: missing path, a 2-D image given as a scan, an empty folder,
      a folder mixing images and volumes, two inputs with one name, a broken
      link, or loose DICOM slices beside another scan (file or series folder).
  """
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    raise InputError(f"--input={path}: no such file or folder; give a CT scan, a DICOM series "
                     "folder, or a folder of scans or of 2-D slice images.")
  if path.is_file():
    if path.name.lower().endswith(IMAGE_SUFFIXES):
      raise InputError(f"--input={path}: a 2-D image given as a scan; a scan is a 3-D volume "
                       "(NIfTI/MHA/NRRD or a DICOM folder). To segment 2-D slices, put them "
                       "in a folder and pass the folder.")
    return [Item(_volume_name(path), path, "volume")]
  if _is_dicom_dir(path):
    _refuse_beside_loose_slices(path)
    return [Item(path.name, path, "volume")]
  volumes, images = [], []
  for child in sorted(path.iterdir(), key=_natural):
    if child.name.startswith(".") or writers.is_output(child.name):
      continue
    low = child.name.lower()
    if child.is_symlink() and not child.exists():
      raise InputError(f"--input={path}: {child.name} is a broken link (to {os.readlink(child)}); "
                       "fix or remove it, so that no scan is left out.")
    if child.is_file() and low.endswith(IMAGE_SUFFIXES):
      images.append(Item(child.stem, child, "image"))
    elif child.is_file() and low.endswith(VOLUME_SUFFIXES):
      if not MASK_NAME.search(_volume_name(child)):
        volumes.append(Item(_volume_name(child), child, "volume"))
    elif child.is_dir() and _is_dicom_dir(child):
      _refuse_beside_loose_slices(child)
      volumes.append(Item(child.name, child, "volume"))
  if not volumes and not images and (path / "Imgs").is_dir():
    return discover_inputs(path / "Imgs")  # the COVID-SemiSeg layout: Imgs/ and GT/
  if volumes and images:
    raise InputError(f"--input={path}: mixes 2-D images ({images[0].path.name}) and CT volumes "
                     f"({volumes[0].path.name}); put them in separate folders.")
  items = volumes or images
  if not items:
    raise InputError(f"--input={path}: holds no CT scan (.nii/.nii.gz/.mha/.mhd/.nrrd, DICOM "
                     "series folders) and no .png/.jpg slice; point --input at the data.")
  names: dict[str, pathlib.Path] = {}
  for item in items:
    if item.name in names:
      raise InputError(f"--input={path}: {names[item.name].name} and {item.path.name} would both "
                       f"write '{item.name}_*' outputs; rename one.")
    names[item.name] = item.path
  return items


def read_slice_image(path: str | pathlib.Path) -> np.ndarray:
  """Reads a 2-D 8-bit grey slice (PNG/JPG) without changing its values.

  Raises:
    InputError: unreadable or corrupt file, colour image, more than 8 bits.
  """
  from PIL import Image, UnidentifiedImageError
  path = pathlib.Path(path)
  try:
    with Image.open(path) as im:
      mode = im.mode
      if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raise InputError(f"{path}: a {mode} (16/32-bit) image; 2-D slices must be 8-bit grey "
                         "exports (CT in HU belongs in NIfTI or DICOM).")
      if mode in ("L", "LA"):
        arr = np.asarray(im.getchannel(0) if mode == "LA" else im)
      else:
        rgb = np.asarray(im.convert("RGB")).astype(np.int16)
        # A grey slice saved as RGB has equal channels (JPEG may differ by a few levels).
        if np.abs(rgb - rgb.mean(axis=-1, keepdims=True)).mean() > 3.0:
          raise InputError(f"{path}: a colour image, not a grey CT slice; give 8-bit grey "
                           "slices exported in a lung window.")
        arr = np.asarray(im.convert("L"))
  except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
    if isinstance(e, InputError):
      raise
    raise InputError(f"{path}: cannot decode this image ({str(e).splitlines()[0]}); "
                     "replace the corrupt file.") from None
  if arr.ndim != 2 or min(arr.shape) < 2:
    raise InputError(f"{path}: image of shape {arr.shape}; a slice must be 2-D grey, at least 2x2.")
  return np.ascontiguousarray(arr, np.uint8)


def read_label_image(path: str | pathlib.Path) -> np.ndarray:
  """Reads a 2-D 8-bit label image (PNG) as stored: palette indices or grey values.

  A palette ('P') image keeps its indices (the labels), a grey one its values;
  a grey image saved as RGB keeps its (equal) channels' value.

  Raises:
    InputError: unreadable or corrupt file, not 2-D, values beyond 8 bits.
  """
  from PIL import Image, UnidentifiedImageError
  path = pathlib.Path(path)
  try:
    with Image.open(path) as im:
      arr = np.asarray(im if im.mode in ("L", "P", "I;16", "I") else im.convert("L"))
  except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
    raise InputError(f"{path}: cannot decode this mask ({str(e).splitlines()[0]}); "
                     "replace the corrupt file.") from None
  if arr.ndim != 2:
    raise InputError(f"{path}: mask has shape {arr.shape}, expected a 2-D image; save it as "
                     "single-channel.")
  if arr.dtype != np.uint8 and arr.size and (arr.min() < 0 or arr.max() > 255):
    raise InputError(f"{path}: mask values {arr.min()}..{arr.max()} exceed 8 bits; save it as "
                     "an 8-bit image.")
  return np.ascontiguousarray(arr, np.uint8)


def read_item(item: Item, series_id: str | None = None) -> Loaded:
  """Reads one input in full, checking it (`ct_io.read_ct` for volumes).

  `series_id` picks a series of a DICOM folder that holds several.

  Raises:
    InputError, ct_io.CTError: unreadable, truncated or implausible input.
  """
  if item.kind == "image":
    return Loaded(read_slice_image(item.path), None, {})
  ct = ct_io.read_ct(item.path, series_id=series_id if item.path.is_dir() else None)
  return Loaded(ct.hu, ct.geometry, ct.metadata, ct.reorientation)
