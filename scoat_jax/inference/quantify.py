"""Quantification of a predicted opacity mask (paper section "quantification").

* Lung opacification volume: LOV = (voxels labelled > 0) x voxel volume, in ml
  (1 ml = 1000 mm^3), the voxel volume from the image spacing.
* Lung volume from the classical lung mask (`data.lung_mask`, with its
  documented limits), and the percentage of infection POI = 100 x LOV / lung
  volume, as the paper defines it (all predicted opacity counts, also any
  outside the lung mask; that part is reported as `lov_outside_lung_ml` so a
  failing lung mask is visible).
* Lesions: connected components of the mask with 26-connectivity (any voxels
  touching by a face, edge or corner), each with its volume and centre. The
  centre is the voxel farthest from the lesion's boundary (as in the paper's
  region metrics, `evaluation.metrics.region_centres`, with the true voxel
  spacing), so it always lies inside the lesion; its physical position is
  given in the image's LPS millimetres. `region_centres_in_box` computes the
  same regions and centres as `region_centres` on the opacity's bounding box
  with int32 labels, and the counts go a few slices at a time, so the lesion
  list costs the lesions' extent rather than the scan's.
* Three-class models: ground-glass opacity (label 1) and consolidation
  (label 2) volumes, overall and per lesion.

Every number is plain JSON (floats, ints, lists; None where undefined, never
NaN). For 2-D 8-bit slices (no spacing, no HU) the same quantities are given
in pixels and the lung is not segmented.

Cost (benchmarks/quantify.py, a 512 x 512 x 300 phantom scan, 2 shared cores):
`quantify_volume` with the HU takes about 3 s, almost all of it the lung mask,
and 3.1 bytes per voxel beyond its inputs (the labels and the int16 or float32
HU), against 21-23 s and 24 bytes before both were cropped.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from scoat_jax.data.ct_io import Geometry
from scoat_jax.data.lung_mask import bounding_box, lung_mask

CLASS_NAMES = {1: "ggo", 2: "consolidation"}
_CHUNK = 16  # slices per block in whole-volume counts (bounds the temporaries)


class QuantifyError(ValueError):
  """A bad quantification request (shapes, labels)."""


def _check_labels(labels: np.ndarray, ndim: int, num_classes: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != ndim:
    raise QuantifyError(f"labels have shape {labels.shape}; expected a {ndim}-D mask")
  if labels.dtype == bool:
    labels = labels.astype(np.uint8)
  if not np.issubdtype(labels.dtype, np.integer):
    raise QuantifyError(f"labels have dtype {labels.dtype}; threshold probabilities to labels first")
  if num_classes not in (1, 3):
    raise QuantifyError(f"num_classes={num_classes} must be 1 or 3")
  top = 1 if num_classes == 1 else 2
  if labels.size and (labels.min() < 0 or labels.max() > top):
    raise QuantifyError(f"labels span {labels.min()}..{labels.max()}, outside 0..{top} for a "
                        f"{num_classes}-class model")
  return labels


def index_to_mm(geometry: Geometry, index_zyx: Sequence[float]) -> list[float]:
  """Physical LPS position (x, y, z) in mm of a (z, y, x) voxel index."""
  ijk = np.asarray(index_zyx, np.float64)[::-1]
  point = np.asarray(geometry.origin) + geometry.direction_matrix @ (np.asarray(geometry.spacing) * ijk)
  return [float(v) for v in point]


def _count(*arrays: np.ndarray, test) -> int:
  """np.count_nonzero(test(*arrays)), a few slices at a time (no whole-volume temporary)."""
  return sum(int(np.count_nonzero(test(*(a[z:z + _CHUNK] for a in arrays))))
             for z in range(0, arrays[0].shape[0], _CHUNK))


def _bincount(ids: np.ndarray, n: int, where: np.ndarray | None = None) -> np.ndarray:
  """Elements per id 0..n (optionally only where `where` holds), a few slices at a time."""
  out = np.zeros(n + 1, np.int64)
  for z in range(0, ids.shape[0], _CHUNK):
    chunk = ids[z:z + _CHUNK]
    out += np.bincount(chunk.ravel() if where is None else chunk[where[z:z + _CHUNK]],
                       minlength=n + 1)
  return out


def region_centres_in_box(mask: np.ndarray, spacing=None) -> tuple[np.ndarray, int, np.ndarray,
                                                             tuple[slice, ...] | None]:
  """`evaluation.metrics.region_centres` on the mask's bounding box, with int32 labels.

  The same regions (full connectivity, numbered in C order of their first
  voxel, which cropping keeps) and the same centres: each region's EDT on its
  own box padded by one background voxel, the first maximum in C order.

  Args:
    mask: 2-D or 3-D bool mask.
    spacing: voxel size per axis for the EDT; None means isotropic.

  Returns:
    (labels, n, centres, box): the region labels of mask[box] (None and an
    empty (0, 0) label array when the mask is empty), the number of regions,
    and an int array (n, ndim) of centres in the indices of the whole mask.
  """
  box = bounding_box(mask)
  if box is None:
    return np.zeros((0,) * mask.ndim, np.int32), 0, np.zeros((0, mask.ndim), np.int64), None
  comp, n = ndimage.label(mask[box], structure=np.ones((3,) * mask.ndim, bool))
  centres = np.zeros((n, mask.ndim), np.int64)
  for k, sub in enumerate(ndimage.find_objects(comp), start=1):
    region = np.pad(comp[sub] == k, 1)
    dist = ndimage.distance_transform_edt(region, sampling=spacing)
    local = np.unravel_index(np.argmax(dist), region.shape)
    centres[k - 1] = [b.start + s.start + i - 1 for b, s, i in zip(box, sub, local)]
  return comp, int(n), centres, box


def lesions(labels: np.ndarray, *, voxel_volume_ml: float | None = None, spacing_zyx=None,
            geometry: Geometry | None = None, num_classes: int = 1) -> list[dict]:
  """Connected lesions of a mask (26-connectivity in 3-D, 8 in 2-D), largest first.

  Works on the bounding box of the opacity, so it costs the lesions' extent,
  not the scan's (about 0.2 s and 1 byte per scan voxel for the phantom scan of
  benchmarks/quantify.py). Each centre takes a distance transform of its
  lesion's own box (about 20 bytes per voxel of that box), so one lesion
  spreading over most of a lung needs that much for its box.

  Args:
    labels: 2-D or 3-D integer labels (> 0 is opacity).
    voxel_volume_ml: volume of one voxel; None (2-D slices) gives pixel counts only.
    spacing_zyx: voxel size per axis, to place centres truly farthest from
      the boundary; None means isotropic.
    geometry: when given, centres are also reported in LPS mm.
    num_classes: 3 adds per-lesion GGO and consolidation sizes.

  Returns:
    One dict per lesion: 'id' (1 = largest), 'voxels' (3-D) or 'pixels'
    (2-D), 'volume_ml' (with voxel_volume_ml), 'centre_index' (z, y, x) or
    (y, x), 'centre_mm' (LPS x, y, z; with geometry), 'bbox_start' /
    'bbox_stop' (index, stop exclusive), and with three classes
    'ggo_<unit>' and 'consolidation_<unit>' in the same unit as the size.

  Raises:
    QuantifyError: spacing_zyx not one positive size per axis.
  """
  sampling = None
  if spacing_zyx is not None:
    sampling = tuple(float(s) for s in np.ravel(spacing_zyx))
    sampling = sampling * labels.ndim if len(sampling) == 1 else sampling
    if len(sampling) != labels.ndim or not all(s > 0 and np.isfinite(s) for s in sampling):
      raise QuantifyError(f"spacing_zyx={spacing_zyx!r} must be {labels.ndim} positive voxel "
                          "sizes, one per axis of the labels")
  box = bounding_box(labels)
  if box is None:
    return []
  sub = labels[box]
  comp, n, centres, _ = region_centres_in_box(sub > 0, sampling)
  # It crops sub once more to its own box: the same box here.
  count_key = "voxels" if labels.ndim == 3 else "pixels"
  scale, unit = ((voxel_volume_ml, "volume_ml") if voxel_volume_ml is not None
                 else (1, count_key))
  counts = _bincount(comp, n)
  per_class = ({c: _bincount(comp, n, where=sub == c) for c in CLASS_NAMES}
               if num_classes == 3 else {})
  centres += [b.start for b in box]
  boxes = [tuple(slice(s.start + b.start, s.stop + b.start) for s, b in zip(o, box))
           for o in ndimage.find_objects(comp)]
  out = []
  # Largest first; ties keep the scan order of the regions.
  for rank, k in enumerate(sorted(range(1, n + 1), key=lambda k: (-counts[k], k)), start=1):
    item = {"id": rank, count_key: int(counts[k])}
    if voxel_volume_ml is not None:
      item["volume_ml"] = int(counts[k]) * voxel_volume_ml
    item["centre_index"] = [int(v) for v in centres[k - 1]]
    if geometry is not None:
      item["centre_mm"] = index_to_mm(geometry, centres[k - 1])
    item["bbox_start"] = [int(s.start) for s in boxes[k - 1]]
    item["bbox_stop"] = [int(s.stop) for s in boxes[k - 1]]
    for c, name in CLASS_NAMES.items():
      if c in per_class:
        item[f"{name}_{unit}"] = int(per_class[c][k]) * scale
    out.append(item)
  return out


def quantify_volume(labels: np.ndarray, geometry: Geometry, *, hu: np.ndarray | None = None,
                    lung: np.ndarray | None = None, num_classes: int = 1,
                    lung_margin_mm: float | None = None) -> dict:
  """LOV, lung volume, POI, lesions and class volumes of a predicted (z, y, x) mask.

  Args:
    labels: (z, y, x) integer mask: 0 background, 1 opacity (one class) or
      1 GGO / 2 consolidation (three classes).
    geometry: the scan's voxel grid (spacing gives the voxel volume).
    hu: the scan in HU, to segment the lung (`data.lung_mask`).
    lung: a lung mask to use instead of segmenting one.
    num_classes: 1 or 3.
    lung_margin_mm: the lung rule's margin when the labels were kept to it
      (`inference.lung_rule`): opacity outside the mask then lies within it,
      and the warning says so; None: no rule.

  Returns:
    {'lov_ml', 'opacity_voxels', 'voxel_volume_ml', 'lung_volume_ml',
    'lung_voxels', 'poi_percent', 'lov_outside_lung_ml', 'warnings' (what makes
    the lung numbers doubtful, e.g. POI above 100%), 'num_lesions',
    'lesions' (see `lesions`), and with three
    classes 'class_volumes_ml': {'ggo', 'consolidation'}}. Lung entries are
    None without hu and lung, and POI is None when the lung is empty.
  """
  labels = _check_labels(labels, 3, num_classes)
  if labels.shape != geometry.shape:
    raise QuantifyError(f"labels have shape {labels.shape} but the geometry is {geometry.shape} "
                        "(z, y, x); pass the mask predicted on that scan")
  vv = geometry.voxel_volume_ml
  n_opacity = int(np.count_nonzero(labels))  # labels are >= 0
  report = {"lov_ml": n_opacity * vv, "opacity_voxels": n_opacity, "voxel_volume_ml": vv}
  if lung is None and hu is not None:
    if np.shape(hu) != labels.shape:
      raise QuantifyError(f"hu has shape {np.shape(hu)}, labels {labels.shape}; they must match")
    lung = lung_mask(hu, geometry.spacing)
  if lung is not None:
    lung = np.asarray(lung, bool)
    if lung.shape != labels.shape:
      raise QuantifyError(f"lung mask shape {lung.shape} differs from labels {labels.shape}")
    n_lung = int(np.count_nonzero(lung))
    outside = _count(labels, lung, test=lambda l, m: (l > 0) > m)
    report.update(lung_volume_ml=n_lung * vv, lung_voxels=n_lung,
                  poi_percent=100.0 * n_opacity / n_lung if n_lung else None,
                  lov_outside_lung_ml=outside * vv)
  else:
    report.update(lung_volume_ml=None, lung_voxels=None, poi_percent=None,
                  lov_outside_lung_ml=None)
  report["warnings"] = _plausibility_warnings(report, lung_margin_mm)
  if num_classes == 3:
    report["class_volumes_ml"] = {name: _count(labels, test=lambda l, c=c: l == c) * vv
                                  for c, name in CLASS_NAMES.items()}
  spacing_zyx = tuple(reversed(geometry.spacing))
  found = lesions(labels, voxel_volume_ml=vv, spacing_zyx=spacing_zyx, geometry=geometry,
                  num_classes=num_classes)
  report["num_lesions"] = len(found)
  report["lesions"] = found
  return report


# Opacity outside the lung mask beyond this share of the LOV makes POI doubtful.
OUTSIDE_LUNG_WARNING = 0.1


def _plausibility_warnings(report: dict, lung_margin_mm: float | None = None) -> list[str]:
  """What makes the lung numbers doubtful, in words (reported, never hidden)."""
  out = []
  lov, outside, poi = report["lov_ml"], report.get("lov_outside_lung_ml"), report.get("poi_percent")
  if report.get("lung_volume_ml") == 0:
    out.append("the lung mask is empty, so POI is undefined; check that the scan shows the chest")
  if poi is not None and poi > 100:
    out.append(f"POI is {poi:.0f}%: more opacity than lung; the lung mask missed part of the "
               "lung (dense consolidation, effusion) or the scan is not a chest CT")
  elif outside is not None and lov > 0 and outside > OUTSIDE_LUNG_WARNING * lov:
    share = f"{100 * outside / lov:.0f}% of the opacity lies outside the lung mask"
    out.append(f"{share}; POI counts all of it and may be too high" if lung_margin_mm is None
               else f"{share}, within the lung rule's {lung_margin_mm:g} mm margin (pleura, "
               "chest wall, diaphragm); check those outlines")
  return out


def quantify_slice(labels: np.ndarray, *, num_classes: int = 1) -> dict:
  """The 2-D counterpart for slices without spacing or HU (e.g. 8-bit PNG/JPG).

  Args:
    labels: (H, W) integer mask.
    num_classes: 1 or 3.

  Returns:
    {'opacity_pixels', 'opacity_percent_of_image', 'num_lesions', 'lesions'
    (see `lesions`, sizes in pixels), and 'class_pixels' with three
    classes}; LOV, lung volume and POI are None (no spacing, no HU).
  """
  labels = _check_labels(labels, 2, num_classes)
  n = int(np.count_nonzero(labels))
  report = {"lov_ml": None, "lung_volume_ml": None, "poi_percent": None, "opacity_pixels": n,
            "opacity_percent_of_image": 100.0 * n / labels.size if labels.size else 0.0}
  if num_classes == 3:
    report["class_pixels"] = {name: int(np.count_nonzero(labels == c))
                              for c, name in CLASS_NAMES.items()}
  found = lesions(labels, num_classes=num_classes)
  report["num_lesions"] = len(found)
  report["lesions"] = found
  return report
