"""Slice preparation shared by training and inference: the letterbox warp with
flip, rotation and scale, intensity normalisation, and the inverse warp."""
import numpy as np
import pytest

from scoat_jax.data import preprocess


def test_warp_letterbox_flip_rotate_exact():
  rng = np.random.default_rng(0)
  img = rng.random((8, 4)).astype(np.float32)
  lab = rng.integers(0, 3, (8, 4))
  # Letterbox a tall 8x4 slice into 8x8: centred, two zero columns each side.
  out, m = preprocess.warp(img, lab, 8)
  assert np.array_equal(out[:, 2:6], img) and not out[:, :2].any() and not out[:, 6:].any()
  assert np.array_equal(m[:, 2:6], lab) and not m[:, :2].any() and m.dtype == np.int32
  sq, sq_lab = rng.random((6, 6)).astype(np.float32), rng.integers(0, 3, (6, 6))
  out, m = preprocess.warp(sq, sq_lab, 6, flip=True)
  np.testing.assert_allclose(out, sq[:, ::-1], atol=1e-6)
  assert np.array_equal(m, sq_lab[:, ::-1])
  # +90 degrees turns the displayed slice counter-clockwise: out[r, c] = in[c, 5 - r].
  out, m = preprocess.warp(sq, sq_lab, 6, angle=90.0)
  np.testing.assert_allclose(out, np.rot90(sq, k=1), atol=1e-5)
  assert np.array_equal(m, np.rot90(sq_lab, k=1))
  # Zoom x2 about the centre: output pixel 1.5 +- 2k samples input 2.5 +- k.
  ramp = np.tile(np.arange(6, dtype=np.float32) / 5, (6, 1))
  out, _ = preprocess.warp(ramp, np.zeros((6, 6), int), 6, scale=2.0)
  np.testing.assert_allclose(out[0], (2.5 + (np.arange(6) - 2.5) / 2) / 5, atol=1e-6)


def test_rotated_masks_stay_labels_and_padding_zero():
  img = np.ones((10, 20), np.float32)
  lab = np.zeros((10, 20), np.uint8)
  lab[3:7, 5:15] = 2
  lab[4:6, 8:12] = 1
  out, m = preprocess.warp(img, lab, 24, angle=33.0, scale=0.9)
  assert set(np.unique(m)) <= {0, 1, 2} and (m == 1).any() and (m == 2).any()
  assert out[0].max() == 0 and out[-1].max() == 0     # letterbox rows: air = 0
  assert out.min() >= 0 and out.max() <= 1


def test_prepare_slice_normalises_with_dataset_source():
  hu = np.array([[-2000, -1250], [-500, 250]], np.int16)
  img, m = preprocess.prepare_slice(hu, np.array([[0, 1], [2, 0]], np.uint8), source="hu",
                                    window=(-1250.0, 250.0), size=2, num_classes=3)
  np.testing.assert_allclose(img, [[0, 0], [0.5, 1]], atol=1e-6)
  assert m.tolist() == [[0, 1], [2, 0]]
  _, m1 = preprocess.prepare_slice(hu, np.array([[0, 1], [2, 0]], np.uint8), source="hu",
                                    window=(-1250.0, 250.0), size=2, num_classes=1)
  assert m1.tolist() == [[0, 1], [1, 0]]


def test_unwarp_hand_computed():
  # A 2x4 slice letterboxed into 8x8: zoom 2, rows padded by 2 above and below, so
  # slice pixel (i, j) sits at model coordinate (2i + 2.5, 2j + 0.5).
  grid = np.arange(64, dtype=np.float32).reshape(8, 8)          # value 8r + c
  i, j = np.mgrid[:2, :4]
  np.testing.assert_allclose(preprocess.unwarp(grid, (2, 4), order=1), 16 * i + 2 * j + 20.5, atol=1e-5)
  blocks = (10 * (np.arange(8)[:, None] // 2) + np.arange(8)[None, :] // 2).astype(np.uint8)
  np.testing.assert_array_equal(preprocess.unwarp(blocks, (2, 4), order=0), 10 * (i + 1) + j)
  # A tall slice: the padding is on the left and right instead.
  np.testing.assert_array_equal(preprocess.unwarp(blocks.T.copy(), (4, 2), order=0), (10 * (i + 1) + j).T)
  same = np.arange(16, dtype=np.uint8).reshape(4, 4)
  assert preprocess.unwarp(same, (4, 4), order=0) is same


@pytest.mark.parametrize("shape,size", [((16, 32), 64), ((40, 24), 80)])
def test_unwarp_inverts_the_training_letterbox(shape, size):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, shape).astype(np.uint8)
  _, warped = preprocess.warp(rng.random(shape).astype(np.float32), labels, size)
  back = preprocess.unwarp(warped.astype(np.uint8), shape, order=0)
  assert back.shape == shape and back.dtype == np.uint8
  # The training warp zeroes samples beyond the outermost pixel centres (scipy's
  # 'constant' mode), so the slice's border is compared apart.
  np.testing.assert_array_equal(back[1:-1, 1:-1], labels[1:-1, 1:-1])
  assert np.mean(back == labels) > 0.9


def test_gamma_augmentation_hand_values():
  """gamma_range (g, g) raises the normalised image to g; (1, 1) leaves the stream as before."""
  img = np.arange(32 * 32, dtype=np.int64).reshape(32, 32) % 256
  img = img.astype(np.uint8)
  still = {"flip": False, "rotate_degrees": 0.0, "scale_range": (1.0, 1.0), "intensity_jitter": 0.0}
  def prep(aug, seed=3):
    return preprocess.prepare_slice(img, np.zeros_like(img), source="uint8", window=(-1250, 250),
                                    size=32, num_classes=1, rng=np.random.default_rng(seed),
                                    aug=aug)[0]
  np.testing.assert_allclose(prep({**still, "gamma_range": (2.0, 2.0)}), (img / 255.0) ** 2,
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(prep({**still, "gamma_range": (1.0, 1.0)}),
                                (img / np.float32(255)).astype(np.float32))
  # Log-uniform gamma within the range: every pixel between the two extremes.
  out = prep({**still, "gamma_range": (0.5, 2.0)})
  x = img / 255.0
  assert np.all(out >= x ** 2 - 1e-6) and np.all(out <= x ** 0.5 + 1e-6)
  assert not np.allclose(out, x, atol=1e-3)
