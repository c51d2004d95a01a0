"""Tests for scoat_jax.metrics on hand-drawn masks and brute-force references."""
import itertools

import jax
import numpy as np
import pytest

from scoat_jax.evaluation import metrics

KEYS = ("dsc", "sen", "ppv", "va", "rlp", "rlr")


def canvas(shape, *boxes):
  """A bool mask with the given boxes (tuples of (start, stop) per axis) set."""
  m = np.zeros(shape, bool)
  for box in boxes:
    m[tuple(slice(a, b) for a, b in box)] = True
  return m


def assert_metrics(result, **want):
  for k, v in want.items():
    assert result[k] == pytest.approx(v, abs=1e-12), k


# --- Pixel level, by hand. ---

def test_overlapping_squares_by_hand():
  b = canvas((10, 10), ((2, 8), (2, 6)))   # rows 2-7, cols 2-5: |B| = 24
  a = canvas((10, 10), ((0, 4), (0, 4)))   # rows 0-3, cols 0-3: |A| = 16
  # A∩B = rows 2-3 x cols 2-3 = 4. DSC = 8/40, SEN = 4/24, PPV = 4/16,
  # VA = 1 - 8/40. A's centre: the 4x4 square's EDT is 2 on its inner 2x2,
  # first in C order (1, 1), which is outside B: RLP = 0, RLR = 0.
  r = metrics.case_metrics(a, b)
  assert_metrics(r, dsc=0.2, sen=1 / 6, ppv=0.25, va=0.8, rlp=0.0, rlr=0.0,
                 pred_voxels=16, true_voxels=24, intersection_voxels=4,
                 n_pred_regions=1, n_true_regions=1)
  # Shifted by one: A = rows 1-4, cols 1-4, A∩B = rows 2-4 x cols 2-4 = 9.
  # Its centre (2, 2) lies in B: RLP = RLR = 1.
  a = canvas((10, 10), ((1, 5), (1, 5)))
  assert_metrics(metrics.case_metrics(a, b), dsc=18 / 40, sen=9 / 24, ppv=9 / 16, va=0.8,
                 rlp=1.0, rlr=1.0)
  # Integer 0/1 masks give the same numbers as bool masks.
  assert metrics.case_metrics(a.astype(np.uint8), b.astype(np.int32)) == metrics.case_metrics(a, b)


# --- Region level, by hand. ---

def ring_and_c():
  m = np.zeros((24, 24), bool)
  m[1:12, 1:12] = True
  m[4:9, 4:9] = False     # ring: 11x11 with a 5x5 hole, 3 thick; centroid (6, 6) in the hole
  m[13:22, 1:10] = True
  m[16:19, 4:10] = False  # C: 9x9 with a notch open to the right; centroid (17, 4.57) in the notch
  return m


def test_ring_and_c_centres_lie_inside_where_centroids_do_not():
  m = ring_and_c()
  labels, centres = metrics.region_centres(m)
  assert labels.max() == 2
  # Each band is 3 thick, so the EDT peaks at 2 along the bands' middle lines;
  # the first such pixel in C order is one in from the top-left corner:
  # ring (2, 2) (2 from the outside above and left, sqrt(8) from the hole),
  # C (14, 2) likewise.
  np.testing.assert_array_equal(centres, [[2, 2], [14, 2]])
  assert m[tuple(centres.T)].all()
  # A centroid rule would call both regions wrong: their centroids are not in them.
  for k in (1, 2):
    centroid = np.argwhere(labels == k).mean(axis=0)
    assert not m[tuple(np.round(centroid).astype(int))]
    assert not m[tuple(np.floor(centroid).astype(int))]
  np.testing.assert_allclose(np.argwhere(labels == 2).mean(axis=0), [17, 1 + 225 / 63])
  r = metrics.case_metrics(m, m)
  assert_metrics(r, dsc=1, rlp=1, rlr=1, n_pred_regions=2, n_true_regions=2)


