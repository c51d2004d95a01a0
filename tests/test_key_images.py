"""Key images per scan: the slices chosen (hand-computed), the page written as PNG and PDF,
outlines where the lesions are (in radiological orientation), the text panel, bad requests."""
import datetime
import re
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from scoat_jax.data import dicom_seg, palette, writers
from scoat_jax.inference import key_images as ki
from scoat_jax.inference import quantify

SPACING = (0.8, 0.8, 2.5)  # x, y, z in mm
# Lesions (z, rows, cols): A on z=4 (10 x 10 = 100 px) and z=3 (6 x 6 = 36 px), B on z=8 (64 px).
A4 = (4, slice(20, 30), slice(14, 24))
A3 = (3, slice(22, 28), slice(16, 22))
B8 = (8, slice(30, 38), slice(40, 48))
# A4 landscape at 150 dpi: 297 / 25.4 * 150 = 1753.9 and 210 / 25.4 * 150 = 1240.2 pixels,
# which Agg truncates.
PAGE_PIXELS = (1753, 1240)


def _scan(three_class: bool = False):
  """12 x 64 x 64 HU: air, a body at 40 HU, two lungs at -850 HU, lesions at -300 HU."""
  yy, xx = np.mgrid[:64, :64]
  hu = np.full((12, 64, 64), -1000, np.int16)
  hu[:, ((yy - 32) / 28) ** 2 + ((xx - 32) / 30) ** 2 < 1] = 40
  for cx in (18, 46):
    hu[:, ((yy - 32) / 20) ** 2 + ((xx - cx) / 10) ** 2 < 1] = -850
  labels = np.zeros(hu.shape, np.uint8)
  labels[A4] = labels[A3] = 1
  labels[B8] = 2 if three_class else 1
  hu[labels > 0] = -300
  return hu, labels


def _report(three_class: bool = False, **changes) -> dict:
  report = {"name": "synthetic", "lov_ml": 0.32, "lung_volume_ml": 812.5, "poi_percent": 0.04,
            "num_lesions": 2, "warnings": [], "num_classes": 3 if three_class else 1}
  if three_class:
    report["class_volumes_ml"] = {"ggo": 0.2176, "consolidation": 0.1024}
  report.update(changes)
  return report


def _write(tmp_path, hu, labels, report, **kw):
  return ki.write_key_images(tmp_path / "s_report.png", tmp_path / "s_report.pdf", hu, labels,
                             spacing_xyz=kw.pop("spacing_xyz", SPACING), report=report,
                             model="scoat_net", date=datetime.date(2026, 1, 2), **kw)


# ----------------------------------------------------------------------------- key_slices

def test_key_slices_most_opacity_first_then_evenly_spaced_fill():
  _, labels = _scan()
  assert ki.key_slices(labels) == [4, 8, 3]  # 100, 64, 36 pixels
  assert ki.key_slices(labels, k=1) == [4]
  # One place left: the middle of the volume, z = floor(12 / 2) = 6.
  assert ki.key_slices(labels, k=4) == [4, 8, 3, 6]
  # Two places: slab centres 3 (taken -> 2, the lower neighbour; 4 is taken) and 9.
  assert ki.key_slices(labels, k=5) == [4, 8, 3, 2, 9]
  many = ki.key_slices(labels, k=20)
  assert many[:3] == [4, 8, 3] and sorted(many) == list(range(12))


def test_key_slices_ties_go_to_lower_z():
  labels = np.zeros((5, 2, 2), np.uint8)
  labels[3, 0, :] = 1
  labels[1, :, 0] = 2
  labels[0, 1, 1] = 1
  assert ki.key_slices(labels) == [1, 3, 0]
  assert ki.key_slices(labels.astype(np.int32), k=2) == [1, 3]


def test_key_slices_fill_when_fewer_slices_show_opacity():
  labels = np.zeros((12, 4, 4), np.uint8)
  labels[6, 1, 1] = 1
  assert ki.key_slices(labels) == [6, 3, 9]  # slab centres floor(0.5 * 6), floor(1.5 * 6)
  labels[6] = 0
  labels[3, 0, 0] = 1
  assert ki.key_slices(labels) == [3, 2, 9]  # centre 3 is taken: its nearest free slice, 2


