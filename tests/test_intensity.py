"""Tests of scoat_jax.data.intensity on hand-computed values."""
import numpy as np
import pytest

from scoat_jax.data import intensity


def test_default_window():
  assert intensity.HU_WINDOW == (-1250.0, 250.0)


def test_window_hu_hand_values():
  hu = np.array([-3000, -1250, -1000, -500, 0, 250, 1000], np.int16)
  # (hu - lo) / (hi - lo) with lo = -1250, width 1500, clipped to [0, 1].
  expected = np.array([0.0, 0.0, 250 / 1500, 0.5, 1250 / 1500, 1.0, 1.0], np.float32)
  got = intensity.window_hu(hu)
  assert got.dtype == np.float32 and got.shape == hu.shape
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)


def test_window_hu_custom_window_and_shape():
  hu = np.array([[-1100.0, -1000.0], [-250.0, 100.0]])
  np.testing.assert_allclose(intensity.window_hu(hu, (-1000, 0)), [[0.0, 0.0], [0.75, 1.0]],
                             atol=1e-7)


def test_scale_uint8_hand_values():
  got = intensity.scale_uint8(np.array([0, 51, 255], np.uint8))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, [0.0, 0.2, 1.0], atol=1e-7)
  np.testing.assert_allclose(intensity.scale_uint8(np.array([102.0])), [0.4], atol=1e-7)


def test_scale_uint8_rejects_hu():
  with pytest.raises(intensity.IntensityError, match="source='hu'"):
    intensity.scale_uint8(np.array([-1000, 40], np.int16))


def test_normalize_dispatches_on_source():
  hu = np.array([-500.0])
  np.testing.assert_allclose(intensity.normalize(hu, "hu"), [0.5])
  np.testing.assert_allclose(intensity.normalize(hu, "hu", window=(-600, -400)), [0.5])
  np.testing.assert_allclose(intensity.normalize(np.array([51], np.uint8), "uint8"), [0.2])
  out = intensity.normalize(np.full((2, 3, 1), 200, np.uint8), "uint8")
  assert out.shape == (2, 3, 1) and out.dtype == np.float32


@pytest.mark.parametrize("source", ["HU", "png", None, "raw"])
def test_unknown_source(source):
  with pytest.raises(intensity.IntensityError, match="unknown") as e:
    intensity.normalize(np.zeros(3), source)
  assert "'hu'" in str(e.value) and "'uint8'" in str(e.value)


@pytest.mark.parametrize("window", [(250, -1250), (0, 0), (0, float("nan")), (1,), "ab", None])
def test_bad_window(window):
  with pytest.raises(intensity.IntensityError, match="window"):
    intensity.normalize(np.zeros(3), "hu", window=window)
  with pytest.raises(intensity.IntensityError, match="window"):
    intensity.window_hu(np.zeros(3), window)


def test_equalize_uint8_hand_values():
  # Counts 2 x 0, 1 x 10, 1 x 255 of 4 pixels: mid-ranks (0 + 2/2)/4, (2 + 1/2)/4, (3 + 1/2)/4.
  got = intensity.equalize_uint8(np.array([[0, 10], [0, 255]], np.uint8))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, [[0.25, 0.625], [0.25, 0.875]], atol=1e-7)
  np.testing.assert_allclose(intensity.equalize_uint8(np.full((3, 3), 77, np.uint8)), 0.5)
  # Float grey values are rounded to their level first.
  np.testing.assert_allclose(intensity.equalize_uint8(np.array([9.8, 10.2, 200.0])),
                             [1 / 3, 1 / 3, 5 / 6], atol=1e-7)
  assert intensity.equalize_uint8(np.zeros((0, 4), np.uint8)).shape == (0, 4)


def test_equalize_ignores_the_export_window():
  # A slice exported with another window (any strictly increasing map of its
  # grey values) equalises to the same input; /255 does not.
  rng = np.random.default_rng(0)
  dark = rng.integers(0, 128, (40, 30)).astype(np.uint8)
  brighter = (np.round(dark + dark.astype(float) ** 2 / 254) + 60).astype(np.uint8)  # 60..250
  assert np.unique(brighter).size == np.unique(dark).size  # one level per level
  np.testing.assert_array_equal(intensity.equalize_uint8(dark), intensity.equalize_uint8(brighter))
  assert not np.allclose(intensity.scale_uint8(dark), intensity.scale_uint8(brighter), atol=0.1)


def test_normalize_uint8_modes():
  img = np.array([0, 0, 255, 255], np.uint8)
  np.testing.assert_allclose(intensity.normalize(img, "uint8", uint8_mode="equalize"),
                             [0.25, 0.25, 0.75, 0.75])
  np.testing.assert_allclose(intensity.normalize(img, "uint8", uint8_mode="scale"), [0, 0, 1, 1])
  # HU ignores the 8-bit mode, but a bad mode fails whatever the source.
  np.testing.assert_allclose(intensity.normalize(np.array([-500.0]), "hu", uint8_mode="equalize"),
                             [0.5])
  for source in ("hu", "uint8"):
    with pytest.raises(intensity.IntensityError, match="uint8_normalization='histogram'"):
      intensity.normalize(img, source, uint8_mode="histogram")
  with pytest.raises(intensity.IntensityError, match="source='hu'"):
    intensity.equalize_uint8(np.array([-1000, 40], np.int16))
