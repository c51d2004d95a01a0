"""Surface distances between two binary masks: HD95 under both conventions, surface Dice.

Two ways of turning "the 95th percentile Hausdorff distance" into a number are
in use, and they differ on the same masks, so both are given under their own
names (distances in the units of `spacing`, millimetres for a CT grid):

* `hd95_pooled`: the distances from every surface voxel of A to the nearest
  surface voxel of B and from every surface voxel of B to the nearest of A are
  pooled into one set; the result is its 95th percentile. This is
  `scoat_jax.evaluation.metrics.hd95`.
* `hd95_max_directed`: the 95th percentile of each directed set, and the
  larger of the two, as MONAI's `compute_hausdorff_distance(percentile=95)`
  computes it (same surface voxels, same percentile).

DeepMind's `surface-distance` (`compute_robust_hausdorff`) is a third
convention, not a variant of these: it also takes the larger directed value,
but each directed percentile is over its surfels (corner points, see below)
weighted by their area, and it returns the distance at which the cumulative
area first reaches 95 % (no interpolation). Where small blobs far from the
other surface hold close to 5 % of a surface, one convention returns the
distance to the blobs and another returns 0: on such a case DeepMind's gave
28.2 mm where `hd95_max_directed` and MONAI gave 0. Report which one a number
is; they are not interchangeable.

The two here are not ordered either: one stray blob in B that is more than
5 % of B's surface but less than 5 % of both surfaces together moves the
directed value and leaves the pooled one at 0; two far-apart squares give a
pooled value above the directed one. Surface voxels are mask voxels with a
face neighbour (4 in 2-D, 6 in 3-D) outside the mask, the image border
counting as outside; nearest-voxel distances are Euclidean between voxel
centres scaled by `spacing`, and percentiles use numpy's default linear
interpolation.

`surface_dice` is the normalised surface Dice of Nikolov et al. (2021) as
DeepMind's `compute_surface_dice_at_tolerance` computes it: the surface area
of both masks lying within a tolerance of the other surface, over the total
area of both. By default (weighting='surfels') the surface is DeepMind's
(`scoat_jax.evaluation.surfels`): points on the grid of voxel corners, each
weighted by the marching-cubes area (2-D: marching-squares length) of the
cell around it, with distances between those points (MONAI's
`compute_surface_dice(use_subvoxels=True)` implements the same definition). weighting='voxels'
counts surface voxels unweighted with distances between voxel centres, as
MONAI's `compute_surface_dice` does by default; on anisotropic voxels it
differs (slices' side walls count as much as their tops). A distance equal to
the tolerance counts as within it; the image border counts as outside.

Empty masks follow metrics.py: both empty, every distance is 0.0 and the
surface Dice 1.0 (nothing to get wrong; MONAI gives NaN there); exactly one
empty, the distances are +inf as in MONAI and DeepMind (`metrics.aggregate`
counts those apart) and the surface Dice 0.0, the share of the present
surface that lies near the missing one, as DSC is 0 then.

The mask checks `metrics` uses live here too (`as_mask`, `check_pair`,
`check_spacing`), since metrics builds on this module.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage, spatial

from scoat_jax.evaluation import surfels

WEIGHTINGS = ("surfels", "voxels")
# Distances are differences of scaled coordinates: a face exactly at the
# tolerance may come out 1 ulp beyond it. This slack keeps it within.
_REL_SLACK = 1e-9


def as_mask(x, name: str) -> np.ndarray:
  """A bool mask from a bool or 0/1 numeric 2-D or 3-D array; ValueError otherwise."""
  arr = np.asarray(x)
  if arr.ndim not in (2, 3):
    raise ValueError(f"{name} must be a 2-D or 3-D mask, got shape {arr.shape}.")
  if arr.dtype == bool:
    return arr
  if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
    raise ValueError(f"{name} has dtype {arr.dtype}; pass a bool or 0/1 numeric mask.")
  if np.any((arr != 0) & (arr != 1)):
    raise ValueError(f"{name} holds values other than 0 and 1; binarise it first "
                     f"(e.g. mask > 0, or labels == k for one class).")
  return arr != 0


def check_pair(pred, truth) -> tuple[np.ndarray, np.ndarray]:
  """Both masks as bool arrays of one shape; ValueError otherwise."""
  a, b = as_mask(pred, "pred"), as_mask(truth, "truth")
  if a.shape != b.shape:
    raise ValueError(f"pred shape {a.shape} and truth shape {b.shape} differ; "
                     f"score masks of the same case and size.")
  return a, b


def check_spacing(spacing, ndim: int) -> tuple[float, ...] | None:
  """`spacing` as `ndim` positive floats (one number is repeated), or None."""
  if spacing is None:
    return None
  values = np.asarray(spacing, np.float64)
  if values.ndim == 0:
    values = np.full(ndim, values)
  if values.shape != (ndim,) or not np.all(np.isfinite(values)) or not np.all(values > 0):
    raise ValueError(f"spacing={spacing!r} must be {ndim} positive finite voxel sizes "
                     f"(one per mask axis) or one positive number.")
  return tuple(float(v) for v in values)


def _scale(sampling: tuple[float, ...] | None, ndim: int) -> np.ndarray:
  return np.ones(ndim) if sampling is None else np.asarray(sampling, np.float64)


def _cropped(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Both masks cut to the bounding box of A ∪ B, padded by one background voxel per side.

  The padding makes the image border count as outside; distances within the
  box are those of the whole image (only differences of positions matter).
  """
  both = a | b
  box = []
  for axis in range(a.ndim):
    hit = np.flatnonzero(both.any(axis=tuple(k for k in range(a.ndim) if k != axis)))
    box.append(slice(hit[0], hit[-1] + 1))
  return np.pad(a[tuple(box)], 1), np.pad(b[tuple(box)], 1)