def test_key_slices_of_an_empty_mask():
  assert ki.key_slices(np.zeros((12, 3, 3), np.uint8)) == [2, 6, 10]  # floor((i + .5) * 4)
  assert ki.key_slices(np.zeros((4, 3, 3), np.uint8), k=1) == [2]
  assert ki.key_slices(np.zeros((2, 3, 3), np.uint8)) == [0, 1]
  assert ki.key_slices(np.zeros((1, 3, 3), bool)) == [0]


@pytest.mark.parametrize("labels, k", [(np.zeros((4, 4), np.uint8), 3),
                                       (np.zeros((0, 4, 4), np.uint8), 3),
                                       (np.zeros((3, 4, 4), np.float32), 3),
                                       (np.zeros((3, 4, 4), np.uint8), 0),
                                       (np.zeros((3, 4, 4), np.uint8), True)])
def test_key_slices_refuses_bad_arguments(labels, k):
  with pytest.raises(ki.KeyImageError) as e:
    ki.key_slices(labels, k)
  assert "\n" not in str(e.value) and "key_slices" in str(e.value)


# ----------------------------------------------------------------------------- the files

def _pdf_text_runs(data: bytes) -> list[str]:
  """The strings of every text-showing operator (TJ / Tj) in the PDF's compressed streams."""
  string = rb"\(((?:[^\\)]|\\.)*)\)"
  runs = []
  for m in re.finditer(rb"stream\r?\n(.*?)\r?\nendstream", data, re.S):
    try:
      content = zlib.decompress(m.group(1))
    except zlib.error:
      continue
    for op in re.finditer(rb"\[(.*?)\]\s*TJ|" + string + rb"\s*Tj", content, re.S):
      parts = re.findall(string, op.group(1)) if op.group(1) is not None else [op.group(2)]
      runs.append(b"".join(re.sub(rb"\\(.)", rb"\1", p) for p in parts).decode("latin-1"))
  return runs


def test_png_and_one_page_pdf(tmp_path):
  hu, labels = _scan()
  png, pdf = _write(tmp_path, hu, labels, _report(lung_volume_ml=None, poi_percent=None))
  assert (png, pdf) == (tmp_path / "s_report.png", tmp_path / "s_report.pdf")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["s_report.pdf", "s_report.png"]
  with Image.open(png) as im:
    assert im.format == "PNG" and im.size == PAGE_PIXELS
  data = pdf.read_bytes()
  assert data.startswith(b"%PDF")
  assert len(re.findall(rb"/Type\s*/Page(?![s\w])", data)) == 1
  runs = _pdf_text_runs(data)
  for line in ("Lung volume: n/a", "Percentage of infection (POI): n/a", "Lesions: 2",
               "Model: scoat_net", "Report date: 2026-01-02", "synthetic: key images",
               # 100 px of 0.8 x 0.8 mm = 0.64 cm², x 2.5 mm = 0.16 ml; z 4 x 2.5 mm = 10 mm.
               "1: axial z 4, from slice 0: 10.0 mm", "opacity 0.64 cm², 0.16 ml",
               "2: axial z 8, from slice 0: 20.0 mm", "opacity 0.41 cm², 0.10 ml",
               "3: axial z 3, from slice 0: 7.5 mm", "opacity 0.23 cm², 0.06 ml",
               "coronal y 32, middle row", "Every panel: window W1500 L-600 HU (-1350 to 150)."):
    assert line in runs, (line, runs)


def _colour(pixels: np.ndarray, name: str) -> np.ndarray:
  r, g, b = (pixels[..., i].astype(int) for i in range(3))
  if name == "red":
    return (r > 200) & (g < 80) & (b < 80)
  return (r > 200) & (g > 150) & (b < 80)  # yellow


def _panel(fig, title_start: str):
  found = [ax for ax in fig.axes if ax.get_title().startswith(title_start)]  # one per title
  assert len(found) == 1, [ax.get_title() for ax in fig.axes]
  return found[0]


def _box(ax, rows: slice, cols: slice, height: int):
  """PNG pixel box (row0, row1, col0, col1) of a lesion's outer pixel borders in a panel."""
  corners = ax.transData.transform([(cols.start - 0.5, rows.start - 0.5),
                                    (cols.stop - 0.5, rows.stop - 0.5)])
  c0, c1 = sorted(corners[:, 0])
  r0, r1 = sorted(height - corners[:, 1])
  return r0, r1, c0, c1


