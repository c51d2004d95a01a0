"""Tests of the classical lung mask (data.lung_mask) on phantoms and hand-made volumes."""
import numpy as np
import pytest

from scoat_jax.data import lung_mask as lm
from scoat_jax.data import phantom


def _dice(a, b):
  return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


# Seed 0, time point 1: patients with GGO and consolidation, several subpleural.
@pytest.mark.parametrize("patient", [0, 2, 3])
def test_phantom_lungs_dice_volume_and_lesion_coverage(patient):
  scan = phantom.generate_scan(0, patient, 1)
  mask = lm.lung_mask(scan.hu, scan.geometry.spacing)
  dice = _dice(mask, scan.lung)
  volume_ratio = mask.sum() / scan.lung.sum()
  lesions = scan.label > 0
  coverage = np.count_nonzero(lesions & mask) / np.count_nonzero(lesions)
  print(
      f"\npatient {patient}: dice {dice:.4f}, volume ratio {volume_ratio:.4f}, "
      f"lesions inside {coverage:.4f}"
  )
  assert dice >= 0.98
  assert abs(volume_ratio - 1) <= 0.03
  assert coverage >= 0.98
  assert (scan.label == 2).any()


def test_airways_removed():
  scan = phantom.generate_scan(0, 1, 0)
  top = slice(scan.hu.shape[0] - 3, None)  # above the lung apices: trachea only
  assert not scan.lung[top].any() and (scan.hu[top] < -900).any()
  mask = lm.lung_mask(scan.hu, scan.geometry.spacing)
  kept = lm.lung_mask(scan.hu, scan.geometry.spacing, remove_airways=False)
  assert not mask[top].any()
  assert kept[top].any()  # the removal step is what excludes them
  assert np.count_nonzero(mask & ~scan.lung) < 0.2 * np.count_nonzero(kept & ~scan.lung)


def _hand_made(consolidation_at_pleura: bool, join: bool = False):
  """Two flat-sided 'lungs' (superellipses) in a soft-tissue cylinder, a dense lesion in one.

  The pleural lesion is 24 px wide along the lateral chest wall, wider than
  the in-plane closing (2 x 10 mm at 1 mm pixels) can bridge.
  """
  nz, ny, nx = 12, 64, 80
  z, y, x = np.mgrid[:nz, :ny, :nx].astype(np.float32)
  hu = np.full((nz, ny, nx), -1000.0, np.float32)
  hu[((x - 40) / 38)**2 + ((y - 32) / 30)**2 <= 1] = 40.0
  height = 1 - ((z - 6) / 6.5)**2
  right = ((x - 22) / 13)**4 + ((y - 32) / 20)**4 <= height
  left = ((x - 58) / 13)**4 + ((y - 32) / 20)**4 <= height
  lungs = right | left
  if join:
    lungs |= (np.abs(y - 32) < 2) & (x > 30) & (x < 50) & (np.abs(z - 6) < 2)
  hu[lungs] = -850.0
  if consolidation_at_pleura:
    lesion = lungs & (((x - 12) / 7)**2 + ((y - 32) / 12)**2 + ((z - 6) / 2.5)**2 <= 1)
  else:
    lesion = lungs & (((x - 22) / 5)**2 + ((y - 32) / 5)**2 + ((z - 6) / 2.5)**2 <= 1)
  hu[lesion] = 20.0
  return hu, lungs, lesion


@pytest.mark.parametrize("at_pleura", [False, True])
def test_hand_made_dense_lesion_inside_mask(at_pleura):
  hu, lungs, lesion = _hand_made(at_pleura)
  assert lesion.sum() > 100
  mask = lm.lung_mask(hu, (1.0, 1.0, 2.0))
  assert np.count_nonzero(lesion & mask) >= 0.98 * lesion.sum()
  assert _dice(mask, lungs) >= 0.98
  if at_pleura:
    # Closing + hole filling alone miss most of it; each further step recovers
    # it (the dents step up to the convex cap beyond the hull, one pixel here).
    neither = lm.lung_mask(hu, (1.0, 1.0, 2.0), fill_costal_dents=False, z_closing_mm=0)
    dents_only = lm.lung_mask(hu, (1.0, 1.0, 2.0), z_closing_mm=0)
    z_only = lm.lung_mask(hu, (1.0, 1.0, 2.0), fill_costal_dents=False)
    assert np.count_nonzero(lesion & neither) < 0.5 * lesion.sum()
    assert np.count_nonzero(lesion & dents_only) >= 0.9 * lesion.sum()
    assert np.count_nonzero(lesion & z_only) >= 0.98 * lesion.sum()


def test_joined_lungs_kept_whole():
  hu, lungs, _ = _hand_made(False, join=True)
  mask = lm.lung_mask(hu, (1.0, 1.0, 2.0))
  assert _dice(mask, lungs) >= 0.97
  assert mask[:, :, :40].any() and mask[:, :, 40:].any()


def test_small_far_component_dropped():
  hu, lungs, _ = _hand_made(False)
  hu[5:7, 50:53, 38:42] = -900.0  # a few ml of gas (e.g. bowel), not lung
  mask = lm.lung_mask(hu, (1.0, 1.0, 2.0))
  assert not mask[5:7, 50:53, 38:42].any()


def test_no_lungs_and_bad_inputs():
  hu = np.full((6, 32, 32), -1000.0)
  hu[:, 4:28, 4:28] = 40.0
  assert not lm.lung_mask(hu, (1.0, 1.0, 1.0)).any()
  with pytest.raises(lm.LungMaskError, match="3-D"):
    lm.lung_mask(hu[0], (1.0, 1.0, 1.0))
  with pytest.raises(lm.LungMaskError, match="spacing"):
    lm.lung_mask(hu, (1.0, 0.0, 1.0))
  with pytest.raises(lm.LungMaskError, match="spacing"):
    lm.lung_mask(hu, (1.0, 1.0))
