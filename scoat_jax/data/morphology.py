"""Exact, millimetre-true distances to a mask, without whole-volume distance transforms.

Two users: the lung mask's closing (`data.lung_mask`: a disc of a radius in
mm on anisotropic pixels) and the lung rule (`inference.lung_rule`: opacity
within a margin in mm of the lung, in 3-D). Both give the same sets as
`scipy.ndimage.distance_transform_edt(~mask, sampling) <= radius` (pixels
beyond the array count as False), computed from running first/last indices
along one axis and shifted rows, so they cost a few passes over the mask's
bytes instead of a float64 distance map of the volume.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def nearest_along_0(mask: np.ndarray, far: int) -> tuple[np.ndarray, np.ndarray]:
  """Signed offsets to the last True at or before, and the first at or after, along axis 0.

  -far and +far where there is none; int16 when that fits.
  """
  dtype = np.int16 if 3 * far < 2**15 else np.int32
  idx = np.arange(mask.shape[0], dtype=dtype).reshape((-1,) + (1,) * (mask.ndim - 1))
  before = np.where(mask, idx, dtype(-far))
  np.maximum.accumulate(before, axis=0, out=before)
  after = np.minimum.accumulate(np.where(mask, idx, dtype(far))[::-1], axis=0)[::-1]
  return before - idx, after - idx


def dilate_disc(mask: np.ndarray, spacing_yx: tuple[float, float], radius_mm: float) -> np.ndarray:
  """Pixels within radius_mm (Euclidean, in mm) of a True pixel of a 2-D mask.

  The same set as `distance_transform_edt(~mask, sampling) <= radius_mm`
  (pixels beyond the array count as False), without a distance transform: the
  distance to the nearest True pixel of each column, then per column offset
  dx the largest row offset still within the radius.
  """
  h, w = mask.shape
  sy, sx = spacing_yx
  before, after = nearest_along_0(mask, h + int(radius_mm / sy) + 4)  # beyond any reach
  gap = np.minimum(-before, after)
  out = gap == 0
  dys = np.arange(int(radius_mm / sy) + 2, dtype=np.float64)
  for dx in range(0, min(int(radius_mm / sx) + 1, w - 1) + 1):
    # The same arithmetic as the distance transform's distances.
    reach = np.nonzero(np.sqrt((dys * sy) * (dys * sy) + (dx * sx) * (dx * sx)) <= radius_mm)[0]
    if not reach.size:
      break
    near = gap <= reach[-1]
    out[:, dx:] |= near[:, :w - dx]
    if dx:
      out[:, :w - dx] |= near[:, dx:]
  return out


def within_mm(mask: np.ndarray, spacing_xyz: Sequence[float], radius_mm: float,
              slices: Sequence[int] | None = None) -> np.ndarray:
  """Voxels within radius_mm (3-D Euclidean, in mm) of a True voxel of a (z, y, x) mask.

  A voxel of slice z is that close iff for some slice offset dz with
  |dz| * sz <= radius_mm it lies within sqrt(radius_mm^2 - (dz * sz)^2) in
  plane of mask[z + dz]: one exact disc dilation per offset.

  Args:
    mask: (z, y, x) bool mask.
    spacing_xyz: voxel size (x, y, z) in mm (ITK order).
    radius_mm: the distance, >= 0.
    slices: compute only these z (the others stay False); None: every slice.

  Returns:
    (z, y, x) bool array, equal to `distance_transform_edt(~mask, sampling) <=
    radius_mm` on the slices computed.
  """
  mask = np.asarray(mask, bool)
  sx, sy, sz = (float(s) for s in spacing_xyz)
  out = np.zeros(mask.shape, bool)
  nz = mask.shape[0]
  has = mask.any(axis=(1, 2))
  reach = int(radius_mm // sz)
  for z in (range(nz) if slices is None else slices):
    for dz in range(-reach, reach + 1):
      k = z + dz
      left = radius_mm * radius_mm - (dz * sz) * (dz * sz)
      if not 0 <= k < nz or not has[k] or left < 0:
        continue
      out[z] |= dilate_disc(mask[k], (sy, sx), float(np.sqrt(left)))
  return out