def _counts_near(hits: np.ndarray, ax, box, height: int, margin: float = 4.0):
  """(hits on the box's outline band, hits elsewhere in the panel)."""
  extent = ax.get_window_extent()
  rr, cc = np.nonzero(hits)
  in_panel = ((cc >= extent.x0) & (cc <= extent.x1) & (rr >= height - extent.y1)
              & (rr <= height - extent.y0))
  r0, r1, c0, c1 = box
  outer = (rr >= r0 - margin) & (rr <= r1 + margin) & (cc >= c0 - margin) & (cc <= c1 + margin)
  inner = (rr > r0 + margin) & (rr < r1 - margin) & (cc > c0 + margin) & (cc < c1 - margin)
  band = in_panel & outer & ~inner
  return int(np.count_nonzero(band)), int(np.count_nonzero(in_panel & ~band))


def _lungs(hu) -> np.ndarray:
  return hu[0][None].repeat(hu.shape[0], 0) == -850  # the two lungs on every slice


def _page(tmp_path, three_class: bool, **kw):
  """The written PNG as an RGB array, and the same figure drawn (its axes' pixel positions)."""
  hu, labels = _scan(three_class)
  report = _report(three_class)
  png, _ = _write(tmp_path, hu, labels, report, **kw)
  fig = ki.key_image_figure(hu, labels, spacing_xyz=SPACING, report=report, model="scoat_net",
                            date=datetime.date(2026, 1, 2), **kw)
  fig.canvas.draw()
  with Image.open(png) as im:
    pixels = np.asarray(im.convert("RGB"))
  return pixels, fig


def test_outline_where_the_lesion_is_in_radiological_orientation(tmp_path):
  hu, _ = _scan()
  pixels, fig = _page(tmp_path, three_class=False, lung=_lungs(hu))
  height = pixels.shape[0]
  gold = _colour(pixels, "yellow")  # label 1: palette gold
  ax = _panel(fig, "1: axial z 4,")
  box = _box(ax, A4[1], A4[2], height)
  side = box[3] - box[2]  # the 10-pixel lesion's side on the page, about 76 pixels
  assert side > 50
  on, off = _counts_near(gold, ax, box, height)
  assert on > 3 * side and off == 0  # a closed outline, nothing in the empty lung or body
  # Radiological convention: cols 14..23 of 64 (the patient's right) on the panel's left,
  # rows 20..29 (anterior) in its upper half.
  extent = ax.get_window_extent()
  rr, cc = np.nonzero(gold[int(height - extent.y1):int(height - extent.y0),
                           int(extent.x0):int(extent.x1)])
  assert cc.max() < 0.5 * extent.width and rr.max() < 0.5 * extent.height
  # The coronal row through the lungs is y = 32 (the lungs' widest row), not a row of most
  # opacity: it cuts lesion B (rows 30..37, cols 40..47) on z = 8 of 12: the upper half
  # (superior up) on the panel's right (the patient's left).
  ax = _panel(fig, "coronal y 32, through the lungs")
  extent = ax.get_window_extent()
  rr, cc = np.nonzero(gold[int(height - extent.y1):int(height - extent.y0),
                           int(extent.x0):int(extent.x1)])
  assert rr.size and rr.max() < 0.5 * extent.height and cc.min() > 0.5 * extent.width
  # Its true aspect: 64 columns of 0.8 mm wide, 12 slices of 2.5 mm high.
  assert extent.height / extent.width == pytest.approx(12 * 2.5 / (64 * 0.8), rel=0.02)
  assert [[t.get_text() for t in g.get_texts()] for g in fig.legends] == [["opacity"]]


