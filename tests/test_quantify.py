"""Quantification against hand-made masks and the phantom's exact volumes."""
import numpy as np
import pytest
import SimpleITK as sitk

from scoat_jax.inference import quantify
from scoat_jax.data import ct_io, phantom


def _geometry(shape_zyx, spacing=(0.5, 0.8, 2.0), direction=None):
  t = np.deg2rad(30.0)
  direction = direction or (np.cos(t), 0.0, np.sin(t), 0.0, 1.0, 0.0, -np.sin(t), 0.0, np.cos(t))
  return ct_io.Geometry.for_array(shape_zyx, spacing, origin=(-10.0, 20.0, 5.5), direction=direction)


def test_lesions_26_connectivity_volumes_and_centres():
  labels = np.zeros((6, 10, 12), np.uint8)
  labels[1:4, 1:4, 1:4] = 1          # 27 voxels
  labels[4, 4, 4] = 1                # touches the cube only at a corner: same lesion (26-conn.)
  labels[0:2, 7:9, 8:12] = 1         # 16 voxels, separate
  labels[5, 0, 11] = 1               # a single voxel
  g = _geometry(labels.shape)
  vv = 0.5 * 0.8 * 2.0 / 1000
  r = quantify.quantify_volume(labels, g)
  assert r["opacity_voxels"] == 27 + 1 + 16 + 1
  assert r["lov_ml"] == pytest.approx(45 * vv, rel=1e-12)
  assert r["voxel_volume_ml"] == pytest.approx(vv)
  assert r["num_lesions"] == 3
  assert [l["voxels"] for l in r["lesions"]] == [28, 16, 1]
  assert [l["id"] for l in r["lesions"]] == [1, 2, 3]
  assert r["lesions"][0]["volume_ml"] == pytest.approx(28 * vv)
  assert r["lesions"][0]["bbox_start"] == [1, 1, 1] and r["lesions"][0]["bbox_stop"] == [5, 5, 5]
  assert r["lesions"][2]["centre_index"] == [5, 0, 11]
  # Centre = farthest from the boundary in mm (spacing z, y, x = 2, 0.8, 0.5): the fine x
  # axis limits every voxel of the line x = y = 2 to 1 mm, so z = 1, 2, 3 tie and the
  # lowest index wins (the rule of scoat_jax.metrics).
  assert r["lesions"][0]["centre_index"] == [1, 2, 2]
  # Physical position: compare with ITK's own index -> point transform.
  image = g.apply_to(sitk.GetImageFromArray(labels))
  for lesion in r["lesions"]:
    z, y, x = lesion["centre_index"]
    np.testing.assert_allclose(lesion["centre_mm"], image.TransformIndexToPhysicalPoint((x, y, z)),
                               atol=1e-9)
  # No lung given: lung entries are undefined, never NaN.
  assert r["lung_volume_ml"] is None and r["poi_percent"] is None
  assert "class_volumes_ml" not in r


