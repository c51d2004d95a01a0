"""One set of output writers: masks and probabilities in the scan's geometry, PNGs, JSON.

Every writer goes through `fileio.atomic_write` (a temporary name beside the
target, then a rename), so a crash never leaves half a file under the final
name. `OUTPUT_NAME` matches the names the commands give their results, so
that input discovery skips them and an output folder holding them is
recognised as holding earlier results.
"""
from __future__ import annotations

import json
import pathlib
import re

import numpy as np

from scoat_jax.common.fileio import atomic_write, write_text
from scoat_jax.data import ct_io, palette as palette_lib

# The files `predict` writes per input (followup and report name theirs apart).
OUTPUT_NAME = re.compile(r"_(mask\.nii\.gz|mask\.png|probability\.nii\.gz|probability\.png"
                         r"|report\.json|report\.png|report\.pdf|seg\.dcm|attention(_z\d+)?\.png)$")


class WriteError(ValueError):
  """An output that cannot be written as asked."""


def is_output(name: str) -> bool:
  """Whether a file name is one of the per-input results `predict` writes."""
  return bool(OUTPUT_NAME.search(name))


def dumps(data) -> str:
  """JSON with one key per line but short lists of numbers on one line (readable reports)."""
  text = json.dumps(data, indent=1, allow_nan=False)
  return re.sub(r"\[\s+([^\[\]{}\"]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)


def write_json(data: dict, path: pathlib.Path) -> pathlib.Path:
  """Writes `data` as JSON atomically (NaN is refused: undefined values are null)."""
  return write_text(dumps(data) + "\n", path)


def write_png(array: np.ndarray, path: pathlib.Path, *, palette: bool = False) -> pathlib.Path:
  """Writes an (H, W) 0..255 array as an 8-bit PNG; `palette` colours labels 0/1/2 (`data.palette`)."""
  from PIL import Image
  image = Image.fromarray(np.ascontiguousarray(array, np.uint8), mode="L")
  if palette:
    image = image.convert("P")
    image.putpalette(palette_lib.png_palette())
  return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def write_volume(array: np.ndarray, geometry: ct_io.Geometry, path: pathlib.Path) -> pathlib.Path:
  """Writes labels (uint8) or P(opacity) (float32) with exactly the scan's geometry.

  Args:
    array: (z, y, x) uint8 labels or float32 probabilities; stored as that dtype.
    geometry: the scan's grid (size, spacing, origin, direction are copied).
    path: output file (.nii.gz), written atomically with the usual permissions.

  Returns:
    The written path.
  """
  array = np.asarray(array)
  if array.dtype not in (np.uint8, np.float32):
    raise WriteError(f"{path}: cannot write a {array.dtype} array; pass uint8 labels or float32 "
                     "probabilities (ct_io.write_array checks they fit the scan's grid).")
  what = "mask" if array.dtype == np.uint8 else "probability"
  return ct_io.write_array(array, geometry, path, what=what)