def test_three_classes_in_two_colours_with_a_legend(tmp_path):
  pixels, fig = _page(tmp_path, three_class=True)
  height = pixels.shape[0]
  red, yellow = _colour(pixels, "red"), _colour(pixels, "yellow")
  ggo, consolidation = _panel(fig, "1: axial z 4,"), _panel(fig, "2: axial z 8,")
  box = _box(ggo, A4[1], A4[2], height)
  on, off = _counts_near(yellow, ggo, box, height)
  assert on > 3 * (box[3] - box[2]) and off == 0
  assert _counts_near(red, ggo, box, height) == (0, 0)
  box = _box(consolidation, B8[1], B8[2], height)
  on, off = _counts_near(red, consolidation, box, height)
  assert on > 3 * (box[3] - box[2]) and off == 0
  assert _counts_near(yellow, consolidation, box, height) == (0, 0)
  assert [[t.get_text() for t in g.get_texts()] for g in fig.legends] == [["ground glass",
                                                                          "consolidation"]]
  colours = [h.get_color() for h in fig.legends[0].legend_handles]
  assert colours == [palette.hex_colour(1), palette.hex_colour(2)]


def test_one_palette_for_the_page_the_seg_and_the_mask_png(tmp_path):
  # The DICOM SEG's display colours, the mask PNG's palette and the page's outlines agree.
  assert [rgb for *_, rgb in dicom_seg.SEGMENTS[3]] == [palette.LABEL_RGB[1], palette.LABEL_RGB[2]]
  assert dicom_seg.SEGMENTS[1][0][2] == palette.LABEL_RGB[1]
  path = writers.write_png(np.array([[0, 1, 2]], np.uint8), tmp_path / "m_mask.png", palette=True)
  with Image.open(path) as im:
    assert [tuple(v) for v in np.asarray(im.convert("RGB"))[0]] == [
        (0, 0, 0), palette.LABEL_RGB[1], palette.LABEL_RGB[2]]


def test_two_d_slice(tmp_path):
  image = np.tile(np.linspace(0, 255, 80).astype(np.uint8), (60, 1))
  labels = np.zeros((60, 80), np.uint8)
  rows, cols = slice(10, 25), slice(5, 30)
  labels[rows, cols] = 1
  report = {"name": "slice01", **quantify.quantify_slice(labels)}
  png, pdf = _write(tmp_path, image, labels, report, spacing_xyz=None)
  with Image.open(png) as im:
    pixels = np.asarray(im.convert("RGB"))
  assert pixels.shape[1::-1] == PAGE_PIXELS
  runs = _pdf_text_runs(pdf.read_bytes())
  assert "Opacity: 375 pixels (7.81 % of the image)" in runs  # 15 x 25 of 60 x 80
  assert "slice: 375 opacity pixels" in runs
  fig = ki.key_image_figure(image, labels, spacing_xyz=None, report=report, model="scoat_net",
                            date="2026-01-02")
  fig.canvas.draw()
  ax = _panel(fig, "slice:")
  box = _box(ax, rows, cols, pixels.shape[0])
  on, off = _counts_near(_colour(pixels, "yellow"), ax, box, pixels.shape[0])
  assert on > 2 * (box[3] - box[2]) and off == 0


# ----------------------------------------------------------------------------- a real-sized scan

def _chest(depth=64, dz=1.25):
  """A (depth, 96, 96) scan whose lungs span slices 8..55, opacity heaviest on 18..21."""
  hu = np.full((depth, 96, 96), -1000, np.int16)
  yy, xx = np.mgrid[:96, :96]
  body = ((yy - 48) / 40) ** 2 + ((xx - 48) / 44) ** 2 < 1
  hu[:, body] = 40
  lung = np.zeros(hu.shape, bool)
  for cx in (28, 68):
    lung[8:56, ((yy - 50) / 30) ** 2 + ((xx - cx) / 14) ** 2 < 1] = True
  hu[lung] = -850
  labels = np.zeros(hu.shape, np.uint8)
  for z in range(8, 56):
    size = 10 if 18 <= z <= 21 else 3  # the heaviest slices lie within 5 mm of each other
    labels[z, 40:40 + size, 20:20 + size] = 1
  labels[2, 45:60, 45:60] = 1  # below the lungs (bowel gas): never a key slice
  return hu, labels, lung, dz


