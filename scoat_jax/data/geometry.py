"""The voxel grid of a volume in physical space, as ITK and the file formats store it."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


class CTError(ValueError):
  """A bad CT input or output request; the message names the path and the fix."""


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Voxel grid of a volume in physical space (ITK conventions, LPS, mm).

  Attributes:
    size: number of voxels along (x, y, z).
    spacing: voxel size in mm along (x, y, z).
    origin: physical position in mm of the centre of voxel (0, 0, 0).
    direction: 3x3 direction cosines, row-major; column k is the physical
      direction of index axis k.
  """
  size: tuple[int, int, int]
  spacing: tuple[float, float, float]
  origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
  direction: tuple[float, ...] = IDENTITY

  def __post_init__(self):
    size = tuple(int(v) for v in self.size)
    spacing = tuple(float(v) for v in self.spacing)
    origin = tuple(float(v) for v in self.origin)
    direction = tuple(float(v) for v in np.asarray(self.direction, dtype=np.float64).ravel())
    if len(size) != 3 or min(size) < 1:
      raise CTError(f"Geometry size={self.size!r} must be 3 positive ints (x, y, z)")
    if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
      raise CTError(f"Geometry spacing={self.spacing!r} must be 3 positive mm values (x, y, z)")
    if len(origin) != 3 or not all(np.isfinite(origin)):
      raise CTError(f"Geometry origin={self.origin!r} must be 3 finite mm values (x, y, z)")
    if len(direction) != 9 or abs(np.linalg.det(np.reshape(direction, (3, 3)))) < 1e-6:
      raise CTError(
          f"Geometry direction={self.direction!r} must be 9 floats of an invertible 3x3 matrix")
    object.__setattr__(self, "size", size)
    object.__setattr__(self, "spacing", spacing)
    object.__setattr__(self, "origin", origin)
    object.__setattr__(self, "direction", direction)

  @classmethod
  def from_image(cls, image: sitk.Image) -> Geometry:
    """The geometry of a 3-D SimpleITK image."""
    return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

  @classmethod
  def for_array(cls,
                shape_zyx: Sequence[int],
                spacing: Sequence[float],
                origin: Sequence[float] = (0.0, 0.0, 0.0),
                direction: Sequence[float] = IDENTITY) -> Geometry:
    """The geometry of a (z, y, x) array with the given (x, y, z) spacing."""
    return cls(tuple(reversed(tuple(shape_zyx))), tuple(spacing), tuple(origin), tuple(direction))

  @property
  def shape(self) -> tuple[int, int, int]:
    """The matching NumPy array shape (z, y, x)."""
    return (self.size[2], self.size[1], self.size[0])

  @property
  def voxel_volume_ml(self) -> float:
    """Volume of one voxel in millilitres (1 ml = 1000 mm^3)."""
    return float(np.prod(self.spacing)) / 1000.0

  @property
  def direction_matrix(self) -> np.ndarray:
    """Direction cosines as a 3x3 float64 matrix."""
    return np.reshape(np.asarray(self.direction, np.float64), (3, 3))

  def same_as(self, other: Geometry, tol: float = 1e-4) -> bool:
    """Whether two grids coincide: equal size, the rest within `tol`.

    Spacing and origin are compared in mm with tolerance tol * max(1, |value|)
    (file formats store them as float32); direction cosines with tolerance tol.
    """
    if self.size != other.size:
      return False

    def close(a, b):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      return bool(np.all(np.abs(a - b) <= tol * np.maximum(1.0, np.maximum(np.abs(a), np.abs(b)))))

    return (close(self.spacing, other.spacing) and close(self.origin, other.origin) and
            bool(np.all(np.abs(np.subtract(self.direction, other.direction)) <= tol)))

  def apply_to(self, image: sitk.Image) -> sitk.Image:
    """Sets spacing, origin and direction on `image` (whose size must match)."""
    if tuple(image.GetSize()) != self.size:
      raise CTError(
          f"array of size (x,y,z)={image.GetSize()} does not match geometry size {self.size}; "
          "pass an array of shape geometry.shape (z, y, x)")
    image.SetSpacing(self.spacing)
    image.SetOrigin(self.origin)
    image.SetDirection(self.direction)
    return image