def test_several_regions_some_found():
  b = canvas((20, 20), ((0, 5), (0, 5)), ((0, 5), (10, 15)), ((10, 13), (10, 13)))
  # T1 = rows 0-4 x cols 0-4 (25), T2 = rows 0-4 x cols 10-14 (25), T3 = 3x3 (9).
  a = canvas((20, 20),
             ((0, 3), (0, 3)),      # P1 3x3, centre (1, 1) in T1: correct
             ((4, 5), (4, 5)),      # P2 one pixel (4, 4), in T1 too: correct
             ((15, 18), (15, 18)),  # P3 3x3, centre (16, 16): no truth there
             ((3, 8), (10, 15)))    # P4 5x5 rows 3-7, centre (5, 12): below T2
  # RLP = 2 / 4. Only T1 holds a centre (twice): RLR = 1 / 3.
  # |A| = 9 + 1 + 9 + 25 = 44, |B| = 59, A∩B = 9 + 1 + 10 (P4 rows 3-4 of T2) = 20.
  r = metrics.case_metrics(a, b)
  assert_metrics(r, rlp=0.5, rlr=1 / 3, dsc=40 / 103, sen=20 / 59, ppv=20 / 44, va=88 / 103,
                 n_pred_regions=4, n_true_regions=3, n_correct_pred_regions=2,
                 n_found_true_regions=1)


def test_diagonal_voxels_are_one_region_in_2d_and_3d():
  a2 = np.eye(4, dtype=bool)        # touching only at corners: one 8-connected region
  assert metrics.label_regions(a2)[1] == 1
  a3 = np.zeros((4, 4, 4), bool)
  a3[0, 0, 0] = a3[1, 1, 1] = a3[2, 2, 2] = True  # corner-touching: one 26-connected region
  b3 = np.zeros_like(a3)
  b3[0, 0, 0] = True
  # One region whose voxels all have EDT 1: the tie goes to the lowest index
  # (0, 0, 0), which is in B. (6-connectivity would give 3 regions, RLP 1/3.)
  # |A| = 3, |B| = 1, A∩B = 1: DSC = 2/4, SEN = 1, PPV = 1/3, VA = 2/4.
  r = metrics.case_metrics(a3, b3)
  assert_metrics(r, n_pred_regions=1, n_true_regions=1, rlp=1, rlr=1,
                 dsc=0.5, sen=1, ppv=1 / 3, va=0.5)


def test_spacing_moves_the_centre():
  m = canvas((6, 10), ((2, 5), (3, 10)))  # 3 rows x 7 cols, touching the right border
  # Isotropic: EDT 2 on the middle row from col 1 in (the image border counts
  # as background, so col 9 has EDT 1): first is (3, 4).
  np.testing.assert_array_equal(metrics.region_centres(m)[1], [[3, 4]])
  # Columns 0.1 mm wide: every column distance (<= 0.4 mm) beats every row
  # distance (>= 1 mm), so the EDT is 0.1 * min(c + 1, 7 - c), peaking at the
  # middle column; the first row wins the tie: (2, 6).
  np.testing.assert_array_equal(metrics.region_centres(m, spacing=(1.0, 0.1))[1], [[2, 6]])


# --- Empty cases: the documented table. ---

@pytest.mark.parametrize("shape", [(8, 8), (4, 8, 8)])
def test_empty_combinations(shape):
  empty, full = np.zeros(shape, bool), np.zeros(shape, bool)
  full[(slice(1, 3),) * len(shape)] = True
  table = {
      (False, False): (1, 1, 1, 1, 1, 1),
      (True, False): (0, 1, 0, 0, 0, 1),
      (False, True): (0, 0, 1, 0, 1, 0),
  }
  for (has_a, has_b), want in table.items():
    r = metrics.case_metrics(full if has_a else empty, full if has_b else empty)
    assert tuple(r[k] for k in KEYS) == want, (has_a, has_b)
    assert all(np.isfinite(r[k]) for k in KEYS)
  assert metrics.hd95(empty, empty) == 0.0
  assert metrics.hd95(full, empty) == float("inf") == metrics.hd95(empty, full)