def test_three_classes_and_lung():
  labels = np.zeros((4, 8, 8), np.uint8)
  labels[1, 2:5, 2:5] = 1
  labels[1, 3, 3] = 2
  labels[3, 6:8, 6:8] = 2
  lung = np.zeros(labels.shape, bool)
  lung[:, 1:6, 1:6] = True            # 100 voxels; the second lesion lies outside
  g = _geometry(labels.shape, spacing=(1.0, 1.0, 1.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
  r = quantify.quantify_volume(labels, g, lung=lung, num_classes=3)
  vv = 1e-3
  assert r["class_volumes_ml"] == pytest.approx({"ggo": 8 * vv, "consolidation": 5 * vv})
  assert r["lov_ml"] == pytest.approx(13 * vv)
  assert r["lung_volume_ml"] == pytest.approx(100 * vv) and r["lung_voxels"] == 100
  assert r["poi_percent"] == pytest.approx(100 * 13 / 100)
  assert r["lov_outside_lung_ml"] == pytest.approx(4 * vv)
  # 4 of 13 opacity voxels outside the lung: POI may be too high, and the report says so.
  [warning] = r["warnings"]
  assert "31% of the opacity lies outside the lung mask" in warning
  big, small = r["lesions"]
  assert (big["ggo_volume_ml"], big["consolidation_volume_ml"]) == pytest.approx((8 * vv, 1 * vv))
  assert (small["ggo_volume_ml"], small["consolidation_volume_ml"]) == pytest.approx((0, 4 * vv))
  with pytest.raises(ValueError, match="outside 0..1"):
    quantify.quantify_volume(labels, g, num_classes=1)
  with pytest.raises(ValueError, match="threshold"):
    quantify.quantify_volume(labels.astype(np.float32), g)
  with pytest.raises(ValueError, match="geometry"):
    quantify.quantify_volume(labels[:3], g, num_classes=3)


def test_empty_mask_and_empty_lung():
  g = _geometry((3, 4, 5))
  r = quantify.quantify_volume(np.zeros((3, 4, 5), np.uint8), g, lung=np.zeros((3, 4, 5), bool))
  assert r["lov_ml"] == 0 and r["num_lesions"] == 0 and r["lesions"] == []
  assert r["lung_volume_ml"] == 0 and r["poi_percent"] is None
  assert r["warnings"] == ["the lung mask is empty, so POI is undefined; check that the scan "
                           "shows the chest"]
  r = quantify.quantify_volume(np.zeros((3, 4, 5), np.uint8), g, lung=np.ones((3, 4, 5), bool))
  assert r["poi_percent"] == 0.0 and r["warnings"] == []
  more = np.zeros((3, 4, 5), bool)
  more[0, 0, 0] = True
  r = quantify.quantify_volume(np.ones((3, 4, 5), np.uint8), g, lung=more)
  assert r["poi_percent"] == pytest.approx(6000.0) and "more opacity than lung" in r["warnings"][0]


def test_slice_eight_connectivity():
  labels = np.zeros((6, 7), np.uint8)
  labels[0:2, 0:2] = 1
  labels[2, 2] = 1                   # diagonal neighbour: same region in 2-D (8-connectivity)
  labels[4:6, 5:7] = 2
  r = quantify.quantify_slice(labels, num_classes=3)
  assert r["opacity_pixels"] == 9 and r["num_lesions"] == 2
  assert [l["pixels"] for l in r["lesions"]] == [5, 4]
  assert r["class_pixels"] == {"ggo": 5, "consolidation": 4}
  assert r["lesions"][1]["consolidation_pixels"] == 4
  assert r["opacity_percent_of_image"] == pytest.approx(100 * 9 / 42)
  assert r["lov_ml"] is None and r["poi_percent"] is None


def test_phantom_true_volumes_and_lung_within_5_percent():
  # The default phantom geometry (48 x 256 x 256, 1.4 x 1.4 x 5 mm), two patients.
  for patient in (0, 1):
    scan = phantom.generate_scan(2, patient, 1)
    r = quantify.quantify_volume(scan.label, scan.geometry, hu=scan.hu, num_classes=3)
    # The true mask gives the phantom's own lesion volume exactly...
    assert r["lov_ml"] == pytest.approx(scan.lesion_volume_ml, rel=1e-9)
    assert sum(r["class_volumes_ml"].values()) == pytest.approx(scan.lesion_volume_ml)
    assert sum(l["volume_ml"] for l in r["lesions"]) == pytest.approx(scan.lesion_volume_ml)
    # ... and the classical lung mask the true lung volume within 5%.
    assert r["lung_volume_ml"] == pytest.approx(scan.lung_volume_ml, rel=0.05)
    assert r["poi_percent"] == pytest.approx(100 * r["lov_ml"] / r["lung_volume_ml"])
    # Lesions sit in the lung, so their centres do too.
    for lesion in r["lesions"]:
      assert scan.lung[tuple(lesion["centre_index"])]


def _random_labels(rng, shape, p=0.04):
  """Random 0/1/2 labels: blobs of opacity, some of it consolidation."""
  from scipy import ndimage
  blobs = ndimage.binary_dilation(rng.random(shape) < p / 8, iterations=1) | (rng.random(shape) < p)
  return np.where(blobs, np.where(rng.random(shape) < 0.3, 2, 1), 0).astype(np.uint8)


@pytest.mark.parametrize("shape,spacing", [((9, 20, 23), (2.0, 0.8, 0.5)), ((9, 20, 23), None),
                                           ((31, 29), (0.7, 1.3)), ((31, 29), None)])
def test_region_centres_in_box_equals_metrics(shape, spacing):
  from scoat_jax.evaluation import metrics
  rng = np.random.default_rng(sum(shape))
  for _ in range(3):
    mask = np.pad(_random_labels(rng, shape) > 0, 2)  # a box that starts off the origin
    labels, centres = metrics.region_centres(mask, spacing=spacing)
    comp, n, got, box = quantify.region_centres_in_box(mask, spacing)
    assert n == len(centres) > 2
    np.testing.assert_array_equal(got, centres)
    np.testing.assert_array_equal(comp, labels[box])
  comp, n, got, box = quantify.region_centres_in_box(np.zeros(shape, bool), spacing)
  assert n == 0 and got.shape == (0, len(shape)) and box is None


def test_lesions_equal_the_whole_volume_reference():
  # Reference: metrics.region_centres and bincounts over the whole volume.
  from scipy import ndimage
  from scoat_jax.evaluation import metrics
  rng = np.random.default_rng(7)
  labels = np.zeros((12, 40, 44), np.uint8)
  labels[2:10, 5:30, 8:40] = _random_labels(rng, (8, 25, 32))
  spacing = (2.5, 0.7, 0.7)
  found = quantify.lesions(labels, voxel_volume_ml=1e-3, spacing_zyx=spacing, num_classes=3)
  comp, centres = metrics.region_centres(labels > 0, spacing=spacing)
  n = len(centres)
  counts = np.bincount(comp.ravel(), minlength=n + 1)
  ggo = np.bincount(comp.ravel(), weights=(labels == 1).ravel(), minlength=n + 1)
  boxes = ndimage.find_objects(comp)
  order = sorted(range(1, n + 1), key=lambda k: (-counts[k], k))
  assert len(found) == n > 5
  for item, k in zip(found, order):
    assert item["voxels"] == counts[k]
    assert item["centre_index"] == list(centres[k - 1])
    assert item["bbox_start"] == [s.start for s in boxes[k - 1]]
    assert item["bbox_stop"] == [s.stop for s in boxes[k - 1]]
    assert item["ggo_volume_ml"] == pytest.approx(ggo[k] * 1e-3)
    total = item["ggo_volume_ml"] + item["consolidation_volume_ml"]
    assert total == pytest.approx(item["volume_ml"])
  with pytest.raises(quantify.QuantifyError, match="spacing_zyx"):
    quantify.lesions(labels, spacing_zyx=(1.0, 1.0))