def boundary(mask: np.ndarray) -> np.ndarray:
  """Voxels of a bool mask with a face neighbour outside it (the border counts as outside)."""
  cross = ndimage.generate_binary_structure(mask.ndim, 1)
  return mask & ~ndimage.binary_erosion(mask, structure=cross, border_value=0)


def _nearest(points: np.ndarray, targets: np.ndarray) -> np.ndarray:
  return spatial.KDTree(targets).query(points)[0]


def _within(points: np.ndarray, targets: np.ndarray, tolerance: float) -> np.ndarray:
  """Whether each point has a target within `tolerance` (inclusive, rounding slack)."""
  limit = tolerance * (1.0 + _REL_SLACK) + _REL_SLACK
  dist = spatial.KDTree(targets).query(points, distance_upper_bound=limit * (1.0 + 1e-6))[0]
  return dist <= limit


def surface_distances(pred, truth, spacing: Sequence[float] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
  """The two directed sets of nearest surface-voxel distances.

  Args:
    pred: binary mask A, 2-D or 3-D, bool or 0/1.
    truth: binary mask B, same shape.
    spacing: voxel size per array axis; None means unit voxels.

  Returns:
    (a_to_b, b_to_a): for every surface voxel of A (in C order) the distance
    to the nearest surface voxel of B, and the other way round. An empty mask
    has no surface voxels (an empty array); when the other mask is empty, each
    distance is +inf.
  """
  a, b = check_pair(pred, truth)
  sampling = check_spacing(spacing, a.ndim)
  has_a, has_b = bool(a.any()), bool(b.any())
  if not (has_a and has_b):
    counts = [int(np.count_nonzero(boundary(m))) if m.any() else 0 for m in (a, b)]
    return np.full(counts[0], np.inf), np.full(counts[1], np.inf)
  # k-d trees over the surface points: exact, and far cheaper than two
  # whole-box EDTs when lesions are scattered through a scan.
  scale = _scale(sampling, a.ndim)
  pa, pb = _cropped(a, b)
  points_a = np.argwhere(boundary(pa)) * scale
  points_b = np.argwhere(boundary(pb)) * scale
  return _nearest(points_a, points_b), _nearest(points_b, points_a)


def _empty_answer(a_to_b: np.ndarray, b_to_a: np.ndarray) -> float | None:
  """0.0 (both masks empty), +inf (one empty) or None (both have a surface)."""
  if not a_to_b.size and not b_to_a.size:
    return 0.0
  if not a_to_b.size or not b_to_a.size:
    return float("inf")
  return None


def _hd95(pred, truth, spacing, combine) -> float:
  a_to_b, b_to_a = surface_distances(pred, truth, spacing)
  empty = _empty_answer(a_to_b, b_to_a)
  return empty if empty is not None else float(combine(a_to_b, b_to_a))


def hd95_pooled(pred, truth, spacing: Sequence[float] | None = None) -> float:
  """95th percentile of both directed surface-distance sets pooled into one.

  `pred` and `truth` are binary masks of one shape (2-D or 3-D), `spacing` the
  voxel size per array axis (None: unit voxels). Returns 0.0 when both masks
  are empty, +inf when exactly one is.
  """
  return _hd95(pred, truth, spacing,
               lambda a, b: np.percentile(np.concatenate([a, b]), 95))


def hd95_max_directed(pred, truth, spacing: Sequence[float] | None = None) -> float:
  """The larger of the two directed 95th percentiles (MONAI's and DeepMind's HD95).

  Arguments and empty-mask answers as `hd95_pooled`.
  """
  return _hd95(pred, truth, spacing,
               lambda a, b: max(np.percentile(a, 95), np.percentile(b, 95)))


def surface_dice(pred, truth, tolerance: float, spacing: Sequence[float] | None = None, *,
                 weighting: str = "surfels") -> float:
  """Normalised surface Dice: the share of both surfaces within `tolerance` of the other.

  Args:
    pred: binary mask A, 2-D or 3-D, bool or 0/1.
    truth: binary mask B, same shape.
    tolerance: the largest distance that counts as agreement (units of
      `spacing`), >= 0.
    spacing: voxel size per array axis (e.g. mm); None means unit voxels.
    weighting: 'surfels' (default): DeepMind's corner-grid surfels weighted
      by their area (Nikolov et al.); 'voxels': surface voxels, unweighted
      (MONAI's default). See the module docstring.

  Returns:
    A float in [0, 1]: 1.0 when both masks are empty, 0.0 when exactly one is.
  """
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting={weighting!r}: use one of {', '.join(WEIGHTINGS)}.")
  if not np.isfinite(tolerance) or tolerance < 0:
    raise ValueError(f"tolerance={tolerance!r} must be a finite distance >= 0.")
  a, b = check_pair(pred, truth)
  sampling = check_spacing(spacing, a.ndim)
  has_a, has_b = bool(a.any()), bool(b.any())
  if not (has_a or has_b):
    return 1.0
  if has_a != has_b:
    return 0.0
  scale = _scale(sampling, a.ndim)
  pa, pb = _cropped(a, b)
  if weighting == "voxels":
    points_a, points_b = np.argwhere(boundary(pa)) * scale, np.argwhere(boundary(pb)) * scale
    weights_a, weights_b = np.ones(len(points_a)), np.ones(len(points_b))
  else:
    (points_a, weights_a), (points_b, weights_b) = (surfels.surfels(pa, scale),
                                                    surfels.surfels(pb, scale))
  near = (weights_a[_within(points_a, points_b, tolerance)].sum()
          + weights_b[_within(points_b, points_a, tolerance)].sum())
  return float(near / (weights_a.sum() + weights_b.sum()))


def surface_metrics(pred, truth, *, tolerance: float, spacing: Sequence[float] | None = None
                    ) -> dict[str, float]:
  """Both HD95s (one pass over the surface voxels) and the surface Dice (surfels).

  Returns:
    {'hd95_pooled', 'hd95_max_directed', 'surface_dice'}, as the functions of
    those names give them.
  """
  a_to_b, b_to_a = surface_distances(pred, truth, spacing)
  empty = _empty_answer(a_to_b, b_to_a)
  if empty is None:
    pooled = float(np.percentile(np.concatenate([a_to_b, b_to_a]), 95))
    directed = float(max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95)))
  else:
    pooled = directed = empty
  return {"hd95_pooled": pooled, "hd95_max_directed": directed,
          "surface_dice": surface_dice(pred, truth, tolerance, spacing)}