def test_bad_inputs():
  with pytest.raises(ValueError, match="same"):
    metrics.case_metrics(np.zeros((4, 4)), np.zeros((4, 5)))
  with pytest.raises(ValueError, match="2-D or 3-D"):
    metrics.case_metrics(np.zeros(4), np.zeros(4))
  with pytest.raises(ValueError, match="other than 0 and 1"):
    metrics.case_metrics(np.full((4, 4), 2), np.zeros((4, 4)))
  with pytest.raises(ValueError, match="spacing"):
    metrics.case_metrics(np.zeros((4, 4)), np.zeros((4, 4)), spacing=(1.0, 1.0, 1.0))
  with pytest.raises(ValueError, match="spacing"):
    metrics.hd95(np.ones((4, 4)), np.ones((4, 4)), spacing=(1.0, 0.0))


# --- Brute-force region reference on random masks. ---

def brute_centres(mask):
  """8/26-connected flood fill and an all-pairs EDT, in plain Python/NumPy."""
  labels = np.zeros(mask.shape, int)
  offsets = [d for d in itertools.product((-1, 0, 1), repeat=mask.ndim) if any(d)]
  n = 0
  for start in zip(*np.nonzero(mask)):
    if labels[start]:
      continue
    n += 1
    labels[start], stack = n, [start]
    while stack:
      p = stack.pop()
      for d in offsets:
        q = tuple(np.add(p, d))
        if all(0 <= q[i] < mask.shape[i] for i in range(mask.ndim)) and mask[q] and not labels[q]:
          labels[q] = n
          stack.append(q)
  padded = np.pad(labels, 1)
  background = np.argwhere(padded == 0)
  centres = []
  for k in range(1, n + 1):
    voxels = np.argwhere(padded == k)  # C order
    d2 = ((voxels[:, None, :] - background[None, :, :]) ** 2).sum(-1).min(axis=1)
    centres.append(voxels[np.argmax(d2)] - 1)  # integer d2: exact ties, first wins
  return labels, np.array(centres).reshape(n, mask.ndim)


@pytest.mark.parametrize("shape,seed", [((16, 16), 0), ((16, 16), 1), ((6, 7, 8), 2)])
def test_regions_match_brute_force(shape, seed):
  rng = np.random.default_rng(seed)
  a, b = rng.random(shape) < 0.35, rng.random(shape) < 0.35
  labels, centres = metrics.region_centres(a)
  ref_labels, ref_centres = brute_centres(a)
  np.testing.assert_array_equal(labels, ref_labels)  # both number regions by first voxel
  np.testing.assert_array_equal(centres, ref_centres)
  ref_b_labels, _ = brute_centres(b)
  hit = ref_b_labels[tuple(ref_centres.T)]
  r = metrics.case_metrics(a, b)
  assert r["rlp"] == pytest.approx(np.mean(hit > 0))
  assert r["rlr"] == pytest.approx(len(set(hit[hit > 0])) / ref_b_labels.max())


# --- HD95. ---

def test_hd95_shifted_squares_by_hand():
  a = canvas((10, 10), ((2, 5), (2, 5)))  # 3x3: surface = all but the centre
  b = canvas((10, 10), ((4, 7), (2, 5)))  # shifted 2 rows down
  # A -> B: A's bottom row lies on B's top row (0, x3); A's middle-row edges
  # are 1 row from it (x2); A's top row 2 rows (x3). B -> A is symmetric.
  # Pooled (16): six 0, four 1 row, six 2 rows; the 95th percentile (position
  # 14.25 of 0..15) is 2 rows = 4 mm with 2 mm rows, 2 px with unit spacing.
  assert metrics.hd95(a, b, spacing=(2.0, 1.0)) == pytest.approx(4.0)
  assert metrics.hd95(a, b) == pytest.approx(2.0)
  # Shifted along columns instead: 2 columns of 1 mm.
  b_cols = canvas((10, 10), ((2, 5), (4, 7)))
  assert metrics.hd95(a, b_cols, spacing=(2.0, 1.0)) == pytest.approx(2.0)
  assert metrics.hd95(a, a, spacing=(2.0, 1.0)) == 0.0


def test_hd95_ignores_a_5_percent_outlier():
  b = canvas((20, 20), ((1, 11), (1, 11)))     # 10x10: 36 surface pixels
  a = b.copy()
  a[18, 18] = True                             # one stray pixel, 8*sqrt(2) px from (10, 10)
  # Pooled: 36 + 1 from A, 36 from B; 72 zeros and one 8*sqrt(2): the 95th
  # percentile (position 68.4 of 0..72) is 0, while the maximum is not.
  assert metrics.hd95(a, b) == 0.0


