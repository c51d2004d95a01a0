"""What ITK would hide in a NIfTI file: truncation, zero voxel sizes, NaN, qform against sform.

ITK's NIfTI reader fills a file that ends early with whatever was in memory,
reads a zero or non-finite voxel size as 1 mm, turns NaN voxels into 0, and
when the header's two transforms (qform and sform) disagree it takes one of
them without a word, so the volume depends on the reader. `check_complete`
reads the header and the voxels itself before ITK does; `check_transforms`
compares the grid ITK read with every transform the header marks as valid.
"""
from __future__ import annotations

import gzip
import math
import pathlib
import struct
import zlib
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk

from scoat_jax.data.geometry import CTError
from scoat_jax.data.hu_values import check_finite

_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float voxels
# Two transforms agree when no corner voxel of the volume lies further apart than
# TRANSFORM_TOL_MM + TRANSFORM_RTOL x the volume's diagonal: the qform's quaternion is stored
# as float32 and loses about 1e-3 rad near 180-degree rotations (its first component is
# computed as sqrt(1 - b^2 - c^2 - d^2)).
TRANSFORM_TOL_MM = 0.1
TRANSFORM_RTOL = 2e-3
_FIX = ("fix the header (set the wrong transform from the right one, e.g. nibabel's "
        "set_qform(img.get_sform()) or set_sform(img.get_qform())) or export the scan again")


class Header(NamedTuple):
  order: str          # '<' or '>'
  sizeof: int         # 348 (NIfTI-1) or 540 (NIfTI-2)
  dims: tuple
  pixdim: tuple
  datatype: int
  bitpix: int
  offset: int
  qform_code: int
  sform_code: int
  quatern: tuple      # b, c, d, qoffset x, y, z
  srow: tuple         # 12 values, rows x, y, z


def parse(header: bytes) -> Header | None:
  """The fields of a NIfTI-1 or NIfTI-2 header, or None for another file."""
  for order in "<>":
    sizeof = struct.unpack(order + "i", header[:4])[0] if len(header) >= 4 else 0
    if sizeof == 348 and len(header) >= 348:          # NIfTI-1
      u = lambda fmt, at: struct.unpack(order + fmt, header[at:at + struct.calcsize(fmt)])
      return Header(order, sizeof, u("8h", 40), u("8f", 76), *u("2h", 70), int(u("f", 108)[0]),
                    *u("2h", 252), u("6f", 256), u("12f", 280))
    if sizeof == 540 and len(header) >= 540:          # NIfTI-2
      u = lambda fmt, at: struct.unpack(order + fmt, header[at:at + struct.calcsize(fmt)])
      return Header(order, sizeof, u("8q", 16), u("8d", 104), *u("2h", 12), u("q", 168)[0],
                    *u("2i", 344), u("6d", 352), u("12d", 400))
  return None


def _check_pixdim(path: pathlib.Path, pixdim) -> None:
  # ITK reads a zero, negative or non-finite voxel size as 1 mm (with a warning
  # on stderr): the volume would be measured on a made-up grid.
  for axis, value in zip("xyz", pixdim):
    if not np.isfinite(value) or value <= 0:
      raise CTError(f"{path}: the header gives voxel size {value:g} mm along {axis} (pixdim); "
                    "a reader would assume 1 mm and every volume would be wrong: fix the header "
                    "or export the scan again.")


def _is_nifti(path: pathlib.Path) -> bool:
  return path.name.lower().endswith((".nii", ".nii.gz"))


def check_complete(path: str | pathlib.Path) -> None:
  """Raises CTError for a NIfTI (.nii / .nii.gz) file ITK would read wrongly without a word.

  The header says how many bytes the voxels take and their size; a .nii.gz is
  decompressed in full, which also checks its CRC, and float voxels are
  scanned for NaN and Inf. Other formats pass unchecked (ITK keeps their NaN).
  """
  path = pathlib.Path(path)
  if not _is_nifti(path):
    return
  opener = gzip.open if path.name.lower().endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read(544)
      header = parse(raw)
      floats = header is not None and header.datatype in _FLOATS
      chunks, size = [raw], len(raw)
      while chunk := f.read(1 << 22):
        size += len(chunk)
        if floats:
          chunks.append(chunk)
  except (OSError, EOFError, zlib.error) as e:
    raise CTError(f"{path}: corrupt or truncated file ({str(e).splitlines()[0]}); copy or "
                  "export the scan again.") from None
  if header is None:
    return
  dims = header.dims
  if not 1 <= dims[0] <= 7:
    return  # Not a header we understand: leave the verdict to ITK.
  _check_pixdim(path, [header.pixdim[k] for k in range(1, min(dims[0], 3) + 1)])
  voxels = int(np.prod([max(d, 1) for d in dims[1:dims[0] + 1]]))
  start = max(header.offset, header.sizeof)
  expected = start + voxels * header.bitpix // 8
  if size < expected:
    raise CTError(f"{path}: truncated file ({size} of {expected} bytes); copy or export "
                  "the scan again.")
  if floats:
    data = np.frombuffer(b"".join(chunks), header.order + _FLOATS[header.datatype], voxels, start)
    check_finite(data.reshape(tuple(reversed(dims[1:dims[0] + 1]))), path,
                 order_note=" in the file's order")


