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
