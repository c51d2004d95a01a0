"""`python -m scoat_jax.evaluate` and the surface metrics behind it, on hand-made masks.

Every expected number is worked out by hand in the comments beside it; the
random-mask tests compare with a brute-force enumeration of surface voxels
and all-pairs distances written independently here (the surfel surface Dice
is held to DeepMind's package in test_surface_dice.py).
"""
import csv
import itertools
import json
import logging
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from scoat_jax.evaluation import external, metrics, surface

ROOT = pathlib.Path(__file__).resolve().parents[1]


def png(path, arr, *, palette=False):
  """Writes labels as a palette PNG (indices) or a grey 'L' PNG (values as given)."""
  image = Image.fromarray(np.asarray(arr, np.uint8), mode="L")
  if palette:
    image = image.convert("P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0, 0, 0] * 253)
  image.save(path)


def nii(path, arr, spacing_xyz, origin=(0.0, 0.0, 0.0), direction=None):
  """Writes a (z, y, x) array with the given (x, y, z) spacing, independently of ct_io."""
  image = sitk.GetImageFromArray(np.asarray(arr))
  image.SetSpacing(spacing_xyz)
  image.SetOrigin(origin)
  if direction is not None:
    image.SetDirection(direction)
  sitk.WriteImage(image, str(path))


def read_csv(path):
  with open(path, encoding="utf-8") as f:
    return list(csv.DictReader(f))


def lines_case():
  """A: row 0, cols 0..29 (30 px); B: A plus row 4, cols 0..2 (a stray 3-px segment)."""
  a = np.zeros((6, 32), bool)
  a[0, :30] = True
  b = a.copy()
  b[4, :3] = True
  return a, b


def box_case():
  """(z, y, x) boxes with spacing (3, 0.5, 1) mm: B is 2x4x3 voxels, A is B plus one slice."""
  b = np.zeros((5, 8, 7), np.uint8)
  b[1:3, 2:6, 2:5] = 1
  a = b.copy()
  a[3, 2:6, 2:5] = 1
  return a, b


# --- The surface functions, by hand. ---

def test_the_two_hd95_conventions_differ():
  a, b = lines_case()
  # Every pixel of a 1-px line is a surface pixel. A -> B: 30 zeros. B -> A:
  # 30 zeros and 3 stray pixels 4 rows below A. Directed 95th percentiles:
  # A -> B 0; B -> A at position 0.95 * 32 = 30.4 of the sorted 33, between
  # two 4s: 4. Max-directed: 4 rows. Pooled (63 values, 60 zeros): position
  # 0.95 * 62 = 58.9, between two zeros (indices 58, 59): 0.
  assert surface.hd95_max_directed(a, b) == 4.0
  assert surface.hd95_pooled(a, b) == 0.0
  assert metrics.hd95(a, b) == 0.0   # metrics.hd95 is the pooled convention
  # With 2 mm rows the stray segment is 8 mm away.
  assert surface.hd95_max_directed(a, b, spacing=(2.0, 1.0)) == 8.0
  # The other way round: two 2x2 squares, S1 at rows/cols 0-1, S2 at 4-5.
  s1, s2 = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
  s1[:2, :2], s2[4:6, 4:6] = True, True
  # From S2's pixels to S1's nearest (1, 1): sqrt(18), 5, 5, sqrt(32); the same
  # set the other way. Directed: position 0.95 * 3 = 2.85 -> 5 + 0.85 (sqrt(32)
  # - 5). Pooled (8 values): position 6.65 between the two sqrt(32): sqrt(32).
  assert surface.hd95_max_directed(s1, s2) == pytest.approx(5 + 0.85 * (math.sqrt(32) - 5))
  assert surface.hd95_pooled(s1, s2) == pytest.approx(math.sqrt(32))


def test_surface_dice_is_the_share_of_surfel_length_within_tolerance():
  a, b = lines_case()
  # Surfels (DeepMind's): corner points whose 2x2 pixels are mixed, weighted by
  # the marching-squares length inside them. A (row 0, cols 0..29) has the
  # corner rows above and below it, cols 0..30: 29 straight unit lengths and
  # two end cells cutting a corner diagonally (sqrt(2)/2 each) per row, 58 +
  # 2 sqrt(2) in all. B adds the stray segment's corner rows 4 and 5, cols
  # 0..3: 2 + sqrt(2) each. A's corners are B's (distance 0); the stray rows
  # are 3 and 4 from A's corner row 1.
  # Tolerance 1: 2 (58 + 2 s) / (2 (58 + 2 s) + 4 + 2 s) = (116 + 4 s) / (120 + 6 s);
  # 3 adds corner row 4 (exactly at the tolerance, which counts): (118 + 5 s) /
  # (120 + 6 s); 4 adds row 5: 1.
  s = math.sqrt(2)
  assert surface.surface_dice(a, b, 1.0) == pytest.approx((116 + 4 * s) / (120 + 6 * s), abs=1e-12)
  assert surface.surface_dice(a, b, 2.9) == pytest.approx((116 + 4 * s) / (120 + 6 * s), abs=1e-12)
  assert surface.surface_dice(a, b, 3.0) == pytest.approx((118 + 5 * s) / (120 + 6 * s), abs=1e-12)
  assert surface.surface_dice(a, b, 3.9) == pytest.approx((118 + 5 * s) / (120 + 6 * s), abs=1e-12)
  assert surface.surface_dice(a, b, 4.0) == pytest.approx(1.0, abs=1e-12)
  # Unweighted surface pixels (MONAI's default): 30 + 30 near, of 30 + 33.
  assert surface.surface_dice(a, b, 1.0, weighting="voxels") == pytest.approx(20 / 21, abs=1e-12)
  # With 2.5 mm rows and 0.7 mm columns the straight lengths are 0.7 and the
  # diagonals sqrt(2.5^2 + 0.7^2) / 2 (d); the stray rows are 7.5 and 10 mm away.
  d = math.hypot(2.5, 0.7) / 2
  a_len, stray = 2 * (29 * 0.7 + 2 * d), 2 * (2 * 0.7 + 2 * d)
  assert surface.surface_dice(a, b, 7.4, (2.5, 0.7)) == pytest.approx(
      2 * a_len / (2 * a_len + stray), abs=1e-12)


def test_anisotropic_box_by_hand():
  a, b = box_case()
  spacing = (3.0, 0.5, 1.0)
  # Surface voxels: B (2 slices thick) all 24; A all 36 but its 2 interior
  # ones (middle slice, rows 3-4, col 3): 34. A -> B: 22 zeros, the new
  # slice's 12 voxels 3 mm above B. B -> A: 22 zeros, B's 2 voxels that are
  # A-interior, 0.5 mm (one row) from A's surface. Directed 95th percentiles:
  # A -> B position 31.35 -> 3; B -> A position 21.85 -> 0.85 * 0.5. Pooled:
  # 58 values (44 zeros, two 0.5, twelve 3), position 54.15 -> 3.
  assert surface.hd95_max_directed(a, b, spacing) == pytest.approx(3.0)
  assert surface.hd95_pooled(a, b, spacing) == pytest.approx(3.0)
  # Surface Dice (surfels) on this box: tests/test_surface_dice.py, against
  # DeepMind's package. At 3 mm every surfel is within (A's top 3 mm above B's).
  assert surface.surface_dice(a, b, 3.0, spacing) == pytest.approx(1.0, abs=1e-12)
  # The same spacing reversed (x 3 mm, z 1 mm) is another geometry: the extra
  # slice is 1 mm away.
  assert surface.hd95_max_directed(a, b, spacing[::-1]) == pytest.approx(1.0)
  # Unweighted surface voxels: A 22 of 34 near, B 24 of 24: 46/58.
  assert surface.surface_dice(a, b, 1.0, spacing, weighting="voxels") == pytest.approx(23 / 29)


@pytest.mark.parametrize("shape", [(6, 6), (3, 5, 5)])
def test_empty_masks(shape):
  empty, full = np.zeros(shape, bool), np.zeros(shape, bool)
  full[(slice(1, 3),) * len(shape)] = True
  assert surface.surface_metrics(empty, empty, tolerance=1.0) == {
      "hd95_pooled": 0.0, "hd95_max_directed": 0.0, "surface_dice": 1.0}
  for pair in ((full, empty), (empty, full)):
    assert surface.surface_metrics(*pair, tolerance=1.0) == {
        "hd95_pooled": math.inf, "hd95_max_directed": math.inf, "surface_dice": 0.0}
  with pytest.raises(ValueError, match="tolerance"):
    surface.surface_dice(full, full, -1.0)
  with pytest.raises(ValueError, match="weighting"):
    surface.surface_dice(full, full, 1.0, weighting="area")


# --- Brute force on random masks. ---

def brute_surface_voxels(mask, spacing):
  inside = np.pad(mask, 1)
  inner = inside.copy()
  for axis, shift in itertools.product(range(mask.ndim), (-1, 1)):
    inner &= np.roll(inside, shift, axis=axis)
  edge = (inside & ~inner)[tuple(slice(1, -1) for _ in mask.shape)]
  return np.argwhere(edge) * np.asarray(spacing)


def all_pairs_min(p, q):
  return np.sqrt(((p[:, None, :] - q[None, :, :]) ** 2).sum(-1)).min(axis=1)


# Tolerances avoid exact ties such as 2.0 = |(1.6, 1.2)|, which float rounding may put on
# either side (the library counts them in, with a 1e-9 relative slack; the brute force may not).
@pytest.mark.parametrize("shape,spacing,seed,tol", [((14, 16), (1.0, 1.0), 0, 1.0),
                                                    ((12, 15), (2.5, 0.7), 1, 1.5),
                                                    ((5, 8, 9), (3.0, 0.8, 0.6), 2, 2.1)])
def test_match_brute_force(shape, spacing, seed, tol):
  rng = np.random.default_rng(seed)
  a = np.zeros(shape, bool)
  b = np.zeros(shape, bool)
  a[tuple(slice(1, s - 2) for s in shape)] = True
  b[tuple(slice(2, s) for s in shape)] = True      # touches the far border
  a &= rng.random(shape) < 0.85
  b |= rng.random(shape) < 0.05
  va, vb = brute_surface_voxels(a, spacing), brute_surface_voxels(b, spacing)
  ab, ba = all_pairs_min(va, vb), all_pairs_min(vb, va)
  assert surface.hd95_max_directed(a, b, spacing) == pytest.approx(
      max(np.percentile(ab, 95), np.percentile(ba, 95)), rel=1e-12)
  assert surface.hd95_pooled(a, b, spacing) == pytest.approx(
      np.percentile(np.concatenate([ab, ba]), 95), rel=1e-12)
  near = ((ab <= tol).sum() + (ba <= tol).sum()) / (len(ab) + len(ba))
  assert surface.surface_dice(a, b, tol, spacing, weighting="voxels") == pytest.approx(near)


# --- Files: pairing, reading, the two outputs. ---

def test_3d_nifti_with_anisotropic_spacing(tmp_path, caplog):
  a, b = box_case()
  (tmp_path / "p").mkdir()
  (tmp_path / "r").mkdir()
  nii(tmp_path / "p" / "box_mask.nii.gz", a, (1.0, 0.5, 3.0), origin=(10.0, -5.0, 2.0))
  nii(tmp_path / "r" / "box.nii", b, (1.0, 0.5, 3.0), origin=(10.0, -5.0, 2.0))
  summary = external.run(tmp_path / "p", tmp_path / "r", tmp_path / "out")
  (row,) = read_csv(tmp_path / "out" / "per_case.csv")
  assert (row["case"], row["prediction"], row["reference"]) == ("box", "box_mask.nii.gz", "box.nii")
  # |A| = 36, |B| = 24, A∩B = 24: DSC 48/60, SEN 1, PPV 2/3, VA 48/60; one
  # region each, A's centre (its first voxel 1 mm from the boundary: slice 1,
  # row 3, col 2) lies in B: RLP = RLR = 1. Distances: test_anisotropic_box.
  want = {"dsc": 0.8, "sen": 1.0, "ppv": 2 / 3, "va": 0.8, "rlp": 1.0, "rlr": 1.0,
          "hd95_pooled_mm": 3.0, "hd95_max_directed_mm": 3.0,
          "surface_dice": surface.surface_dice(a, b, 1.0, (3.0, 0.5, 1.0)),
          "pred_voxels": 36, "true_voxels": 24}
  for key, value in want.items():
    assert float(row[key]) == pytest.approx(value, abs=1e-12), key
    if key in external.COLUMNS:   # the summary has the metrics, not the counts
      assert summary[key] == pytest.approx(value, abs=1e-12), key
  saved = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert saved["n_cases"] == 1 and saved["dsc"] == pytest.approx(0.8)
  assert saved["settings"]["distance_unit"] == "mm" and saved["settings"]["tolerance_mm"] == 1.0
  assert "union" in saved["settings"]["hd95_pooled_mm"]
  assert "MONAI" in saved["settings"]["hd95_max_directed_mm"]
  assert "labels" not in saved
  # A label found in no mask scores 1 (both empty) and is warned about.
  with caplog.at_level(logging.WARNING):
    again = external.run(tmp_path / "p", tmp_path / "r", tmp_path / "out", labels=[4],
                         overwrite=True)
  assert again["labels"]["4"]["dsc"] == 1.0 and again["labels"]["4"]["hd95_pooled_mm"] == 0.0
  assert "[4] occur in no prediction" in caplog.text


def test_label_blocks_and_excluded_distances(tmp_path):
  s1, s2 = np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)
  s1[:2, :2], s2[4:6, 4:6] = 1, 1
  (tmp_path / "p").mkdir()
  (tmp_path / "r").mkdir()
  # a: labels swapped (any opacity perfect, each label wrong); b: label 1
  # right, label 2 absent from both; c: nothing predicted, reference label 2.
  png(tmp_path / "r" / "a.png", s1 + 2 * s2, palette=True)
  png(tmp_path / "p" / "a.png", 2 * s1 + s2, palette=True)
  png(tmp_path / "r" / "b.png", s1, palette=True)
  png(tmp_path / "p" / "b.png", s1, palette=True)
  png(tmp_path / "r" / "c.png", 2 * s2, palette=True)
  png(tmp_path / "p" / "c.png", 0 * s2, palette=True)
  summary = external.run(tmp_path / "p", tmp_path / "r", tmp_path / "out", labels="1,2")
  rows = {r["case"]: r for r in read_csv(tmp_path / "out" / "per_case.csv")}
  # Any opacity: a and b perfect; c: A empty, B filled -> DSC 0, distances
  # inf (left out of the mean, counted), surface Dice 0.
  assert [float(rows[c]["dsc"]) for c in "abc"] == [1.0, 1.0, 0.0]
  assert rows["c"]["hd95_pooled_mm"] == "inf" and rows["c"]["surface_dice"] == "0.0"
  assert summary["dsc"] == pytest.approx(2 / 3) and summary["surface_dice"] == pytest.approx(2 / 3)
  assert summary["hd95_pooled_mm"] == 0.0 and summary["n_excluded"]["hd95_pooled_mm"] == 1
  # Label 1: a swapped squares: DSC 0, pooled HD95 sqrt(32), max-directed
  # 5 + 0.85 (sqrt(32) - 5) (see test_the_two_hd95_conventions_differ),
  # surface Dice 0 (> 4 px apart); b perfect; c both empty: DSC 1, distances 0,
  # surface Dice 1.
  one = summary["labels"]["1"]
  assert float(rows["a"]["hd95_pooled_mm_label1"]) == pytest.approx(math.sqrt(32))
  assert one["dsc"] == pytest.approx(2 / 3) and one["surface_dice"] == pytest.approx(2 / 3)
  assert one["hd95_pooled_mm"] == pytest.approx(math.sqrt(32) / 3)
  assert one["hd95_max_directed_mm"] == pytest.approx((5 + 0.85 * (math.sqrt(32) - 5)) / 3)
  assert one["n_excluded"] == {"hd95_pooled_mm": 0, "hd95_max_directed_mm": 0}
  # Label 2: a DSC 0 (sqrt(32)); b both empty: 1 (0); c one empty: 0 (inf).
  two = summary["labels"]["2"]
  assert two["dsc"] == pytest.approx(1 / 3) and two["surface_dice"] == pytest.approx(1 / 3)
  assert two["hd95_pooled_mm"] == pytest.approx(math.sqrt(32) / 2)
  assert two["n_excluded"]["hd95_max_directed_mm"] == 1
  assert float(rows["c"]["true_voxels_label2"]) == 4 and rows["b"]["rlr_label2"] == "1.0"
  saved = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert saved["settings"]["labels"] == [1, 2] and saved["settings"]["distance_unit"] == "pixel"
  assert saved["labels"]["2"]["dsc"] == pytest.approx(1 / 3)


