"""Classical lung segmentation of chest CT in Hounsfield units (NumPy/SciPy).

Used as the denominator of the percentage of infection (POI = lesion volume /
lung volume; docs/design.md, "Quantification") and to pick slices that
contain lung. Steps:

1. Threshold: voxels below -320 HU are air or lung.
2. Drop the air outside the body: every component touching the in-plane
   border of the volume (the first and last slices may cut through the lungs,
   so touching them is allowed).
3. Remove the large airways: components of very low HU (< -950 after a 3x3
   in-plane mean, so noise does not break them) of at least 0.5 ml, centred
   left-right and reaching the first or last slice of the candidate region,
   are the trachea and main bronchi (normal lung is about -900..-700 HU);
   they are removed with a one-voxel in-plane margin, which also cuts their
   connection to the lungs. Orientation-free: either end of z may be cranial.
4. Keep the largest component, and the second largest if it holds at least 20%
   as many voxels (two separate lungs); smaller ones (bowel gas, leftover
   bronchus) are dropped.
5. Per side of the midline (so the two lungs never merge, even where they
   touch): a 2-D closing with a disc of CLOSING_RADIUS_MM (exact, in mm, by
   distance transforms), then per-slice hole filling, so vessels, nodules and
   enclosed lesions, including dense consolidation, lie inside the mask.
6. Pleural-based lesions: per slice and side, dents between the lung and its
   convex hull whose opening faces away from the mediastinum (the costal
   surface is convex; the heart, hila, spine and diaphragm dome leave dents
   that open medially) are added when deeper than DENT_MIN_DEPTH_MM.
7. A closing along z of Z_CLOSING_MM adds non-bone voxels (< 300 HU) that have
   lung within that distance both above and below (a lesion filling a convex
   edge of the lung in a few slices).

Measured on the default phantom cohort (48 x 256 x 256, 1.4 x 1.4 x 5 mm, 24
scans): Dice vs the true lung >= 0.997, volume within 0.4%, 99.2% of lesion
voxels inside (worst scan 95%), on seeds 0 and 1.

Limits: a consolidation or effusion that fills a convex edge of the lung
beyond the hull and over many slices is missed (e.g. a dense apical cap);
pleural effusions against the costal surface can be counted as lung; emphysema
or bullae below -950 HU touching the central airways can be removed with
them; lungs that touch the in-plane border of the field of view are dropped
(the chest wall must be in the image); no lobes or left/right labels; arrays
are axial (z, y, x) with x left-right.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi
from scipy import spatial

LUNG_THRESHOLD_HU = -320.0
AIRWAY_THRESHOLD_HU = -950.0
CLOSING_RADIUS_MM = 10.0
SECOND_LUNG_MIN_FRACTION = 0.2
DENT_MIN_DEPTH_MM = 3.0
Z_CLOSING_MM = 10.0


class LungMaskError(ValueError):
  """A bad lung-mask request (array shape, spacing)."""


def _largest(labels: np.ndarray, n: int, keep: int, min_fraction: float) -> list[int]:
  """Ids of the `keep` largest components, the others only if >= min_fraction of the largest."""
  if n == 0:
    return []
  sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
  order = np.argsort(sizes)[::-1][:keep]
  return [int(i) + 1 for i in order if sizes[i] >= min_fraction * sizes[order[0]]]


def _close_2d(mask: np.ndarray, spacing_yx: tuple[float, float], radius_mm: float) -> np.ndarray:
  """In-plane closing with a disc of radius_mm, via distance transforms (exact, in mm).

  The mask needs a background margin wider than the radius on every side.
  """
  dilated = ndi.distance_transform_edt(~mask, sampling=spacing_yx) <= radius_mm
  return ndi.distance_transform_edt(dilated, sampling=spacing_yx) > radius_mm


def _airways(cand: np.ndarray, hu: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
  """The trachea and main bronchi within `cand` (see step 3 of the module docstring)."""
  zs = np.nonzero(cand.any((1, 2)))[0]
  if zs.size < 2:
    return np.zeros_like(cand)
  smooth = ndi.uniform_filter(hu.astype(np.float32), size=(1, 3, 3))
  low = cand & (smooth < AIRWAY_THRESHOLD_HU)
  labels, n = ndi.label(low)
  if n == 0:
    return np.zeros_like(cand)
  xs = np.nonzero(cand.any((0, 1)))[0]
  x_mid, half_width = (xs[0] + xs[-1]) / 2.0, (xs[-1] - xs[0] + 1) / 2.0
  objects = ndi.find_objects(labels)
  sizes = np.bincount(labels.ravel(), minlength=n + 1)
  voxel_ml = float(np.prod(spacing)) / 1000.0
  keep = np.zeros(n + 1, bool)
  for i, sl in enumerate(objects, start=1):
    if sl is None or sizes[i] * voxel_ml < 0.5:
      continue
    ends = sl[0].start <= zs[0] or sl[0].stop - 1 >= zs[-1]
    xi = np.nonzero(labels[sl] == i)[2] + sl[2].start
    central = abs(np.median(xi) - x_mid) < 0.25 * half_width
    keep[i] = ends and central
  airway = keep[labels]
  return ndi.binary_dilation(airway, structure=np.ones((1, 3, 3), bool)) & cand


def lung_mask(hu: np.ndarray,
              spacing: Sequence[float],
              *,
              threshold: float = LUNG_THRESHOLD_HU,
              closing_radius_mm: float = CLOSING_RADIUS_MM,
              remove_airways: bool = True,
              fill_costal_dents: bool = True,
              z_closing_mm: float = Z_CLOSING_MM) -> np.ndarray:
  """Segments both lungs (airways removed, vessels and lesions included).

  Args:
    hu: (z, y, x) CT in Hounsfield units.
    spacing: voxel size (x, y, z) in mm (ITK order, as in ct_io.Geometry).
    threshold: HU below which a voxel is air or lung.
    closing_radius_mm: radius of the in-plane closing that pulls pleural-based
      lesions and vessels into the mask.
    remove_airways: remove the trachea and main bronchi.
    fill_costal_dents: add dents in the costal surface (pleural-based lesions).
    z_closing_mm: reach of the closing along z (0 disables it).

  Returns:
    (z, y, x) bool mask; all False when no lung is found.

  Raises:
    LungMaskError: hu not 3-D or spacing not 3 positive numbers.
  """
  hu = np.asarray(hu)
  if hu.ndim != 3 or min(hu.shape) < 1:
    raise LungMaskError(f"hu has shape {hu.shape}; lung_mask needs a 3-D (z, y, x) volume in HU")
  spacing = tuple(float(s) for s in spacing)
  if len(spacing) != 3 or not all(s > 0 for s in spacing):
    raise LungMaskError(f"spacing={spacing!r} must be 3 positive mm values in (x, y, z) order")
  air = hu < threshold
  labels, n = ndi.label(air)
  border = np.zeros(n + 1, bool)
  for face in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
    border[np.unique(face)] = True
  border[0] = True
  cand = ~border[labels]
  if not cand.any():
    return cand
  if remove_airways:
    cand &= ~_airways(cand, hu, spacing)
  labels, n = ndi.label(cand)
  lungs = _largest(labels, n, keep=2, min_fraction=SECOND_LUNG_MIN_FRACTION)
  out = np.isin(labels, lungs)
  if not lungs:
    return out
  xs = np.nonzero(out.any((0, 1)))[0]
  x_mid = (xs[0] + xs[-1]) / 2.0
  spacing_yx = (spacing[1], spacing[0])
  pad = int(closing_radius_mm / min(spacing_yx)) + 2
  cols = np.arange(hu.shape[2])
  filled = np.zeros(hu.shape, bool)
  for half in (cols < x_mid, cols >= x_mid):
    # One side at a time, so the closing never bridges the two lungs (even when
    # they touch), in the side's bounding box padded so the closing is not cut.
    part = out & half[None, None, :]
    zs, ys, xs = (np.nonzero(part.any(axis=a))[0] for a in ((1, 2), (0, 2), (0, 1)))
    if not zs.size:
      continue
    box = (slice(zs[0], zs[-1] + 1), slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
    part = np.pad(part[box], ((0, 0), (pad, pad), (pad, pad)))
    for k in range(part.shape[0]):
      if closing_radius_mm > 0 and part[k].any():
        part[k] = _close_2d(part[k], spacing_yx, closing_radius_mm)
      part[k] = ndi.binary_fill_holes(part[k])
    # A closing stays inside the convex hull, hence inside the box; the pad only
    # keeps the intermediate dilation from being cut by the array edge.
    filled[box] |= part[:, pad:-pad, pad:-pad]
  out = filled
  if fill_costal_dents:
    min_depth_px = DENT_MIN_DEPTH_MM / min(spacing[0], spacing[1])
    for k in range(out.shape[0]):
      if out[k].any():
        out[k] |= _costal_dents(out[k], x_mid, min_depth_px)
  if z_closing_mm > 0:
    r = max(1, int(round(z_closing_mm / spacing[2])))
    padded = np.pad(out, ((r, r), (0, 0), (0, 0)), mode="edge")
    closed = ndi.binary_closing(padded, structure=np.ones((2 * r + 1, 1, 1), bool))[r:-r]
    out |= closed & (hu < 300)
  return out


def _costal_dents(sl: np.ndarray, x_mid: float, min_depth_px: float) -> np.ndarray:
  """Pixels of dents in the costal (non-mediastinal) surface of each lung in one slice.

  A dent is a component of (convex hull of one side's lung pixels minus the
  lung). The costal surface of a lung is convex, so a dent whose opening (the
  hull edge across it) faces away from the midline is a pleural-based lesion;
  the heart, hila, spine and diaphragm dome leave dents whose opening faces
  the mediastinum (outward normal within 60 degrees of medial), kept out.
  """
  add = np.zeros_like(sl)
  cols = np.arange(sl.shape[1])
  for side in (-1.0, 1.0):
    half = sl & (side * (cols - x_mid) > 0)[None, :]
    if half.sum() < 20:
      continue
    rows_any, cols_any = np.nonzero(half.any(1))[0], np.nonzero(half.any(0))[0]
    box = (slice(rows_any[0], rows_any[-1] + 1), slice(cols_any[0], cols_any[-1] + 1))
    piece = half[box]
    if min(piece.shape) < 3:
      continue
    edge = piece & ~ndi.binary_erosion(piece)
    try:
      hull = spatial.ConvexHull(np.argwhere(edge).astype(np.float64))
    except (spatial.QhullError, ValueError):
      continue
    eq = hull.equations  # outward normals (row, col), offset
    # Pad by one pixel so the outside of the hull is never empty.
    gy, gx = np.mgrid[-1:piece.shape[0] + 1, -1:piece.shape[1] + 1]
    signed = eq[:, 0, None, None] * gy + eq[:, 1, None, None] * gx + eq[:, 2, None, None]
    inside = np.all(signed <= 0.5, axis=0)
    depth = -signed.max(axis=0)  # distance to the nearest hull edge
    dents, m = ndi.label(inside & ~np.pad(piece, 1))
    if m == 0:
      continue
    mouth = ndi.binary_dilation(~inside) & (dents > 0)
    for j, dbox in enumerate(ndi.find_objects(dents), start=1):
      dent = dents[dbox] == j
      if dent.sum() > piece.sum() or depth[dbox][dent].max() < min_depth_px:
        continue
      my, mx = np.nonzero(mouth[dbox] & dent)
      if my.size == 0:
        continue
      # The hull edge each mouth pixel lies on gives the opening's outward normal.
      py, px = my + dbox[0].start - 1, mx + dbox[1].start - 1     # padded -> piece coordinates
      facet = np.argmin(np.abs(eq[:, 0, None] * py + eq[:, 1, None] * px + eq[:, 2, None]), axis=0)
      normal = eq[facet, :2].mean(axis=0)
      normal /= max(np.linalg.norm(normal), 1e-9)
      if -side * normal[1] <= 0.5:
        dy, dx = np.nonzero(dent)
        add[dy + dbox[0].start - 1 + box[0].start, dx + dbox[1].start - 1 + box[1].start] = True
  return add & ~sl