def test_key_slices_lie_in_the_lungs_and_15_mm_apart_when_the_disease_allows():
  hu, labels, lung, dz = _chest()
  zs = ki.key_slices(labels, lung=lung, spacing_z=dz)
  assert zs[0] == 18  # the most opacity (ties: lower z)
  assert zs == [18, 30, 42] and all(8 <= z < 56 for z in zs)  # 12 slices = 15 mm
  assert min(abs(a - b) for i, a in enumerate(zs) for b in zs[i + 1:]) * dz >= 15.0
  assert ki.key_slices(labels) == [2, 18, 19]  # no lung, no spacing: the old ranking
  # Disease on three adjacent slices only: no spread possible, they are shown all the same.
  tight = np.zeros_like(labels)
  tight[19:22, 40:45, 20:25] = 1
  assert sorted(ki.key_slices(tight, lung=lung, spacing_z=dz)) == [19, 20, 21]
  # No disease: the centres of three slabs of the lungs' extent 8..55, 8 + 8, 8 + 24, 8 + 40.
  assert ki.key_slices(np.zeros_like(labels), lung=lung, spacing_z=dz) == [16, 32, 48]


def _texts(fig):
  """Every visible, non-empty text on the page (titles, ticks, letters, legend) with its box."""
  from matplotlib.text import Text
  renderer = fig.canvas.get_renderer()
  hidden = {id(t) for ax in fig.axes if not ax.axison  # tick labels of axes drawn without axis
            for t in ax.get_xticklabels() + ax.get_yticklabels()}
  return [(t.get_text(), t.get_window_extent(renderer)) for t in fig.findobj(Text)
          if t.get_visible() and t.get_text().strip() and id(t) not in hidden]


def test_page_of_a_chest_names_slices_by_table_and_image_and_no_text_overlaps(tmp_path):
  hu, labels, lung, dz = _chest()
  report = {"name": "chest", "lov_ml": 1.0, "lung_volume_ml": 900.0, "poi_percent": 0.1,
            "num_lesions": 1, "num_classes": 1,
            "lung_rule": {"applied": True, "rule": "opacity kept within 5 mm of the lung mask",
                          "removed_ml": 0.25},
            "warnings": ["a long warning " * 12] * 6}
  table = -200.0 + dz * np.arange(hu.shape[0])  # slice 18 at -177.5 mm
  kw = dict(spacing_xyz=(0.7, 0.7, dz), report=report, model="m", date="2026-01-02",
            lung=lung, table_mm=table, instance_number=lambda z: hu.shape[0] - z)
  fig = ki.key_image_figure(hu, labels, **kw)
  fig.canvas.draw()
  assert _panel(fig, "1: axial z 18,").get_title() == (
      "1: axial z 18, table -177.5 mm, image 46\nopacity 0.49 cm², 0.06 ml")  # 100 px
  texts = _texts(fig)
  assert any("Lung rule: opacity kept within 5 mm of the lung mask; 0.25 ml outside removed"
             in t for t, _ in texts)
  for i, (a, box_a) in enumerate(texts):
    for b, box_b in texts[i + 1:]:
      assert not box_a.overlaps(box_b), (a, b)
  _write(tmp_path, hu, labels, report,
         **{k: v for k, v in kw.items() if k not in ("report", "model", "date")})


def test_page_of_a_scan_without_lung_says_so(tmp_path):
  hu, labels, lung, dz = _chest()
  report = {"name": "abdomen", "lov_ml": None, "lung_volume_ml": 0.0, "poi_percent": None,
            "num_lesions": 0, "num_classes": 1, "warnings": ["no lung found"]}
  empty = np.zeros(hu.shape, np.uint8)
  fig = ki.key_image_figure(hu, empty, spacing_xyz=(0.7, 0.7, dz), report=report, model="m",
                            date="2026-01-02", lung=np.zeros_like(lung))
  fig.canvas.draw()
  assert fig.get_suptitle() == "abdomen: key images (no lung found: not quantified)"
  texts = [t for t, _ in _texts(fig)]
  assert "no lung found" in texts
  assert "Lung opacification volume (LOV): n/a" in "\n".join(texts)


# ----------------------------------------------------------------------------- text panel

