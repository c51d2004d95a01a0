"""One slice from its stored grid to the network's and back: the preprocessing
that training and inference share.

`prepare_slice` normalises the raw intensities (`intensity.normalize`: the HU
window, or /255 or histogram equalisation for 8-bit slices), optionally jitters them, and resamples the
slice by ONE affine warp that composes letterboxing (keep the aspect ratio,
fit the long side to S, centre, pad with 0 = the normalised value of air) with
the random flip, rotation and scale of training augmentation:
`scipy.ndimage.affine_transform`, linear for the image, nearest for the mask.
One warp instead of four saves time and does not blur the image repeatedly.
`unwarp` is the exact inverse of the letterbox, taking a prediction on the
model's grid back onto the slice's own.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from scoat_jax.data.intensity import normalize


class SliceError(ValueError):
  """A slice that cannot be prepared (image and mask disagree, bad shape)."""


def warp_matrix(shape: tuple[int, int], size: int, *, flip: bool = False, angle: float = 0.0,
                scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
  """The affine map (output pixel -> input pixel) of letterbox + flip + rotation + scale.

  Forward (input i -> output o, (row, col) coordinates about the centres):
  o - c_o = s0 * scale * R(angle) F (i - c_i), with s0 = size / max(H, W) the
  letterbox zoom and F the left-right flip; affine_transform needs the inverse.
  A positive angle turns the slice counter-clockwise as displayed (row 0 at the
  top), i.e. angle=90 gives np.rot90(slice).

  Args:
    shape: (H, W) of the input slice.
    size: side of the square output.
    flip: mirror columns.
    angle: rotation in degrees.
    scale: extra zoom (>1 enlarges).

  Returns:
    (matrix (2, 2), offset (2,)) for scipy.ndimage.affine_transform.
  """
  h, w = shape
  zoom = size / max(h, w) * scale
  t = math.radians(angle)
  rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
  mirror = np.diag([1.0, -1.0 if flip else 1.0])
  matrix = mirror @ rot.T / zoom
  c_in = np.array([(h - 1) / 2, (w - 1) / 2])
  c_out = np.array([(size - 1) / 2, (size - 1) / 2])
  return matrix, c_in - matrix @ c_out


def prepare_slice(image: np.ndarray, mask: np.ndarray, *, source: str, window, size: int,
                  num_classes: int, rng: np.random.Generator | None = None,
                  aug: dict | None = None, uint8_mode: str = "scale",
                  soft: np.ndarray | None = None):
  """Normalises, augments and letterboxes one slice.

  Args:
    image: (H, W) raw intensities (int16 HU or uint8).
    mask: (H, W) uint8 labels {0, 1, 2}.
    source: 'hu' or 'uint8' (from the dataset metadata).
    window: HU window (lo, hi).
    size: output side S.
    num_classes: 1 (mask > 0) or 3 (labels kept).
    rng: augmentation randomness; None means no augmentation.
    aug: flip, rotate_degrees, scale_range, intensity_jitter, gamma_range (used with rng).
    uint8_mode: how 8-bit slices are normalised (`intensity.UINT8_MODES`).
    soft: optional (H, W) float32 probabilities (a soft label), warped with
      the image's geometry (linear; 0 outside the slice).

  Returns:
    (image (S, S) float32 in [0, 1], mask (S, S) int32), and the warped soft
    label (S, S) float32 as a third element when `soft` is given.
  """
  img = normalize(image, source, window=tuple(window), uint8_mode=uint8_mode).astype(
      np.float32, copy=False)
  flip, angle, scale = False, 0.0, 1.0
  if rng is not None:
    aug = aug or {}
    # Draw every parameter every time so each stream has a fixed layout (the
    # gamma's draw came last, so the first five are those of earlier versions).
    u = rng.random(6)
    flip = bool(aug.get("flip", False)) and u[0] < 0.5
    deg = float(aug.get("rotate_degrees", 0.0))
    angle = (2 * u[1] - 1) * deg
    lo, hi = aug.get("scale_range", (1.0, 1.0))
    scale = lo + (hi - lo) * u[2]
    g_lo, g_hi = aug.get("gamma_range", (1.0, 1.0))
    if (g_lo, g_hi) != (1.0, 1.0):
      # x -> x^gamma, log-uniform gamma: a darker or brighter export window.
      img = img ** np.float32(math.exp(math.log(g_lo) + (math.log(g_hi) - math.log(g_lo)) * u[5]))
    j = float(aug.get("intensity_jitter", 0.0))
    if j > 0:
      # Before the warp, so that letterbox padding stays exactly 0.
      img = np.clip(img * (1 - j + 2 * j * u[3]) + (2 * u[4] - 1) * j, 0.0, 1.0)
  if mask.shape != image.shape:
    raise SliceError(f"image {image.shape} and mask {mask.shape} differ; rebuild the dataset")
  lab = mask if num_classes == 3 else (mask > 0).astype(np.uint8)
  out = warp(img, lab, size, flip=flip, angle=angle, scale=scale)
  if soft is None:
    return out
  if soft.shape != image.shape:
    raise SliceError(f"image {image.shape} and soft label {soft.shape} differ; give the map "
                     "the slice's size")
  warped, _ = warp(np.asarray(soft, np.float32), np.zeros(soft.shape, np.uint8), size, flip=flip,
                   angle=angle, scale=scale)
  return out + (warped,)


def warp(image: np.ndarray, mask: np.ndarray, size: int, *, flip: bool = False,
         angle: float = 0.0, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
  """Letterboxes (and flips/rotates/scales) a normalised slice and its mask in one warp.

  Args:
    image: (H, W) float32 in [0, 1].
    mask: (H, W) integer labels.
    size: output side S.
    flip, angle, scale: as in `warp_matrix`.

  Returns:
    (image (S, S) float32, mask (S, S) int32); outside the input both are 0.
  """
  if image.shape == (size, size) and not flip and angle == 0.0 and scale == 1.0:
    return np.ascontiguousarray(image, np.float32), mask.astype(np.int32)
  matrix, offset = warp_matrix(image.shape, size, flip=flip, angle=angle, scale=scale)
  out = ndimage.affine_transform(image.astype(np.float32, copy=False), matrix, offset,
                                 output_shape=(size, size), order=1, mode="constant", cval=0.0,
                                 prefilter=False)
  if mask.any():
    lab = ndimage.affine_transform(mask.astype(np.uint8, copy=False), matrix, offset,
                                   output_shape=(size, size), order=0, mode="constant", cval=0)
  else:
    # Most CT slices show no opacity; their warped mask is zeros anyway, and
    # skipping the warp saves ~40% of an augmented slice's cost.
    lab = np.zeros((size, size), np.uint8)
  return np.clip(out, 0.0, 1.0, out=out), lab.astype(np.int32)


def unwarp(x: np.ndarray, shape: tuple[int, int], *, order: int) -> np.ndarray:
  """Maps a model-grid (S, S) array back onto the (H, W) slice it was letterboxed from.

  The exact inverse of `warp` without augmentation.

  Args:
    x: (S, S) labels or probabilities on the model's grid.
    shape: (H, W) of the original slice.
    order: 0 (nearest: labels) or 1 (linear: probabilities, attention).

  Returns:
    (H, W) array of x's dtype.
  """
  size = x.shape[0]
  shape = tuple(int(s) for s in shape)
  if shape == (size, size):
    return x
  matrix, offset = warp_matrix(shape, size)
  inverse = np.linalg.inv(matrix)
  # The letterbox map is a zoom (diagonal); a 1-D matrix takes scipy's fast path.
  return ndimage.affine_transform(x, np.diag(inverse), -inverse @ offset, output_shape=shape,
                                  order=order, mode="nearest", prefilter=False)
