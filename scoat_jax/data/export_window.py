"""Which HU window produced a set of 8-bit CT slice exports, estimated from their grey levels.

A model trained on 8-bit exports (COVID-SemiSeg's JPEGs) learnt grey levels,
not Hounsfield units. To segment a CT volume in HU it must see the volume as
those exports would show it: windowed by the same (lo, hi) and quantised to
0..255 (`intensity.hu_to_uint8`). The exports carry no window, so it is
estimated here from the anatomy every chest slice shows, tissue by tissue:

* lung parenchyma: the darkest mode of the slice's histogram (grey < 128);
* soft tissue (heart, vessels, muscle): the brightest mode below saturation
  (grey 128..254);
* fat: a mode 12..45 grey levels below soft tissue, where the slice shows
  one (chest-wall and mediastinal fat);

each mapped to its HU as measured on the real chest CT slabs of LIDC-IDRI
(modes over their lung masks and soft tissue: lung -893/-893/-883, fat
-109/-105/-105, soft tissue +53/+51/+46 HU), rounded to `TISSUE_HU`. A
line grey = a * HU + b is fitted per slice by least squares (two or three
tissues), giving that slice's window lo = -b / a, hi = (255 - b) / a; the
estimate is the median over slices, with their quartiles as its spread.
Two more tissues check it: air (about -1000 HU, in the trachea and outside
the body) should fall near the darkest grey levels, and bone (cortical
+700 HU and more) should saturate at 255 when hi lies below it;
`estimate` reports both.

On the 50 COVID-SemiSeg training slices this gives about -1130..+275 HU
(docs/export_window.md), where the fixed default `intensity.HU_WINDOW` is
-1250..+250: under the default, lung at -890 HU reaches the network as grey
61 instead of the 44 its exports show, halfway to ground glass.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
from scipy import ndimage

TISSUE_HU = {"lung": -890.0, "fat": -105.0, "soft_tissue": 50.0}
AIR_HU = -1000.0
CORTICAL_BONE_HU = 700.0
_MIN_CLASS_SHARE = 0.05  # a slice needs this share of dark and of bright pixels
_FAT_BELOW = (12, 45)    # grey levels between the fat and the soft-tissue mode
_FAT_MIN_HEIGHT = 0.15   # a fat mode at least this high relative to soft tissue's


class ExportWindowError(ValueError):
  """No window can be estimated (no slice shows both lung and soft tissue)."""


@dataclasses.dataclass(frozen=True)
class SliceFit:
  """One slice's tissue modes (grey levels) and the window its line gives."""
  lung: int
  soft_tissue: int
  fat: int | None
  window: tuple[float, float]


def _modes(image: np.ndarray) -> tuple[int, int, int | None] | None:
  """(lung, soft tissue, fat or None) grey modes of one slice, or None when it lacks them."""
  levels = np.asarray(image)
  if levels.dtype != np.uint8:
    levels = np.clip(np.rint(levels), 0, 255).astype(np.uint8)
  hist = np.bincount(levels.ravel(), minlength=256).astype(np.float64)
  hist /= max(hist.sum(), 1.0)
  if hist[:128].sum() < _MIN_CLASS_SHARE or hist[128:255].sum() < _MIN_CLASS_SHARE:
    return None
  inner = hist.copy()
  inner[[0, 255]] = 0.0  # clipped air and bone pile up there
  smooth = ndimage.gaussian_filter1d(inner, 2.0)
  lung = int(np.argmax(smooth[1:128])) + 1
  soft = int(np.argmax(smooth[128:255])) + 128
  lo, hi = max(soft - _FAT_BELOW[1], 129), soft - _FAT_BELOW[0]
  peaks = [g for g in range(lo, hi + 1)
           if smooth[g] > smooth[g - 1] and smooth[g] >= smooth[g + 1]
           and smooth[g] > _FAT_MIN_HEIGHT * smooth[soft]]
  fat = max(peaks, key=lambda g: smooth[g]) if peaks else None
  return lung, soft, fat