def test_summary_lines_show_none_as_na_and_the_warnings():
  warning = ("POI is 130%: more opacity than lung; the lung mask missed part of the lung "
             "(dense consolidation, effusion) or the scan is not a chest CT")
  report = _report(True, lung_volume_ml=None, poi_percent=None, warnings=[warning],
                   class_volumes_ml={"ggo": 1.5, "consolidation": None},
                   dicom={"patient_id": "P001", "study_date": "20200315"})
  lines = ki.summary_lines(report, model="scoat_net", date=datetime.datetime(2026, 1, 2, 9, 30))
  assert lines == [
      "Patient ID: P001", "Study date: 2020-03-15", "Scan: synthetic",
      "Lung opacification volume (LOV): 0.32 ml", "Lung volume: n/a",
      "Percentage of infection (POI): n/a", "Lesions: 2", "Ground-glass opacity: 1.50 ml",
      "Consolidation: n/a", "", "Model: scoat_net", "Report date: 2026-01-02 09:30", "",
      "Warnings:",
      "- POI is 130%: more opacity than lung; the lung mask missed part of the lung",
      "  (dense consolidation, effusion) or the scan is not a chest CT"]
  # Keys missing altogether read n/a as well; a 1-class report has no class lines.
  lines = ki.summary_lines({"lov_ml": 2.0}, model="m", date="today")
  assert lines == ["Lung opacification volume (LOV): 2.00 ml", "Lung volume: n/a",
                   "Percentage of infection (POI): n/a", "Lesions: n/a", "", "Model: m",
                   "Report date: today"]


def test_summary_lines_of_a_three_class_slice():
  labels = np.zeros((10, 10), np.uint8)
  labels[0:2, 0:3] = 1
  labels[5, 5] = 2
  lines = ki.summary_lines(quantify.quantify_slice(labels, num_classes=3), model="m",
                           date=datetime.date(2026, 1, 2))
  assert lines[:4] == ["Opacity: 7 pixels (7.00 % of the image)", "Lesions: 2",
                       "Ground-glass opacity: 6 pixels", "Consolidation: 1 pixels"]


# ----------------------------------------------------------------------------- bad requests

def _bad_cases(tmp_path):
  hu, labels = _scan()
  ok = dict(png=tmp_path / "x.png", pdf=tmp_path / "x.pdf", image=hu, labels=labels,
            spacing=SPACING, report=_report(), window=(-1350, 150))
  return ok, [
      dict(labels=labels[:, :32]),  # shapes differ
      dict(image=hu[None], labels=labels[None]),  # 4-D
      dict(image=hu[0].astype(np.float32), labels=labels[0], spacing=None),  # 2-D not uint8
      dict(image=hu[0].astype(np.uint8), labels=labels[0]),  # spacing for a slice
      dict(labels=labels.astype(np.float32)),
      dict(labels=labels * 2),  # label 2 for a 1-class model
      dict(spacing=(0.8, 0.0, 2.5)), dict(spacing=(0.8, 0.8)), dict(spacing=None),
      dict(window=(150, -1350)), dict(report=[1]),
      dict(png=tmp_path / "x.jpg"), dict(pdf=tmp_path / "missing" / "x.pdf"),
      dict(pdf=tmp_path / "x.png"), dict(lung=np.zeros((3, 4, 4), bool)),
  ]


def test_bad_requests_raise_one_line_and_write_nothing(tmp_path):
  ok, cases = _bad_cases(tmp_path)
  for change in cases:
    a = {**ok, **change}
    with pytest.raises(ki.KeyImageError) as e:
      ki.write_key_images(a["png"], a["pdf"], a["image"], a["labels"], spacing_xyz=a["spacing"],
                          report=a["report"], model="m", date="2026-01-02", hu_window=a["window"],
                          lung=a.get("lung"))
    message = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in message, change
    assert "x.png" in message or "x.jpg" in message or "x.pdf" in message, message
    assert list(tmp_path.iterdir()) == [], change


def test_no_pyplot_and_matplotlib_imported_only_to_draw(tmp_path):
  code = (
      "import sys, numpy as np\n"
      "from scoat_jax.inference import key_images as ki\n"
      "assert 'matplotlib' not in sys.modules\n"
      "ki.write_key_images(sys.argv[1] + '/a.png', sys.argv[1] + '/a.pdf', np.zeros((3, 8, 8)),\n"
      "                    np.ones((3, 8, 8), np.uint8), spacing_xyz=(1, 1, 1), report={},\n"
      "                    model='m', date='d')\n"
      "assert 'matplotlib.pyplot' not in sys.modules\n")
  subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pdf", "a.png"]
