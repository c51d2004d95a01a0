"""Intensity normalisation: the one place that maps raw voxels to network input.

Two kinds of source exist in this project:
- 'hu': CT in Hounsfield units (NIfTI/DICOM volumes, the phantom). Clipped to a
  window and scaled to [0, 1]. SCOAT-Net does not state its window; ours is
  HU_WINDOW = [-1250, 250], which spans air to soft tissue and keeps the whole
  range of ground-glass (about -750..-300 HU) and consolidation (about
  -100..+50 HU) well inside (docs/design.md marks it as our choice).
- 'uint8': 8-bit slices already windowed by whoever exported them (e.g.
  COVID-SemiSeg JPEGs). Their window is unknown and differs from slice to
  slice, so one of UINT8_MODES maps them:
  'scale' divides by 255 (the grey values as exported);
  'equalize' replaces every grey value by its mid-rank in the slice's own
  histogram, (#darker + #equal / 2) / #pixels. Any strictly increasing change
  of the export window (brighter, darker, another gamma) gives the same
  equalised slice, so slices exported with different windows reach the
  network alike (docs/results_semiseg.md measures both).

Training and inference must call `normalize` with the same source, window and
8-bit mode (models store them in their config: data.hu_window,
data.uint8_normalization).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HU_WINDOW = (-1250.0, 250.0)
SOURCES = ("hu", "uint8")
UINT8_MODES = ("scale", "equalize")


class IntensityError(ValueError):
  """A bad normalisation request (unknown source, bad window, out-of-range 8-bit data)."""


def _check_window(window: Sequence[float]) -> tuple[float, float]:
  try:
    lo, hi = (float(v) for v in window)
  except (TypeError, ValueError):
    raise IntensityError(
        f"window={window!r} must be two numbers (lo, hi) in HU, e.g. {HU_WINDOW}") from None
  if not (np.isfinite(lo) and np.isfinite(hi)) or lo >= hi:
    raise IntensityError(f"window={window!r} needs finite lo < hi in HU; e.g. {HU_WINDOW}")
  return lo, hi


def window_hu(hu, window: Sequence[float] = HU_WINDOW) -> np.ndarray:
  """Clips HU to [lo, hi] and maps it linearly to [0, 1].

  Args:
    hu: array of HU values (any shape, any real dtype).
    window: (lo, hi) in HU with lo < hi; lo maps to 0, hi to 1.

  Returns:
    float32 array of the same shape with values in [0, 1].
  """
  lo, hi = _check_window(window)
  x = np.asarray(hu, dtype=np.float32)
  # Clipping first keeps (x - lo) / (hi - lo) within [0, 1] exactly in float32.
  return (np.clip(x, np.float32(lo), np.float32(hi)) - np.float32(lo)) / np.float32(hi - lo)


def hu_to_uint8(hu, window: Sequence[float]) -> np.ndarray:
  """CT in HU as an 8-bit export of it would be: windowed to [lo, hi], rounded to 0..255.

  How a model trained on 8-bit exports reads a volume in HU: with the
  window its exports were made with (`data.export_window`), then normalised
  as its training slices were (`normalize(..., 'uint8', uint8_mode=...)`).

  Args:
    hu: array of HU values.
    window: (lo, hi) in HU; lo maps to 0, hi to 255.

  Returns:
    uint8 array of the same shape.
  """
  return np.rint(window_hu(hu, window) * np.float32(255.0)).astype(np.uint8)


def _check_uint8(img) -> np.ndarray:
  arr = np.asarray(img)
  if arr.dtype != np.uint8 and arr.size:
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if not (0.0 <= lo and hi <= 255.0):
      raise IntensityError(f"source='uint8' but values span {lo:g}..{hi:g}, outside 0..255; "
                           "for CT in Hounsfield units use source='hu'")
  return arr


def scale_uint8(img) -> np.ndarray:
  """Maps 8-bit grey values 0..255 to [0, 1] (divides by 255).

  Args:
    img: uint8 array, or a numeric array whose values lie in 0..255.

  Returns:
    float32 array of the same shape with values in [0, 1].

  Raises:
    IntensityError: non-uint8 data with values outside 0..255 (e.g. HU).
  """
  return _check_uint8(img).astype(np.float32) / np.float32(255.0)


def equalize_uint8(img) -> np.ndarray:
  """Histogram equalisation of one 8-bit slice: each grey value -> its mid-rank in (0, 1).

  v -> (#pixels darker than v + #pixels equal to v / 2) / #pixels, so a
  constant slice maps to 0.5 and the result does not change under any
  strictly increasing remapping of the grey values (another export window).

  Args:
    img: uint8 array, or a numeric array whose values lie in 0..255 (rounded
      to the nearest grey level).

  Returns:
    float32 array of the same shape with values in (0, 1).

  Raises:
    IntensityError: values outside 0..255 (e.g. HU).
  """
  arr = _check_uint8(img)
  if not arr.size:
    return np.zeros(arr.shape, np.float32)
  levels = arr if arr.dtype == np.uint8 else np.rint(arr).astype(np.uint8)
  counts = np.bincount(levels.ravel(), minlength=256).astype(np.float64)
  mid_rank = (np.cumsum(counts) - counts / 2) / levels.size
  return mid_rank.astype(np.float32)[levels]


def check_uint8_mode(mode: str) -> str:
  if mode not in UINT8_MODES:
    raise IntensityError(f"uint8_normalization={mode!r} is unknown; use one of {UINT8_MODES} "
                         "(scale: grey/255; equalize: the slice's own histogram)")
  return mode


def normalize(image, source: str, window: Sequence[float] = HU_WINDOW,
              uint8_mode: str = "scale") -> np.ndarray:
  """Normalises an image to float32 in [0, 1] according to its source.

  Args:
    image: array (any shape): HU for source='hu', 0..255 for source='uint8'.
      An 'equalize'd image is one slice (its histogram is the whole array's).
    source: 'hu' or 'uint8'.
    window: HU window (lo, hi) for source='hu'; ignored for 'uint8' but still
      validated, so a bad config fails whichever data is used.
    uint8_mode: one of UINT8_MODES for source='uint8'; validated, ignored for 'hu'.

  Returns:
    float32 array in [0, 1], same shape as image.

  Raises:
    IntensityError: unknown source or mode, bad window, or 8-bit data out of range.
  """
  _check_window(window)
  check_uint8_mode(uint8_mode)
  if source == "hu":
    return window_hu(image, window)
  if source == "uint8":
    return scale_uint8(image) if uint8_mode == "scale" else equalize_uint8(image)
  raise IntensityError(f"source={source!r} is unknown; use one of {SOURCES} "
                       "('hu' for Hounsfield units, 'uint8' for 8-bit windowed slices)")
