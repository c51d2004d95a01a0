"""Attention maps: the right gates (recomputed by hand from the paper's formula), mapped
back onto the slice, and written as overlays by predict."""
import jax
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from trained_checkpoint import SCAN_SHAPE, test_scan, write_rotated_nifti
from scoat_jax.inference import segment
from scoat_jax.inference import attention
from scoat_jax import inference
from scoat_jax.models import layers

# Shares the tiny trained checkpoint with the other inference tests (one worker).
pytestmark = pytest.mark.xdist_group("tiny_training")


@pytest.fixture(scope="module")
def model(trained_workdir):
  return inference.load_model(trained_workdir)


def _conv1x1(x, p):
  return np.einsum("bhwc,cd->bhwd", x, p["kernel"][0, 0]) + p["bias"]


def _bn(x, p, s):
  return (x - s["mean"]) / np.sqrt(s["var"] + layers.BN_EPSILON) * p["scale"] + p["bias"]


def test_sam_1_1_is_the_papers_gate_on_x_1_0_and_up_x_2_0(model):
  scan = test_scan()
  predictor = inference.Predictor([model])
  x = predictor.prepare(scan.hu[4], "hu")[None, :, :, None]
  maps = attention.sam_maps(model.model, model.variables, x)
  s = model.image_size
  assert {k: v.shape for k, v in maps.items()} == {
      "sam_1_1": (1, s // 2, s // 2), "sam_2_2": (1, s // 4, s // 4), "sam_1_3": (1, s // 2, s // 2)}
  for v in maps.values():
    assert np.all((v > 0) & (v < 1))
  # a = sigmoid(BN(conv(ReLU(BN(conv(lat)) + BN(conv(up)))))), lat = x_1_0, up = up(x_2_0).
  capture = jax.jit(lambda v, x: model.model.apply(v, x, train=False, capture_intermediates=True,
                                                    mutable=["intermediates"])[1])
  state = capture(model.variables, x)
  lat = np.asarray(state["intermediates"]["x_1_0"]["__call__"][0])
  up = np.asarray(layers.upsample2x_align_corners(state["intermediates"]["x_2_0"]["__call__"][0]))
  p, b = model.variables["params"]["sam_1_1"], model.variables["batch_stats"]["sam_1_1"]
  theta = _bn(_conv1x1(lat, p["lateral_conv"]), p["lateral_bn"], b["lateral_bn"])
  phi = _bn(_conv1x1(up, p["up_conv"]), p["up_bn"], b["up_bn"])
  psi = _bn(_conv1x1(np.maximum(theta + phi, 0), p["psi_conv"]), p["psi_bn"], b["psi_bn"])
  np.testing.assert_allclose(maps["sam_1_1"], 1 / (1 + np.exp(-psi[..., 0])), atol=1e-5)


def test_maps_go_back_onto_the_slice_grid():
  # 32-pixel model grid, a wide 20 x 40 slice: zoom 0.8, 3 rows of padding top and bottom.
  half = np.zeros((16, 16), np.float32)
  half[:, :8] = 1.0                           # left half of the model grid
  out = attention.to_slice(half, 32, (20, 40))
  assert out.shape == (20, 40) and out.min() >= 0 and out.max() <= 1
  np.testing.assert_allclose(out[:, :18], 1.0, atol=1e-6)
  np.testing.assert_allclose(out[:, 22:], 0.0, atol=1e-6)
  np.testing.assert_allclose(attention.to_slice(np.full((8, 8), 0.3, np.float32), 32, (20, 40)), 0.3,
                             atol=1e-6)
  # Rows: 20 x 0.8 = 16 model rows, 8 of padding above. The top 12 model rows (6 map
  # rows) hold 4 image rows = 5 slice rows; slice row i sits at model row 0.8 i + 7.9.
  top = np.zeros((16, 16), np.float32)
  top[:6] = 1.0
  rows = attention.to_slice(top, 32, (20, 40))[:, 20]
  np.testing.assert_allclose(rows[3:7], [0.925, 0.7, 0.3, 0.075], atol=1e-5)
  assert np.all(rows[:3] == 1) and np.all(rows[7:] == 0)


def test_predict_writes_overlays_for_chosen_slices(shifted_workdir, tmp_path):
  write_rotated_nifti(test_scan(), tmp_path / "scan.nii.gz")
  with pytest.raises(ValueError, match="beyond"):
    segment.run([str(shifted_workdir)], str(tmp_path / "scan.nii.gz"), str(tmp_path / "no"),
                save_attention=True, attention_slices=[2, SCAN_SHAPE[0]], progress=False)
  assert not (tmp_path / "no").exists()
  [report] = segment.run([str(shifted_workdir)], str(tmp_path / "scan.nii.gz"),
                         str(tmp_path / "out"), save_attention=True, attention_slices=[2, 5],
                         progress=False)
  assert report["outputs"]["attention"] == ["scan_attention_z0002.png", "scan_attention_z0005.png"]
  for name in report["outputs"]["attention"]:
    with Image.open(tmp_path / "out" / name) as im:
      assert im.format == "PNG" and im.width > 3 * im.height > 300
      pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 10            # not a blank figure
  # Default: the slice with the most predicted opacity.
  [report] = segment.run([str(shifted_workdir)], str(tmp_path / "scan.nii.gz"),
                         str(tmp_path / "auto"), save_attention=True, progress=False)
  [name] = report["outputs"]["attention"]
  mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "auto" / "scan_mask.nii.gz")))
  assert name == f"scan_attention_z{int(np.argmax(mask.sum(axis=(1, 2)))):04d}.png"