def brute_hd95(a, b, spacing):
  def surface(m):
    p = np.pad(m, 1)
    inner = p.copy()
    for axis in range(m.ndim):
      for shift in (-1, 1):
        inner &= np.roll(p, shift, axis=axis)
    return np.argwhere((p & ~inner)[tuple(slice(1, -1) for _ in m.shape)]) * np.asarray(spacing)
  sa, sb = surface(a), surface(b)
  d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
  return np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95)


@pytest.mark.parametrize("shape,spacing,seed", [((20, 20), (1.0, 1.0), 0),
                                                ((18, 22), (2.5, 0.7), 1),
                                                ((6, 10, 12), (3.0, 0.8, 0.8), 2)])
def test_hd95_matches_brute_force(shape, spacing, seed):
  rng = np.random.default_rng(seed)
  a = np.zeros(shape, bool)
  b = np.zeros(shape, bool)
  a[tuple(slice(1, s - 3) for s in shape)] = True
  b[tuple(slice(3, s) for s in shape)] = True   # touches the far image border
  a &= rng.random(shape) < 0.9                  # ragged, with holes
  b |= rng.random(shape) < 0.05                 # and specks
  want = brute_hd95(a, b, spacing)
  assert metrics.hd95(a, b, spacing) == pytest.approx(want, rel=1e-9)
  assert metrics.hd95(b, a, spacing) == pytest.approx(want, rel=1e-9)  # symmetric


# --- Aggregation and the trainer's sums. ---

def test_aggregate_matches_numpy():
  rng = np.random.default_rng(3)
  values = rng.random((7, 2))
  per_case = [{"case_id": f"p{i}", "dsc": v[0], "hd95": v[1]} for i, v in enumerate(values)]
  per_case[2]["hd95"] = float("inf")
  out = metrics.aggregate(per_case)
  assert out["n"] == 7 and "case_id" not in out
  np.testing.assert_allclose([out["dsc"]["mean"], out["dsc"]["std"], out["dsc"]["median"]],
                             [values[:, 0].mean(), values[:, 0].std(), np.median(values[:, 0])])
  finite = np.delete(values[:, 1], 2)
  assert out["hd95"]["n"] == 6 and out["hd95"]["n_inf"] == 1 and out["hd95"]["n_nan"] == 0
  np.testing.assert_allclose([out["hd95"]["mean"], out["hd95"]["std"], out["hd95"]["median"]],
                             [finite.mean(), finite.std(), np.median(finite)])
  sample = metrics.aggregate(per_case, ddof=1)
  assert sample["dsc"]["std"] == pytest.approx(values[:, 0].std(ddof=1))
  one = metrics.aggregate([{"hd95": float("inf"), "dsc": 0.5}])
  assert np.isnan(one["hd95"]["mean"]) and one["hd95"]["n"] == 0 and one["dsc"]["std"] == 0.0
  with pytest.raises(ValueError, match="same metrics"):
    metrics.aggregate([{"dsc": 1.0}, {"sen": 1.0}])
  with pytest.raises(ValueError, match="empty"):
    metrics.aggregate([])


def test_confusion_sums():
  rng = np.random.default_rng(4)
  pred, truth = rng.random((3, 8, 8)) < 0.5, rng.random((3, 8, 8)) < 0.5
  tp, fp, fn = jax.jit(metrics.confusion_sums)(pred, truth)
  np.testing.assert_array_equal(tp, (pred & truth).sum(axis=(1, 2)))
  np.testing.assert_array_equal(fp, (pred & ~truth).sum(axis=(1, 2)))
  np.testing.assert_array_equal(fn, (~pred & truth).sum(axis=(1, 2)))
  with pytest.raises(ValueError, match="threshold"):
    metrics.confusion_sums(np.zeros((2, 4, 4), np.float32), truth[:2, :4, :4])
  with pytest.raises(ValueError, match="same shape"):
    metrics.confusion_sums(pred, truth[:2])
