"""Surface Dice against DeepMind's own `surface-distance` package (the independent reference).

`scoat_jax.evaluation.surfels` builds the marching-squares / marching-cubes
surfel weights from the geometry; the package ships hand-made lookup tables
and computes distances with a Euclidean distance transform on the corner grid
instead of k-d trees. Both must agree on every neighbourhood code and on the
surface Dice of anisotropic masks.
"""
import numpy as np
import pytest
from scipy import ndimage

surface_distance = pytest.importorskip("surface_distance")
from surface_distance import lookup_tables  # noqa: E402

from scoat_jax.evaluation import surface, surfels  # noqa: E402


def _from_deepmind(code: int, ndim: int) -> int:
  """DeepMind's code of a corner set -> ours: its corner k (C order) carries bit n-1-k, ours bit k."""
  n = 2 ** ndim
  return sum(((code >> (n - 1 - k)) & 1) << k for k in range(n))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 0.7, 2.5), (2.5, 0.7, 0.7),
                                     (0.3, 4.1, 1.7), (3.2, 1.5, 0.4)])
def test_every_code_weighs_what_deepmind_tables_say(spacing):
  ref = lookup_tables.create_table_neighbour_code_to_surface_area(spacing)
  ours = surfels.weights(spacing)
  np.testing.assert_allclose([ours[_from_deepmind(c, 3)] for c in range(256)], ref,
                             rtol=1e-12, atol=1e-12)
  ref2 = lookup_tables.create_table_neighbour_code_to_contour_length(spacing[1:])
  ours2 = surfels.weights(spacing[1:])
  np.testing.assert_allclose([ours2[_from_deepmind(c, 2)] for c in range(16)], ref2,
                             rtol=1e-12, atol=1e-12)


def _blob(shape, seed, sigma, level):
  noise = np.random.default_rng(seed).standard_normal(shape)
  return ndimage.gaussian_filter(noise, sigma) > level


def _ball(shape, centre, radii):
  grid = np.indices(shape, dtype=np.float64)
  return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def _cases():
  """(name, pred, truth, spacing (array axes), tolerance): all anisotropic."""
  shape = (14, 40, 44)
  truth = _ball(shape, (6.5, 20, 21), (4.0, 13.0, 14.0))
  shifted = _ball(shape, (7.0, 21.5, 20), (4.5, 12.0, 15.0))
  far = truth.copy()
  far[1, 2:4, 2:4] = far[12, 35:37, 38:40] = True     # small far blobs
  lesions = _blob((12, 36, 36), 3, (1.0, 2.5, 2.5), 0.05)
  lesions_pred = ndimage.binary_dilation(lesions) & _blob((12, 36, 36), 4, (1.0, 2.0, 2.0), -0.1)
  thin = np.zeros((10, 30, 30), bool)
  thin[2:8, 5:25, 14:16] = True                          # a 2-voxel-thick wall
  thin_pred = np.roll(thin, 1, axis=2)
  plane_a, plane_b = _blob((48, 52), 5, 3.0, 0.0), _blob((48, 52), 6, 3.0, 0.02)
  box = np.zeros((5, 8, 7), bool)
  box[1:3, 2:6, 2:5] = True
  box_a = box.copy()
  box_a[3, 2:6, 2:5] = True                              # test_evaluate.box_case
  return [
      ("test_evaluate's boxes", box_a, box, (3.0, 0.5, 1.0), 1.0),
      ("balls at 0.7x0.7x2.5, 1 mm", shifted, truth, (2.5, 0.7, 0.7), 1.0),
      ("balls at 0.7x0.7x2.5, 2 mm", shifted, truth, (2.5, 0.7, 0.7), 2.0),
      ("small far blobs", far, truth, (2.5, 0.7, 0.7), 1.0),
      ("scattered lesions", lesions_pred, lesions, (1.25, 0.8, 0.6), 1.0),
      ("thin wall, shifted", thin_pred, thin, (3.0, 0.9, 0.45), 0.3),
      ("2-D blobs", plane_a, plane_b, (0.7, 1.9), 1.5),
  ]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_surface_dice_equals_deepmind(case):
  _, pred, truth, spacing, tol = case
  assert pred.any() and truth.any() and (pred != truth).any()
  distances = surface_distance.compute_surface_distances(truth, pred, spacing)
  want = surface_distance.compute_surface_dice_at_tolerance(distances, tol)
  got = surface.surface_dice(pred, truth, tol, spacing)
  assert got == pytest.approx(want, abs=1e-9)
  assert 0.05 < got < 0.999   # a case where the tolerance matters