def fit_slice(image: np.ndarray) -> SliceFit | None:
  """The window of one 8-bit slice (see the module docstring), or None without both modes."""
  modes = _modes(image)
  if modes is None:
    return None
  lung, soft, fat = modes
  grey = [lung, soft] + ([fat] if fat is not None else [])
  hu = [TISSUE_HU["lung"], TISSUE_HU["soft_tissue"]] + ([TISSUE_HU["fat"]] if fat is not None
                                                        else [])
  a, b = np.polyfit(np.asarray(hu), np.asarray(grey, np.float64), 1)
  if not a > 0:
    return None
  return SliceFit(lung, soft, fat, (float(-b / a), float((255.0 - b) / a)))


class Estimator:
  """`estimate` one slice at a time (a dataset build feeds it as it writes the slices)."""

  def __init__(self):
    self.fits: list[SliceFit] = []
    self.darkest: list[float] = []
    self.saturated: list[float] = []
    self.seen = 0

  def add(self, image: np.ndarray) -> None:
    self.seen += 1
    image = np.asarray(image)
    fit = fit_slice(image)
    if fit is not None:
      self.fits.append(fit)
      self.darkest.append(float(np.percentile(image, 0.5)))
      self.saturated.append(float(np.mean(image >= 255)))

  def result(self) -> dict:
    """See `estimate`."""
    fits = self.fits
    if not fits:
      raise ExportWindowError(f"none of {self.seen} slices shows both lung (dark) and soft "
                              "tissue (bright) grey levels; the HU window of these exports "
                              "cannot be estimated")
    lo = np.array([f.window[0] for f in fits])
    hi = np.array([f.window[1] for f in fits])
    window = [round(float(np.median(lo)), 1), round(float(np.median(hi)), 1)]
    air_grey = 255.0 * (AIR_HU - window[0]) / (window[1] - window[0])
    fats = [f.fat for f in fits if f.fat is not None]
    return {
        "window_hu": window,
        "quartiles_hu": [[round(float(q), 1) for q in np.percentile(v, [25, 75])]
                         for v in (lo, hi)],
        "slices": len(fits), "slices_seen": self.seen, "with_fat": len(fats),
        "tissue_hu": dict(TISSUE_HU),
        "median_grey": {"lung": float(np.median([f.lung for f in fits])),
                        "soft_tissue": float(np.median([f.soft_tissue for f in fits])),
                        "fat": float(np.median(fats)) if fats else None},
        "checks": {"air_grey": round(float(np.clip(air_grey, 0, 255)), 1),
                   "darkest_grey": float(np.median(self.darkest)),
                   "saturated_share": round(float(np.median(self.saturated)), 4),
                   "bone_saturates": bool(window[1] < CORTICAL_BONE_HU)},
        "method": "per-slice least squares of lung, fat and soft-tissue grey modes against "
                  "their HU; median over slices (scoat_jax.data.export_window)",
    }


def estimate(images: Iterable[np.ndarray]) -> dict:
  """The HU window of a set of 8-bit exports: median over its slices' fits.

  Args:
    images: 2-D 8-bit slices (uint8, or values in 0..255).

  Returns:
    JSON-ready {'window_hu': [lo, hi] (medians), 'quartiles_hu': [[lo q1, lo
    q3], [hi q1, hi q3]], 'slices': slices fitted, 'slices_seen',
    'with_fat': slices whose fat mode took part, 'tissue_hu' (the HU used),
    'median_grey': {tissue: median mode}, 'checks': {'air_grey' (where the
    window puts -1000 HU), 'darkest_grey' (median over slices of the 0.5th
    percentile), 'saturated_share' (median share of pixels at 255),
    'bone_saturates' (hi below cortical bone)}, 'method'}.

  Raises:
    ExportWindowError: no slice shows both a lung and a soft-tissue mode.
  """
  estimator = Estimator()
  for image in images:
    estimator.add(image)
  return estimator.result()