def test_png_reading_rules(tmp_path):
  arr = np.zeros((6, 6), np.uint8)
  arr[1:3, 1:4] = 255
  png(tmp_path / "binary.png", arr)                  # 0/255 grey: 255 is opacity
  np.testing.assert_array_equal(external.read_labels(tmp_path / "binary.png")[0], arr // 255)
  png(tmp_path / "labels.png", arr // 255 * 2)       # grey 0/2: kept as labels
  assert external.read_labels(tmp_path / "labels.png")[0].max() == 2
  png(tmp_path / "soft.png", np.arange(36).reshape(6, 6) * 7)   # 36 grey levels
  with pytest.raises(external.EvaluationError, match="probability map"):
    external.read_labels(tmp_path / "soft.png")
  # Every volume format gets the same grey-level check; 16 labels are still labels.
  levels = np.arange(2 * 4 * 5).reshape(2, 4, 5).astype(np.uint8)
  for suffix in (".nii.gz", ".mha", ".nrrd"):
    nii(tmp_path / f"grey{suffix}", levels * 6, (1.0, 1.0, 1.0))
    with pytest.raises(external.EvaluationError, match="40 distinct values.*probability map"):
      external.read_labels(tmp_path / f"grey{suffix}")
  nii(tmp_path / "sixteen.nrrd", levels % 16, (1.0, 1.0, 1.0))
  assert external.read_labels(tmp_path / "sixteen.nrrd")[0].max() == 15
  rgb = np.zeros((6, 6, 3), np.uint8)
  rgb[1:3, 1:3, 0] = 255
  Image.fromarray(rgb, mode="RGB").save(tmp_path / "colour.png")
  with pytest.raises(external.EvaluationError, match="colour"):
    external.read_labels(tmp_path / "colour.png")


def test_pairing_errors(tmp_path):
  p, r = tmp_path / "p", tmp_path / "r"
  p.mkdir()
  r.mkdir()
  m = np.zeros((4, 4), np.uint8)
  for path in (r / "a.png", r / "b.png", p / "a.png", p / "a_mask.png"):
    png(path, m)
  with pytest.raises(external.EvaluationError, match="a.png and a_mask.png both claim case 'a'"):
    external.pair_files(p, r)
  (p / "a.png").unlink()
  png(p / "b.png", m)
  png(p / "extra_mask.png", m)
  png(p / "b_probability.png", m)                    # predict's own output: passed over
  with pytest.raises(external.EvaluationError, match="no reference for extra_mask.png"):
    external.pair_files(p, r)
  (p / "extra_mask.png").unlink()
  assert [(c.name, c.prediction.name) for c in external.pair_files(p, r)] == [
      ("a", "a_mask.png"), ("b", "b.png")]
  nii(r / "a.nii.gz", np.zeros((2, 4, 4), np.uint8), (1.0, 1.0, 1.0))
  with pytest.raises(external.EvaluationError, match="a.nii.gz and a.png are both case 'a'"):
    external.pair_files(p, r)


@pytest.mark.parametrize("change,what", [
    (dict(origin=(0.0, 0.0, 0.01)), "origin"),
    (dict(direction=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)), "direction"),
    (dict(shape=(3, 4, 5)), "size"),
])
def test_geometry_mismatches(tmp_path, change, what):
  (tmp_path / "p").mkdir()
  (tmp_path / "r").mkdir()
  nii(tmp_path / "r" / "c.nii.gz", np.zeros((2, 4, 5), np.uint8), (0.7, 0.7, 2.0))
  nii(tmp_path / "p" / "c.nii.gz", np.zeros(change.pop("shape", (2, 4, 5)), np.uint8),
      (0.7, 0.7, 2.0), **change)
  with pytest.raises(external.EvaluationError, match=f"the {what} .* differs from its reference"):
    external.run(tmp_path / "p", tmp_path / "r", tmp_path / "out")
  assert not (tmp_path / "out").exists()
  # Within 1e-3 mm / 1e-4 is the same grid.
  nii(tmp_path / "p" / "c.nii.gz", np.zeros((2, 4, 5), np.uint8), (0.7, 0.7, 2.0005))
  assert external.run(tmp_path / "p", tmp_path / "r", tmp_path / "out")["n_cases"] == 1


# --- The command. ---

def _evaluate(*args, cwd):
  return subprocess.run([sys.executable, "-m", "scoat_jax.evaluate", *args], capture_output=True,
                        text=True, cwd=cwd, timeout=300)


def test_command_scores_png_pairs(tmp_path):
  (tmp_path / "p").mkdir()
  (tmp_path / "r").mkdir()
  a, b = lines_case()
  png(tmp_path / "r" / "lines.png", a * 255)                 # COVID-SemiSeg-style 0/255 GT
  png(tmp_path / "p" / "lines_mask.png", b, palette=True)    # predict-style name, palette
  same = np.zeros((6, 32), np.uint8)
  same[1:4, 1:4] = 1
  png(tmp_path / "r" / "same.png", same * 255)
  png(tmp_path / "p" / "same.png", same, palette=True)
  proc = _evaluate("--predictions=p", "--references=r", "--output=out", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = {r["case"]: r for r in read_csv(tmp_path / "out" / "per_case.csv")}
  # lines: prediction B (33 px), reference A (30 px), A∩B = 30: DSC 60/63,
  # SEN 1, PPV 30/33; prediction regions: the long line (centre (0, 0), in A)
  # and the stray segment (centre (4, 0), not): RLP 1/2, RLR 1. Distances and
  # surface Dice: test_the_two_hd95_conventions_differ / test_surface_dice_...
  want = {"dsc": 20 / 21, "sen": 1.0, "ppv": 10 / 11, "va": 20 / 21, "rlp": 0.5, "rlr": 1.0,
          "hd95_pooled_mm": 0.0, "hd95_max_directed_mm": 4.0,
          "surface_dice": (116 + 4 * math.sqrt(2)) / (120 + 6 * math.sqrt(2))}
  for key, value in want.items():
    assert float(rows["lines"][key]) == pytest.approx(value, abs=1e-12), key
  assert float(rows["same"]["dsc"]) == 1.0 and float(rows["same"]["surface_dice"]) == 1.0
  summary = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert summary["n_cases"] == 2 and summary["settings"]["distance_unit"] == "pixel"
  assert summary["dsc"] == pytest.approx((20 / 21 + 1) / 2)
  assert summary["hd95_max_directed_mm"] == pytest.approx(2.0)
  assert summary["surface_dice"] == pytest.approx((want["surface_dice"] + 1) / 2)
  assert '"n_cases": 2' in proc.stdout                      # the summary is printed
  again = _evaluate("--predictions=p", "--references=r", "--output=out", cwd=tmp_path)
  assert again.returncode == 2 and "--overwrite" in again.stderr


def _bad_inputs(root: pathlib.Path, kind: str) -> list[str]:
  """Folders p/ and r/ under root with one defect; the flags that show it."""
  p, r = root / "p", root / "r"
  p.mkdir()
  r.mkdir()
  vol = np.zeros((3, 4, 5), np.uint8)
  vol[1, 1:3, 1:3] = 1
  nii(r / "a.nii.gz", vol, (0.8, 0.8, 2.0))
  nii(p / "a.nii.gz", vol, (0.8, 0.8, 2.5) if kind == "geometry" else (0.8, 0.8, 2.0))
  if kind == "unpaired":
    nii(r / "b.nii.gz", vol, (0.8, 0.8, 2.0))
  if kind == "probability":
    nii(p / "a.nii.gz", vol * np.float32(0.3), (0.8, 0.8, 2.0))
  if kind == "grey_probability":   # P(opacity) x 255 stored as uint8: 60 grey levels
    nii(p / "a.nii.gz", (np.arange(60).reshape(3, 4, 5) * 4).astype(np.uint8), (0.8, 0.8, 2.0))
  flags = ["--predictions=nowhere" if kind == "missing" else "--predictions=p",
           "--references=r", "--output=out"]
  return flags + (["--labels=1,x"] if kind == "labels" else [])


@pytest.mark.parametrize("kind,expected", [
    ("missing", "--predictions=nowhere: no such folder"),
    ("unpaired", "no prediction for b.nii.gz"),
    ("geometry", "the spacing (0.8, 0.8, 2.5) vs (0.8, 0.8, 2) mm differs from its reference"),
    ("probability", "non-integer values (e.g. 0.3"),
    ("grey_probability", "a.nii.gz: 60 distinct values (up to 236), like a probability map"),
    ("labels", "--labels=1,x: give positive integer labels"),
])
def test_command_refuses_bad_input_in_one_line(tmp_path, kind, expected):
  proc = _evaluate(*_bad_inputs(tmp_path, kind), cwd=tmp_path)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
  assert expected in lines[0], lines[0]
  assert not (tmp_path / "out").exists()
