"""Whether a volume's values are CT in Hounsfield units (`check_hu`; `ct_io.read_ct` calls it).

A wrong RescaleSlope or RescaleIntercept, a BitsStored that wraps the stored
values, or a volume scaled by 1000 reads as numbers all the same, and the lung
mask, the HU window and every volume after them would be wrong without a word.
CT in HU is pinned at two points: air (outside the body and in the lungs) at
about -1000 HU and soft tissue near 0-60 HU (fat about -100, bone above 300).
What is refused:

- values all in 0..255: an 8-bit windowed export, not HU;
- a highest value above 32767 HU (no CT stores more; HU x 1000, a wrong slope);
- more than `FAR_BELOW_SHARE` of the voxels below `FAR_BELOW_AIR_HU`, apart
  from one padding value (scanners fill the corners outside the reconstructed
  circle with one value such as -2000, -2048 or -3024): air is offset or
  scaled (a doubled intercept, HU x 1000);
- no air: fewer than `AIR_SHARE` of the voxels between -1200 and -900 HU;
- nothing at or above 0 HU (water): no soft tissue or bone (a slope below 1,
  values wrapped by a wrong BitsStored);
- a body (the voxels above -500 HU) whose median lies outside `BODY_MEDIAN_HU`:
  soft tissue is not where HU put it (a slope or intercept off).

The statistics are taken on up to `SAMPLE_VOXELS` voxels spread evenly over the
volume (all of them for a smaller one); the extremes on every voxel.
"""
from __future__ import annotations

import numpy as np

from scoat_jax.data.geometry import CTError

MAX_HU = 32767.0
FAR_BELOW_AIR_HU = -1200.0
FAR_BELOW_SHARE = 0.02
AIR_HU = (-1200.0, -900.0)
AIR_SHARE = 0.001
BODY_FROM_HU = -500.0
BODY_MEDIAN_HU = (-250.0, 300.0)
SAMPLE_VOXELS = 1 << 22
_FIX = "apply the right RescaleSlope/Intercept or give the scan in Hounsfield units"


def check_finite(voxels: np.ndarray, path, order_note: str = "") -> None:
  """Raises CTError naming how many voxels are NaN or Inf and where the first one is."""
  bad = ~np.isfinite(voxels)
  if bad.any():
    first = tuple(int(v) for v in np.unravel_index(int(np.argmax(bad)), bad.shape))
    raise CTError(f"{path}: {int(bad.sum())} voxel(s) are NaN or infinite (the first at "
                  f"(z, y, x) = {first}{order_note}), a corrupt export; export the scan again.")


def check_hu(hu: np.ndarray, path) -> None:
  """Raises CTError unless `hu` can be CT in Hounsfield units (see the module docstring).

  Args:
    hu: the voxel values.
    path: the source named in the message.
  """
  hu = np.asarray(hu)
  if hu.dtype.kind == "f":
    check_finite(hu, path)
  lo, hi = float(hu.min()), float(hu.max())
  if lo >= 0.0 and hi <= 255.0:
    raise CTError(
        f"{path}: all values lie in 0..255 (min {lo:g}, max {hi:g}), like an 8-bit windowed image; "
        "8-bit exports are not HU: read the original DICOM/NIfTI in Hounsfield units "
        "(or use source='uint8' for 2-D 8-bit slices)")
  if hi > MAX_HU:
    raise CTError(f"{path}: highest value {hi:g} is beyond any CT in HU (at most {MAX_HU:g}), "
                  f"so the values are scaled (HU x 1000? a wrong RescaleSlope); {_FIX}")
  flat = hu.reshape(-1)
  sample = flat[::max(1, -(-flat.size // SAMPLE_VOXELS))].astype(np.float32, copy=False)
  padding = lo if lo < FAR_BELOW_AIR_HU else None
  real = sample if padding is None else sample[sample != padding]
  if real.size == 0:
    raise CTError(f"{path}: every voxel holds {lo:g}; not a CT scan: {_FIX}")
  far = float(np.count_nonzero(real < FAR_BELOW_AIR_HU)) / real.size
  if far > FAR_BELOW_SHARE:
    lowest = float(real.min())
    raise CTError(
        f"{path}: {100 * far:.1f}% of the voxels lie below {FAR_BELOW_AIR_HU:g} HU (down to "
        f"{lowest:g}; padding {'none' if padding is None else f'{padding:g}'} aside), but air is "
        "near -1000 HU: the values are offset or scaled (a doubled RescaleIntercept? HU x 1000?) "
        f"and cannot be CT in HU; {_FIX}")
  air = float(np.count_nonzero((real >= AIR_HU[0]) & (real <= AIR_HU[1]))) / real.size
  if air < AIR_SHARE:
    raise CTError(
        f"{path}: no air: {100 * air:.2g}% of the voxels lie within {AIR_HU[0]:g}..{AIR_HU[1]:g} "
        f"HU (lowest value {float(real.min()):g}, padding aside), but CT of a body holds air "
        f"(about -1000 HU) outside it and in the lungs, so these cannot be CT HU; {_FIX} "
        "(a chest CT)")
  if hi < 0.0:
    raise CTError(
        f"{path}: highest value {hi:g} is below 0 HU (water): no soft tissue or bone, so these "
        "cannot be CT HU (a RescaleSlope below 1? values wrapped by a wrong BitsStored?); "
        f"{_FIX}")
  body = real[real > BODY_FROM_HU]
  if body.size:
    median = float(np.median(body))
    if not BODY_MEDIAN_HU[0] <= median <= BODY_MEDIAN_HU[1]:
      raise CTError(
          f"{path}: the body (voxels above {BODY_FROM_HU:g} HU) has median {median:g} HU, but "
          f"soft tissue lies near 0-60 HU (fat -100): the values are scaled or offset (a wrong "
          f"RescaleSlope or Intercept) and cannot be CT HU; {_FIX}")
