"""Evaluation metrics of the SCOAT-Net paper (eqs. 7-10), per case, on the host.

A case is one patient's scan (3-D) or one slice (2-D); A is the model's binary
mask and B the ground truth. Pixel level (|.| counts voxels):

* DSC = 2|A∩B| / (|A| + |B|); SEN = |A∩B| / |B|; PPV = |A∩B| / |A|.
* VA (volume accuracy, ours) = 1 - ||A| - |B|| / (|A| + |B|), computed as
  2 min(|A|, |B|) / (|A| + |B|), the same number.

Region level: A and B are split into connected regions (8-connectivity in 2-D,
26 in 3-D: any voxels touching by a face, edge or corner belong together). The
*centre* of a region is its voxel farthest from the region's boundary: the
argmax of the Euclidean distance transform (EDT) of the region's own mask,
with voxels outside the image counting as background (so a region touching
the image border has its border as boundary there, and the centre never sits
on the edge just because the image stops). Ties go to the lowest flat index
in C order. Unlike the centroid, this centre always lies inside the region,
even for a ring or a C shape. `spacing` (voxel size per axis) goes to the EDT,
so anisotropic voxels move the centre to the truly farthest voxel.

* RLP = (predicted regions whose centre lies in B) / (predicted regions).
* RLR = (true regions containing the centre of some predicted region) /
  (true regions).

Empty masks follow one rule: a ratio whose denominator is zero is 0/0 (its
numerator is then zero too) and counts as 1, "nothing to get wrong"; every
other ratio is computed as written. Hence, never NaN and never a division by
zero:

    ===================  ====  ====  ====  ====  ====  ====
    case                 DSC   SEN   PPV   VA    RLP   RLR
    ===================  ====  ====  ====  ====  ====  ====
    A empty, B empty     1     1     1     1     1     1
    A filled, B empty    0     1     0     0     0     1
    A empty, B filled    0     0     1     0     1     0
    ===================  ====  ====  ====  ====  ====  ====

(SEN = 1 with B empty: there was nothing to miss; PPV = 1 and RLP = 1 with A
empty: nothing was claimed, so nothing was claimed wrongly.)

`hd95` gives the 95th percentile Hausdorff distance in millimetres (if
`spacing` is in millimetres) under the pooled convention (the 95th percentile
of both directed surface-distance sets taken together; `surface` has it and
the max-of-directed convention of MONAI and DeepMind side by side): 0.0 when
both masks are empty, +inf when exactly one is. `aggregate` reduces per-case
dicts to mean/std/median over the finite values and counts the infinite ones
separately. `confusion_sums` is the jit-friendly per-image (TP, FP, FN)
reduction for use inside a training loop.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from scoat_jax.evaluation import surface
from scoat_jax.evaluation.surface import (as_mask as _as_mask, check_pair as _check_pair,
                                          check_spacing as _check_spacing)

METRIC_NAMES = ("dsc", "sen", "ppv", "va", "rlp", "rlr")


def _ratio(num: float, den: float) -> float:
  # Only 0/0 reaches the zero-denominator branch (every numerator here is
  # bounded by its denominator): count it as perfect, see the module table.
  return 1.0 if den == 0 else float(num) / float(den)


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
  """Connected regions with full connectivity (8 in 2-D, 26 in 3-D).

  Args:
    mask: bool array, 2-D or 3-D.

  Returns:
    (labels, n): int array of the mask's shape with regions numbered 1..n in
    C-order of their first voxel, background 0; and the number of regions.
  """
  structure = np.ones((3,) * mask.ndim, bool)
  labels, n = ndimage.label(mask, structure=structure)
  return labels, int(n)


def region_centres(mask, *, spacing: Sequence[float] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """The centre (voxel farthest from the boundary) of every connected region.

  Each region is cropped to its bounding box padded by one background voxel,
  so the EDT costs the region's size, not the image's, and voxels outside the
  image count as background.

  Args:
    mask: binary 2-D or 3-D mask (bool or 0/1).
    spacing: voxel size per axis for the EDT; None means isotropic unit voxels.

  Returns:
    (labels, centres): the region label image from `label_regions` and an int
    array (n, ndim) whose row k - 1 is the centre of region k.
  """
  mask = _as_mask(mask, "mask")
  sampling = _check_spacing(spacing, mask.ndim)
  labels, n = label_regions(mask)
  centres = np.zeros((n, mask.ndim), np.int64)
  for k, box in enumerate(ndimage.find_objects(labels), start=1):
    region = np.pad(labels[box] == k, 1)
    dist = ndimage.distance_transform_edt(region, sampling=sampling)
    # The EDT is 0 off the region and > 0 on it, so the argmax (first maximum
    # in C order, hence the lowest flat index) is always a region voxel.
    local = np.unravel_index(np.argmax(dist), region.shape)
    centres[k - 1] = [s.start + i - 1 for s, i in zip(box, local)]
  return labels, centres


def case_metrics(pred, truth, *, spacing: Sequence[float] | None = None) -> dict[str, float]:
  """DSC, SEN, PPV, VA, RLP and RLR of one case (see the module docstring).

  Args:
    pred: the model's binary mask A, 2-D or 3-D, bool or 0/1.
    truth: the ground-truth binary mask B, same shape.
    spacing: voxel size per axis, used only to place region centres (EDT
      sampling); None means isotropic. The pixel-level metrics are ratios of
      voxel counts and do not depend on it.

  Returns:
    Floats 'dsc', 'sen', 'ppv', 'va', 'rlp', 'rlr' in [0, 1], and integer
    counts 'pred_voxels', 'true_voxels', 'intersection_voxels',
    'n_pred_regions', 'n_true_regions', 'n_correct_pred_regions' (centre in
    B) and 'n_found_true_regions' (containing a predicted centre).
  """
  a, b = _check_pair(pred, truth)
  sampling = _check_spacing(spacing, a.ndim)
  size_a, size_b = int(np.count_nonzero(a)), int(np.count_nonzero(b))
  inter = int(np.count_nonzero(a & b))

  _, centres = region_centres(a, spacing=sampling)
  labels_b, n_b = label_regions(b)
  hit = labels_b[tuple(centres.T)]  # the true region (0: none) under each centre
  n_correct = int(np.count_nonzero(hit))
  n_found = int(np.unique(hit[hit > 0]).size)
  n_a = len(centres)

  return {
      "dsc": _ratio(2 * inter, size_a + size_b),
      "sen": _ratio(inter, size_b),
      "ppv": _ratio(inter, size_a),
      "va": _ratio(2 * min(size_a, size_b), size_a + size_b),
      "rlp": _ratio(n_correct, n_a),
      "rlr": _ratio(n_found, n_b),
      "pred_voxels": size_a,
      "true_voxels": size_b,
      "intersection_voxels": inter,
      "n_pred_regions": n_a,
      "n_true_regions": n_b,
      "n_correct_pred_regions": n_correct,
      "n_found_true_regions": n_found,
  }


def hd95(pred, truth, spacing: Sequence[float] | None = None) -> float:
  """95th percentile symmetric Hausdorff distance between mask surfaces, pooled convention.

  Surface voxels are mask voxels with a face neighbour outside the mask (the
  image border counts as outside). The distances from every surface voxel of
  A to the nearest surface voxel of B, and from every surface voxel of B to
  the nearest of A, are pooled into one set; the result is its 95th
  percentile (numpy's default linear interpolation). This is
  `surface.hd95_pooled`; MONAI and DeepMind's surface-distance take the
  larger of the two directed 95th percentiles instead
  (`surface.hd95_max_directed`), which differs on the same masks.

  Args:
    pred: the model's binary mask A, 2-D or 3-D, bool or 0/1.
    truth: the ground-truth binary mask B, same shape.
    spacing: voxel size per axis (e.g. millimetres, in array axis order);
      None means unit voxels, i.e. a distance in voxels.

  Returns:
    The distance as a float: 0.0 when both masks are empty, float('inf') when
    exactly one is empty (`aggregate` counts those apart from the finite ones).
  """
  return surface.hd95_pooled(pred, truth, spacing)


def _is_number(v) -> bool:
  return isinstance(v, (numbers.Real, np.number)) and not isinstance(v, (bool, np.bool_))


def aggregate(per_case: Sequence[dict], *, ddof: int = 0) -> dict:
  """Mean, standard deviation and median of every numeric metric over cases.

  Non-numeric entries (e.g. a 'case_id' string) are ignored. Infinite values
  (e.g. `hd95` with one empty mask) and NaNs are left out of the statistics
  and counted instead.

  Args:
    per_case: one dict per case, all with the same numeric keys.
    ddof: delta degrees of freedom of the std: 0 (default) is the population
      std, numpy's default; 1 the sample std.

  Returns:
    {metric: {'mean', 'std', 'median', 'n' (finite values used), 'n_inf',
    'n_nan'}} for every numeric key, plus 'n': the number of cases. A metric
    with no finite value (or n <= ddof, for the std) gets NaN statistics.
  """
  if not per_case:
    raise ValueError("aggregate: per_case is empty; score at least one case.")
  keys = [k for k, v in per_case[0].items() if _is_number(v)]
  for i, case in enumerate(per_case):
    numeric = {k for k, v in case.items() if _is_number(v)}
    if numeric != set(keys):
      raise ValueError(f"aggregate: case {i} has numeric keys {sorted(numeric)}, case 0 has "
                       f"{sorted(keys)}; pass dicts with the same metrics.")
  out: dict = {}
  for k in keys:
    values = np.array([float(case[k]) for case in per_case], np.float64)
    finite = values[np.isfinite(values)]
    n = finite.size
    out[k] = {
        "mean": float(finite.mean()) if n else float("nan"),
        "std": float(finite.std(ddof=ddof)) if n > ddof else float("nan"),
        "median": float(np.median(finite)) if n else float("nan"),
        "n": int(n),
        "n_inf": int(np.count_nonzero(np.isinf(values))),
        "n_nan": int(np.count_nonzero(np.isnan(values))),
    }
  out["n"] = len(per_case)
  return out


def confusion_sums(pred: jax.Array, truth: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-image true-positive, false-positive and false-negative voxel counts.

  jit-friendly, for the training loop: sum the returned counts on the host
  (DSC = 2 TP / (2 TP + FP + FN) over any set of images).

  Args:
    pred: (B, ...) bool or integer mask (non-zero = foreground), at least 2-D.
    truth: same shape and kinds as `pred`.

  Returns:
    (tp, fp, fn), each int32 of shape (B,).
  """
  pred, truth = jnp.asarray(pred), jnp.asarray(truth)
  if pred.shape != truth.shape or pred.ndim < 2:
    raise ValueError(f"confusion_sums: pred {pred.shape} and truth {truth.shape} must have the "
                     f"same shape (B, ...) with at least 2 dimensions.")
  for name, x in (("pred", pred), ("truth", truth)):
    if jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"confusion_sums: {name} is {x.dtype}; threshold it first "
                       f"(e.g. logits > 0) to a bool mask.")
  p, t = pred != 0, truth != 0
  axes = tuple(range(1, pred.ndim))
  count = lambda m: jnp.sum(m, axis=axes, dtype=jnp.int32)
  return count(p & t), count(p & ~t), count(~p & t)
