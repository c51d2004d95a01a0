"""Tests of the classical lung mask (data.lung_mask) on phantoms and hand-made volumes."""
import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy import spatial

from scoat_jax.data import lung_mask as lm
from scoat_jax.data import morphology
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


# The fast building blocks against the whole-array SciPy formulations they replace.

def _blobs(rng, shape, p=0.03, grow=2):
  """A random mask of a few blobs (seeds grown by a few dilations)."""
  seeds = rng.random(shape) < p
  return ndi.binary_dilation(seeds, iterations=grow)


@pytest.mark.parametrize("spacing_yx,radius", [((0.7, 0.7), 10.0), ((0.5, 1.0), 10.0),
                                               ((1.0, 1.0), 3.0), ((1.3, 0.6), 4.0)])
def test_dilate_disc_matches_distance_transform(spacing_yx, radius):
  rng = np.random.default_rng(0)
  for _ in range(5):
    mask = rng.random((41, 37)) < 0.01
    ref = ndi.distance_transform_edt(~mask, sampling=spacing_yx) <= radius
    np.testing.assert_array_equal(morphology.dilate_disc(mask, spacing_yx, radius), ref)


def test_close_and_fill_matches_edt_closing_and_fill_holes():
  rng = np.random.default_rng(1)
  sp, r = (0.8, 0.6), 4.0
  part = np.stack([_blobs(rng, (40, 44), 0.01, 3) for _ in range(4)])
  part[2] = False
  pad = int(r / min(sp)) + 2
  ref = np.zeros_like(part)
  for k in range(part.shape[0]):
    padded = np.pad(part[k], pad)
    dil = ndi.distance_transform_edt(~padded, sampling=sp) <= r
    closed = ndi.distance_transform_edt(dil, sampling=sp) > r
    ref[k] = ndi.binary_fill_holes(closed)[pad:-pad, pad:-pad] if padded.any() else False
  np.testing.assert_array_equal(lm._close_and_fill(part, sp, r), ref)


@pytest.mark.parametrize("r", [1, 3, 10])
def test_close_z_matches_binary_closing_with_edge_padding(r):
  rng = np.random.default_rng(r)
  mask = rng.random((9, 6, 7)) < 0.3
  padded = np.pad(mask, ((r, r), (0, 0), (0, 0)), mode="edge")
  closed = ndi.binary_closing(padded, structure=np.ones((2 * r + 1, 1, 1), bool))[r:-r]
  np.testing.assert_array_equal(lm._close_z(mask, r), closed & ~mask)


def test_hull_inside_matches_every_pixel_test():
  rng = np.random.default_rng(2)
  shapes = [rng.integers(0, 30, (12, 2)), np.array([[0, 0], [0, 20], [9, 0], [9, 20]]),
            rng.integers(0, 30, (40, 2))]
  for points in shapes:
    eq = spatial.ConvexHull(points.astype(np.float64)).equations
    h, w = points[:, 0].max() + 3, points[:, 1].max() + 3
    gy, gx = np.mgrid[-1:h - 1, -1:w - 1]
    for limit in (0.5, -3.0):
      ref = np.all(eq[:, 0, None, None] * gy + eq[:, 1, None, None] * gx
                   + eq[:, 2, None, None] <= limit, axis=0)
      np.testing.assert_array_equal(lm._hull_inside(eq, h, w, limit), ref)


def test_inner_air_matches_labelling_the_whole_volume():
  rng = np.random.default_rng(3)
  for _ in range(4):
    hu = np.where(_blobs(rng, (8, 30, 34), 0.02, 2), -800, 40).astype(np.int16)
    hu[:, :, :3] = -1000  # outside air on one side, in reach of some blobs
    air = hu < lm.LUNG_THRESHOLD_HU
    labels, _ = ndi.label(air)
    border = np.unique(np.concatenate([labels[:, [0, -1], :].ravel(),
                                       labels[:, :, [0, -1]].ravel()]))
    ref = air & ~np.isin(labels, border)
    got = np.zeros_like(ref)
    found = lm._inner_air(hu, lm.LUNG_THRESHOLD_HU)
    if found is not None:
      got[found[1]] = found[0]
    np.testing.assert_array_equal(got, ref)


def test_same_mask_for_int16_and_float32_hu():
  scan = phantom.generate_scan(0, 2, 1)
  a = lm.lung_mask(scan.hu, scan.geometry.spacing)
  b = lm.lung_mask(scan.hu.astype(np.float32), scan.geometry.spacing)
  np.testing.assert_array_equal(a, b)


def test_lung_extent():
  lung = np.zeros((10, 4, 4), bool)
  lung[3:6, 1, 1] = True
  assert lm.lung_extent(lung, (1.0, 1.0, 2.0), 0.0) == (3, 6)
  assert lm.lung_extent(lung, (1.0, 1.0, 2.0), 3.0) == (1, 8)     # 1.5 slices -> 2
  assert lm.lung_extent(lung, (1.0, 1.0, 2.0), 4.0) == (1, 8)     # exactly 2 slices
  assert lm.lung_extent(lung, (1.0, 1.0, 0.1), 0.3) == (0, 9)     # 3 slices, in floating point
  assert lm.lung_extent(lung, (1.0, 1.0, 2.0), 100.0) == (0, 10)  # clipped to the volume
  assert lm.lung_extent(lung.astype(np.uint8), (1.0, 1.0, 2.0), 2.0) == (2, 7)
  assert lm.lung_extent(np.zeros((5, 2, 2), bool), (1.0, 1.0, 1.0), 10.0) == (0, 0)
  with pytest.raises(lm.LungMaskError, match="margin_mm"):
    lm.lung_extent(lung, (1.0, 1.0, 2.0), -1.0)
  with pytest.raises(lm.LungMaskError, match="spacing"):
    lm.lung_extent(lung, (1.0, 2.0), 1.0)
  with pytest.raises(lm.LungMaskError, match="3-D"):
    lm.lung_extent(lung[0], (1.0, 1.0, 1.0), 1.0)
