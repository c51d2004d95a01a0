"""Bringing any stored CT volume to the canonical axial orientation, and outputs back.

Scanners and converters store a volume's voxels in any axis order: axial
slices along the last index axis is common, but sagittal or coronal storage,
flipped axes and tilted (oblique) grids all occur. The network segments axial
slices, so every volume is read in one canonical orientation: index axis x
along the patient's left, y posterior, z superior (LPS, the identity
direction of ITK), so the numpy array is (z, y, x) with z the axial slice.

The map is an axis permutation with flips, chosen from the direction cosines:
each index axis goes to the physical axis it is closest to. No voxel is
interpolated, so a mask predicted on the canonical array maps back onto the
stored grid voxel for voxel (`Reorientation.to_stored`), and volumes counted in
either agree exactly. A grid up to `MAX_OBLIQUE_DEGREES` off the axes
(gantry tilt, an oblique reformat) is treated as its nearest axes: the slices
are the stored ones, which differ from true axial slices by that tilt. Beyond
it the nearest axis is ambiguous and the volume is refused; resample it onto
an axis-aligned grid first.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from scoat_jax.data.geometry import Geometry, CTError

MAX_OBLIQUE_DEGREES = 30.0
_AXIS_NAMES = (("R", "L"), ("A", "P"), ("I", "S"))  # physical -x/+x, -y/+y, -z/+z (LPS)


def orientation_code(geometry: Geometry) -> str:
  """Three letters, where each index axis x, y, z points (ITK's LPS convention): 'LPS' is
  canonical, 'PSL' a sagittal stack, 'LSA' a coronal one."""
  d = geometry.direction_matrix
  out = ""
  for i in range(3):
    j = int(np.argmax(np.abs(d[:, i])))
    out += _AXIS_NAMES[j][int(d[j, i] > 0)]
  return out


def _on_grid(array, geometry: Geometry, which: str) -> np.ndarray:
  array = np.asarray(array)
  if array.shape[:3] != geometry.shape:
    raise CTError(f"an array of shape {array.shape} is not on the {which} grid "
                  f"{geometry.shape} (z, y, x)")
  return array


@dataclasses.dataclass(frozen=True)
class Reorientation:
  """How a stored volume maps to the canonical one (no resampling).

  Attributes:
    stored: the grid as stored in the file.
    canonical: the same voxels' grid after the permutation and flips.
    source_axis: for each canonical index axis (x, y, z), the stored index axis it is.
    flipped: for each canonical index axis, whether it runs against the stored axis.
    oblique_degrees: the largest angle between a canonical index axis and its
      physical axis (0 for an axis-aligned grid).
    warnings: what reading the file found doubtful about the grid (a gantry tilt,
      slice positions derived from other tags, NIfTI transforms); reports carry them.
  """
  stored: Geometry
  canonical: Geometry
  source_axis: tuple[int, int, int]
  flipped: tuple[bool, bool, bool]
  oblique_degrees: float
  warnings: tuple[str, ...] = ()

  @property
  def is_identity(self) -> bool:
    return self.source_axis == (0, 1, 2) and not any(self.flipped)

  @property
  def _axes(self) -> list[int]:
    """`np.transpose` axes taking a stored (z, y, x) array to the canonical order."""
    return [2 - self.source_axis[2 - n] for n in range(3)]  # numpy axis 2 - k: index axis k

  @property
  def _flips(self) -> list[int]:
    """The numpy axes of the canonical array that run against the stored ones."""
    return [2 - k for k in range(3) if self.flipped[k]]

  def to_canonical(self, array: np.ndarray) -> np.ndarray:
    """A stored (z, y, x) array on the canonical grid."""
    array = _on_grid(array, self.stored, "stored")
    if self.is_identity:
      return array
    return np.ascontiguousarray(np.flip(np.transpose(array, self._axes), axis=self._flips))

  def to_stored(self, array: np.ndarray) -> np.ndarray:
    """A canonical (z, y, x) array back on the stored grid (the exact inverse)."""
    array = _on_grid(array, self.canonical, "canonical")
    if self.is_identity:
      return array
    return np.ascontiguousarray(np.transpose(np.flip(array, axis=self._flips),
                                             np.argsort(self._axes)))

  def canonical_index_to_stored(self, index_zyx) -> tuple[int, int, int]:
    """The stored (z, y, x) index of a canonical (z, y, x) voxel index."""
    stored = [0, 0, 0]
    for k in range(3):  # canonical index axis k (numpy axis 2 - k)
      i = int(index_zyx[2 - k])
      n = self.canonical.size[k]
      stored[2 - self.source_axis[k]] = n - 1 - i if self.flipped[k] else i
    return tuple(stored)

  def box_to_stored(self, start_zyx, stop_zyx) -> tuple[list[int], list[int]]:
    """A canonical index box [start, stop) as the stored grid's box."""
    a = self.canonical_index_to_stored(start_zyx)
    b = self.canonical_index_to_stored([v - 1 for v in stop_zyx])
    return [min(p, q) for p, q in zip(a, b)], [max(p, q) + 1 for p, q in zip(a, b)]

  def axial_slice(self, z: int) -> dict:
    """Canonical axial slice z as the stored grid's axis and index along it."""
    axis = self.source_axis[2]
    return {"axial_index": int(z), "stored_axis": "xyz"[axis],
            "stored_index": self.canonical_index_to_stored((z, 0, 0))[2 - axis]}

  def describe(self) -> dict:
    """For reports: what was done to read the scan as axial slices."""
    out = {"stored_orientation": orientation_code(self.stored),
           "reoriented": not self.is_identity,
           "oblique_degrees": round(self.oblique_degrees, 3)}
    if self.warnings:
      out["warnings"] = list(self.warnings)
    return out


def reorientation(geometry: Geometry, *, what: str = "the volume",
                  max_oblique_degrees: float = MAX_OBLIQUE_DEGREES,
                  warnings=()) -> Reorientation:
  """The permutation and flips that make `geometry` canonical (`warnings` are kept with it).

  Raises:
    CTError: two index axes closest to one physical axis, or a grid more
      than `max_oblique_degrees` off the axes.
  """
  d = geometry.direction_matrix
  nearest = [int(np.argmax(np.abs(d[:, i]))) for i in range(3)]
  cosines = [abs(float(d[nearest[i], i])) / float(np.linalg.norm(d[:, i])) for i in range(3)]
  oblique = max(math.degrees(math.acos(min(1.0, c))) for c in cosines)
  if sorted(nearest) != [0, 1, 2] or oblique > max_oblique_degrees + 1e-3:
    raise CTError(
        f"{what}: its grid is {oblique:.1f} degrees off the patient axes (direction "
        f"{tuple(round(v, 4) for v in geometry.direction)}), more than the "
        f"{max_oblique_degrees:g} degrees read as the nearest axes; resample it onto an "
        "axis-aligned grid first (e.g. SimpleITK Resample with an identity direction).")
  source_axis = tuple(nearest.index(k) for k in range(3))
  flipped = tuple(bool(d[k, source_axis[k]] < 0) for k in range(3))
  size = tuple(geometry.size[source_axis[k]] for k in range(3))
  spacing = tuple(geometry.spacing[source_axis[k]] for k in range(3))
  columns = [d[:, source_axis[k]] * (-1.0 if flipped[k] else 1.0) for k in range(3)]
  # The canonical voxel (0, 0, 0) is the stored voxel at the far end of every flipped axis.
  first = np.zeros(3)
  for k in range(3):
    if flipped[k]:
      first[source_axis[k]] = geometry.size[source_axis[k]] - 1
  origin = np.asarray(geometry.origin) + d @ (np.asarray(geometry.spacing) * first)
  canonical = Geometry(size, spacing, tuple(origin.tolist()),
                       tuple(np.stack(columns, axis=1).ravel().tolist()))
  return Reorientation(geometry, canonical, source_axis, flipped, oblique,
                       tuple(warnings))