def _qform(h: Header) -> np.ndarray:
  """The qform as a 3x4 matrix (RAS mm from voxel indices), as the NIfTI standard defines it."""
  b, c, d = h.quatern[:3]
  a = math.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
  r = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
  qfac = -1.0 if h.pixdim[0] < 0 else 1.0
  scale = np.array([h.pixdim[1], h.pixdim[2], qfac * h.pixdim[3]])
  return np.concatenate([r * scale, np.reshape(h.quatern[3:], (3, 1))], axis=1)


def _itk_affine(image: sitk.Image) -> np.ndarray:
  """The grid ITK read as a 3x4 RAS matrix (ITK is LPS: x and y negated)."""
  d = np.reshape(image.GetDirection(), (3, 3)) * np.asarray(image.GetSpacing())
  flip = np.diag([-1.0, -1.0, 1.0])
  return np.concatenate([flip @ d, (flip @ np.asarray(image.GetOrigin())).reshape(3, 1)], axis=1)


def _apart(a: np.ndarray, b: np.ndarray, size) -> float:
  """How far (mm) two 3x4 matrices put the volume's corner voxels apart, beyond the tolerance
  (0: they agree)."""
  corners = np.array([[i, j, k, 1.0] for i in (0, size[0] - 1) for j in (0, size[1] - 1)
                      for k in (0, size[2] - 1)])
  diagonal = float(np.linalg.norm((corners[-1] - corners[0]) @ a.T))
  apart = float(np.max(np.linalg.norm(corners @ (a - b).T, axis=1)))
  return apart if apart > TRANSFORM_TOL_MM + TRANSFORM_RTOL * diagonal else 0.0


def check_transforms(path: str | pathlib.Path, image: sitk.Image) -> list[str]:
  """Warnings about a 3-D NIfTI's transforms, after ITK read it as `image`.

  Raises CTError when a transform the header marks as valid (code > 0) puts the
  volume elsewhere than the grid ITK read (a corner voxel beyond the tolerance): the qform and sform disagree, and another reader would measure
  another volume. A transform flagged unknown (code 0) is not read by anyone;
  if it differs, or neither is set, the scan is read but warned about.
  """
  path = pathlib.Path(path)
  if not _is_nifti(path) or image.GetDimension() != 3:
    return []
  opener = gzip.open if path.name.lower().endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      header = parse(f.read(544))
  except (OSError, EOFError, zlib.error):
    return []
  if header is None:
    return []
  size = image.GetSize()
  read = _itk_affine(image)
  forms = {"qform": (header.qform_code, _qform(header)),
           "sform": (header.sform_code, np.reshape(header.srow, (3, 4)))}
  valid = {k: m for k, (code, m) in forms.items() if code > 0}
  if len(valid) == 2:
    apart = _apart(valid["qform"], valid["sform"], size)
    if apart:
      raise CTError(
          f"{path}: the header's qform and sform disagree (a corner voxel lies {apart:.1f} mm "
          f"apart; voxel sizes {_sizes(valid['qform'])} against {_sizes(valid['sform'])} mm), "
          f"so the volume depends on which one a reader takes; {_FIX}")
  for name, matrix in valid.items():
    apart = _apart(matrix, read, size)
    if apart:
      raise CTError(
          f"{path}: the header's {name} (voxel sizes {_sizes(matrix)} mm) and its pixdim "
          f"({_sizes(read)} mm, what the reader takes) disagree by {apart:.1f} mm at a corner; "
          f"{_FIX}")
  if not valid:
    return ["NIfTI header sets neither qform nor sform (both codes 0): the orientation is "
            "unknown; read as the voxel axes along the patient's left, posterior and superior"]
  out = []
  for name, (code, matrix) in forms.items():
    if code == 0 and np.any(matrix[:, :3]) and _apart(matrix, read, size):
      used = next(iter(valid))
      out.append(f"NIfTI {name} is flagged unknown (code 0) and places the volume "
                 f"{_apart(matrix, read, size):.1f} mm elsewhere; it is ignored and the scan is "
                 f"read by the {used} (code {forms[used][0]})")
  return out


def _sizes(matrix: np.ndarray) -> str:
  return " x ".join(f"{v:.4g}" for v in np.linalg.norm(matrix[:, :3], axis=0))
