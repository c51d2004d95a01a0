"""Key images of one scan: the slices with the most opacity, outlined, and its numbers, on a page.

Clinicians file one picture per scan with the study. `write_key_images` draws
it once and saves it twice, as `<name>_report.png` (150 dpi) and as a
one-page `<name>_report.pdf`, both A4 landscape:

* top row: the three key axial slices (`key_slices`: most opacity first) in
  the lung window (W1500/L-600 by default), the predicted mask outlined, not
  filled (ground glass and consolidation in two colours for 3-class models),
  each titled with its z index and its opacity area and volume;
* bottom left: a coronal slice through the row y with the most opacity, its
  outline, superior up, with its true aspect from the voxel spacing and the
  key slices' levels marked on its axis;
* bottom right: the numbers of the scan's report (`quantify.quantify_volume`
  or `quantify_slice`), the model, the date, and any warnings.

Orientation: on the canonical grid (`data.orientation`: index x toward the
patient's left, y posterior, z superior) the radiological convention, the
patient's right on the image's left and anterior up, is the array as stored:
`imshow(image[z])` puts x = 0 (the patient's right side) at the left and row
y = 0 (anterior) at the top. The coronal view `image[:, y, :]` keeps x the
same way and is drawn with z = 0 at the bottom, so superior is up. The
panels carry R/L/A/P/S/I letters to say so.

A 2-D (H, W) uint8 slice gets one panel, as stored, with its outline, and the
text panel in pixels. Only the shown slices are read from the volume (no
copy of it is made), and matplotlib is used through its object-oriented API
on the Agg canvas (no pyplot state, no display), imported only when drawing.
"""
from __future__ import annotations

import datetime
import math
import pathlib
import textwrap
from collections.abc import Sequence

import numpy as np

from scoat_jax.common import fileio

KEY_SLICES = 3
PAGE_INCHES = (297 / 25.4, 210 / 25.4)  # A4 landscape
DPI = 150
LUNG_WINDOW = (-1350.0, 150.0)  # W1500 / L-600
# Outline colours: one class, and three classes (1 ground glass, 2 consolidation).
OPACITY_COLOUR = "#ff0000"
CLASS_COLOURS = {1: "#ffd700", 2: "#ff0000"}
CLASS_LABELS = {1: "ground glass", 2: "consolidation"}
_WRAP = 78


class KeyImageError(ValueError):
  """A key-image request that cannot be drawn as asked (arrays, spacing, paths)."""


# ----------------------------------------------------------------------------- slices

def _check_labels(labels, what: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.dtype != bool and not np.issubdtype(labels.dtype, np.integer):
    raise KeyImageError(f"{what}: labels have dtype {labels.dtype}; pass integer labels "
                        "(threshold probabilities first)")
  return labels


def _slice_counts(labels: np.ndarray) -> np.ndarray:
  """Opacity pixels (label > 0) per axial slice, one slice at a time (no volume-sized copy)."""
  signed = np.issubdtype(labels.dtype, np.signedinteger)
  return np.array([np.count_nonzero(labels[z] > 0 if signed else labels[z])
                   for z in range(labels.shape[0])], np.int64)


def key_slices(labels: np.ndarray, k: int = KEY_SLICES) -> list[int]:
  """The k axial slices to show: most opacity first, then filling slices.

  Slices with opacity (label > 0) come first, by decreasing opacity, ties by
  lower z. When fewer than k slices show opacity, the m remaining places go to
  the centres of m equal slabs of the volume, z = floor((i + 1/2) * depth / m)
  (the middle slice for m = 1), each moved to the nearest slice not yet chosen
  (lower z on ties); they follow in increasing z. No slice appears twice and
  at most `depth` slices are returned.

  Args:
    labels: (z, y, x) integer mask.
    k: how many slices (>= 1).

  Returns:
    min(k, depth) distinct z indices.
  """
  labels = _check_labels(labels, "key_slices")
  if labels.ndim != 3 or labels.shape[0] == 0:
    raise KeyImageError(f"key_slices: labels have shape {labels.shape}; pass a (z, y, x) mask "
                        "with at least one slice")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise KeyImageError(f"key_slices: k={k!r}; pass a whole number of slices >= 1")
  return _choose(_slice_counts(labels), int(k))


def _choose(counts: np.ndarray, k: int) -> list[int]:
  depth = len(counts)
  opaque = np.flatnonzero(counts > 0)
  chosen = sorted(opaque.tolist(), key=lambda z: (-counts[z], z))[:k]
  m = min(k, depth) - len(chosen)
  taken, fill = set(chosen), []
  for i in range(m):
    target = (2 * i + 1) * depth // (2 * m)
    for d in range(depth):
      z = next((c for c in (target - d, target + d) if 0 <= c < depth and c not in taken), None)
      if z is not None:
        break
    taken.add(z)
    fill.append(z)
  return chosen + sorted(fill)


# ----------------------------------------------------------------------------- the text panel

def _fmt(value, unit: str = "", digits: int = 2) -> str:
  """A number with its unit, or 'n/a' when it is undefined (None)."""
  if value is None:
    return "n/a"
  text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
  return f"{text} {unit}".rstrip()


def _date_text(date) -> str:
  if isinstance(date, datetime.datetime):
    return date.isoformat(sep=" ", timespec="minutes")
  if isinstance(date, datetime.date):
    return date.isoformat()
  return str(date)


def _study_date(text: str) -> str:
  """DICOM 'YYYYMMDD' as 'YYYY-MM-DD'; anything else as given."""
  text = str(text)
  return f"{text[:4]}-{text[4:6]}-{text[6:]}" if len(text) == 8 and text.isdigit() else text


def summary_lines(report: dict, *, model: str, date) -> list[str]:
  """The text panel: the report's numbers, the model, the date and the warnings, line by line.

  Args:
    report: what `predict` writes per scan (`quantify.quantify_volume` keys:
      lov_ml, lung_volume_ml, poi_percent, num_lesions, class_volumes_ml,
      warnings, and 'dicom' {'patient_id', 'study_date'} when read from DICOM;
      or `quantify.quantify_slice` keys for a 2-D slice: opacity_pixels, ...).
    model: the model's name.
    date: when the images are made (a date, datetime or text).

  Returns:
    Lines of text; undefined values (None, or missing) read 'n/a'.
  """
  dicom = report.get("dicom") or {}
  lines = []
  if dicom.get("patient_id"):
    lines.append(f"Patient ID: {dicom['patient_id']}")
  if dicom.get("study_date"):
    lines.append(f"Study date: {_study_date(dicom['study_date'])}")
  if report.get("name"):
    lines.append(f"Scan: {report['name']}")
  if "opacity_pixels" in report:  # a 2-D slice: sizes in pixels
    lines.append(f"Opacity: {_fmt(report.get('opacity_pixels'), 'pixels')} "
                 f"({_fmt(report.get('opacity_percent_of_image'), '%')} of the image)")
    lines.append(f"Lesions: {_fmt(report.get('num_lesions'))}")
    classes, unit = report.get("class_pixels"), "pixels"
  else:
    lines.append(f"Lung opacification volume (LOV): {_fmt(report.get('lov_ml'), 'ml')}")
    lines.append(f"Lung volume: {_fmt(report.get('lung_volume_ml'), 'ml')}")
    lines.append(f"Percentage of infection (POI): {_fmt(report.get('poi_percent'), '%')}")
    lines.append(f"Lesions: {_fmt(report.get('num_lesions'))}")
    classes, unit = report.get("class_volumes_ml"), "ml"
  if classes is not None:
    lines.append(f"Ground-glass opacity: {_fmt(classes.get('ggo'), unit)}")
    lines.append(f"Consolidation: {_fmt(classes.get('consolidation'), unit)}")
  if "opacity_pixels" in report:
    lines.append("A 2-D slice has no spacing or HU: no LOV, lung volume or POI.")
  lines += ["", f"Model: {model}", f"Report date: {_date_text(date)}"]
  warnings = list(report.get("warnings") or [])
  if warnings:
    lines += ["", "Warnings:"]
    for w in warnings:
      lines += textwrap.wrap(str(w), _WRAP, initial_indent="- ", subsequent_indent="  ")
  return lines


# ----------------------------------------------------------------------------- checks

def _num_classes(report: dict, labels: np.ndarray, what: str) -> int:
  n = report.get("num_classes")
  if n is None:
    n = 3 if ("class_volumes_ml" in report or "class_pixels" in report) else 1
  if n not in (1, 3):
    raise KeyImageError(f"{what}: report num_classes={n!r}; it must be 1 or 3")
  if labels.size:
    low, high = labels.min(), labels.max()
    top = 1 if n == 1 else 2
    if low < 0 or high > top:
      raise KeyImageError(f"{what}: labels span {low}..{high}, outside 0..{top} for a {n}-class "
                          "model; pass the mask this report was made from")
  return n


def _check_request(png_path, pdf_path, image, labels, spacing_xyz, report, model, hu_window):
  png_path, pdf_path = pathlib.Path(png_path), pathlib.Path(pdf_path)
  what = f"key images {png_path}"
  for path, suffix in ((png_path, ".png"), (pdf_path, ".pdf")):
    if path.suffix.lower() != suffix:
      raise KeyImageError(f"{path}: give a file name ending in {suffix}")
    if not path.parent.is_dir():
      raise KeyImageError(f"{path}: folder {path.parent} does not exist; create it first")
  if png_path.resolve() == pdf_path.resolve():
    raise KeyImageError(f"{png_path}: the PNG and PDF paths are the same; give two files")
  image = np.asarray(image)
  labels = _check_labels(labels, what)
  if image.ndim not in (2, 3) or 0 in image.shape:
    raise KeyImageError(f"{what}: image has shape {image.shape}; pass a (z, y, x) HU volume or "
                        "an (H, W) uint8 slice")
  if labels.shape != image.shape:
    raise KeyImageError(f"{what}: labels have shape {labels.shape} but the image {image.shape}; "
                        "pass the mask predicted on this image")
  if image.ndim == 2:
    if image.dtype != np.uint8:
      raise KeyImageError(f"{what}: a 2-D image has dtype {image.dtype}; pass the uint8 slice "
                          "as read (0..255)")
    if spacing_xyz is not None:
      raise KeyImageError(f"{what}: spacing_xyz={spacing_xyz!r} is for volumes; pass None for a "
                          "2-D slice")
  else:
    if image.dtype == bool or not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
      raise KeyImageError(f"{what}: image has dtype {image.dtype}; pass HU as numbers")
    try:
      spacing = tuple(float(s) for s in spacing_xyz)
    except (TypeError, ValueError):
      spacing = ()
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
      raise KeyImageError(f"{what}: spacing_xyz={spacing_xyz!r}; pass the voxel size (x, y, z) "
                          "in mm, three positive numbers")
    try:
      low, high = (float(v) for v in hu_window)
    except (TypeError, ValueError):
      low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
      raise KeyImageError(f"{what}: hu_window={hu_window!r}; pass (low, high) HU with low < high,"
                          " e.g. (-1350, 150)")
  if not isinstance(report, dict):
    raise KeyImageError(f"{what}: report is a {type(report).__name__}; pass the report dict")
  if not isinstance(model, str) or not model.strip():
    raise KeyImageError(f"{what}: model={model!r}; pass the model's name")
  return png_path, pdf_path, image, labels, _num_classes(report, labels, what)


# ----------------------------------------------------------------------------- drawing

def _outline(ax, labels2d: np.ndarray, num_classes: int) -> None:
  """Contours (not fills) of the mask on a 2-D panel, in the class colours.

  Each class is contoured on its bounding box only, padded by one empty pixel
  so that an outline touching the image's edge still closes (along the edge).
  The contour runs half-way between pixel centres, i.e. on the pixels' borders.
  """
  classes = ({1: OPACITY_COLOUR} if num_classes == 1 else CLASS_COLOURS)
  limits = ax.get_xlim(), ax.get_ylim()
  for c, colour in classes.items():
    mask = (labels2d > 0) if num_classes == 1 else (labels2d == c)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
      continue
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = np.pad(mask[r0:r1, c0:c1].astype(np.float32), 1)
    ax.contour(np.arange(c0 - 1, c1 + 1), np.arange(r0 - 1, r1 + 1), crop, levels=[0.5],
               colors=[colour], linewidths=1.0)
  ax.set_xlim(limits[0])  # the padding must not widen the view beyond the image
  ax.set_ylim(limits[1])


def _letters(ax, left: str, right: str, top: str, bottom: str) -> None:
  """Patient directions at the panel's edges (white on a black rim, readable on any tissue)."""
  from matplotlib import patheffects
  style = dict(transform=ax.transAxes, color="white", fontsize=8, fontweight="bold",
               path_effects=[patheffects.withStroke(linewidth=2, foreground="black")])
  ax.text(0.02, 0.5, left, ha="left", va="center", **style)
  ax.text(0.98, 0.5, right, ha="right", va="center", **style)
  ax.text(0.5, 0.98, top, ha="center", va="top", **style)
  ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)


def _legend(ax, num_classes: int) -> None:
  from matplotlib.lines import Line2D
  entries = ([(OPACITY_COLOUR, "opacity")] if num_classes == 1
             else [(CLASS_COLOURS[c], CLASS_LABELS[c]) for c in (1, 2)])
  handles = [Line2D([], [], color=colour, linewidth=2, label=label) for colour, label in entries]
  ax.legend(handles=handles, loc="lower right", title="outline (prediction)", fontsize=9,
            title_fontsize=9, frameon=True)


def _text_panel(ax, lines: Sequence[str], num_classes: int) -> None:
  ax.set_axis_off()
  ax.text(0.0, 1.0, "\n".join(lines), transform=ax.transAxes, ha="left", va="top",
          fontsize=10, linespacing=1.4)
  _legend(ax, num_classes)


def key_image_figure(image: np.ndarray, labels: np.ndarray, *, spacing_xyz, report: dict,
                     model: str, date, hu_window: Sequence[float] = LUNG_WINDOW,
                     title: str | None = None, num_classes: int | None = None):
  """The key-image page as a matplotlib `Figure` on an Agg canvas (nothing is written).

  Arguments as in `write_key_images` (checked there); `num_classes` defaults
  to the report's. The figure is A4 landscape at `DPI`, so its display
  coordinates are the PNG's pixels (from the bottom left).
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  image, labels = np.asarray(image), np.asarray(labels)
  if num_classes is None:
    num_classes = _num_classes(report, labels, "key images")
  fig = Figure(figsize=PAGE_INCHES, dpi=DPI)
  FigureCanvasAgg(fig)
  if title is None:
    title = f"{report['name']}: key images" if report.get("name") else "Key images"
  fig.suptitle(title, fontsize=14, x=0.03, ha="left", y=0.975)
  fig.text(0.97, 0.012, "Outlines are a model's prediction; review them against the images.",
           ha="right", va="bottom", fontsize=7, color="0.4")
  lines = summary_lines(report, model=model, date=date)
  if image.ndim == 2:
    grid = fig.add_gridspec(1, 2, width_ratios=(1.15, 1.0), left=0.03, right=0.97, top=0.9,
                            bottom=0.06, wspace=0.08)
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(image, cmap="gray", vmin=0, vmax=255)
    _outline(ax, labels, num_classes)
    ax.set_title(f"slice: {np.count_nonzero(labels)} opacity pixels", fontsize=10)
    ax.set_axis_off()
    _text_panel(fig.add_subplot(grid[0, 1]), lines, num_classes)
    return fig

  sx, sy, sz = (float(s) for s in spacing_xyz)
  low, high = (float(v) for v in hu_window)
  counts = _slice_counts(labels)
  zs = _choose(counts, KEY_SLICES)
  grid = fig.add_gridspec(2, KEY_SLICES, left=0.03, right=0.97, top=0.9, bottom=0.05,
                          wspace=0.06, hspace=0.16)
  for i, z in enumerate(zs):
    ax = fig.add_subplot(grid[0, i])
    ax.imshow(image[z], cmap="gray", vmin=low, vmax=high, aspect=sy / sx)
    _outline(ax, labels[z], num_classes)
    area_cm2 = counts[z] * sx * sy / 100.0
    volume_ml = counts[z] * sx * sy * sz / 1000.0
    ax.set_title(f"axial z = {z}: {area_cm2:.2f} cm², {volume_ml:.2f} ml", fontsize=10)
    ax.set_axis_off()
    _letters(ax, "R", "L", "A", "P")
  rows = np.zeros(labels.shape[1], np.int64)
  for z in np.flatnonzero(counts):
    rows += np.count_nonzero(labels[z] > 0, axis=1)
  y = int(np.argmax(rows)) if rows.any() else labels.shape[1] // 2
  ax = fig.add_subplot(grid[1, 0])
  ax.imshow(image[:, y, :], cmap="gray", vmin=low, vmax=high, origin="lower", aspect=sz / sx)
  _outline(ax, labels[:, y, :], num_classes)
  ax.set_title(f"coronal y = {y} ({'most opacity' if rows.any() else 'middle'})", fontsize=10)
  ax.set_xticks([])
  ax.set_yticks(sorted(zs), [f"z {z}" for z in sorted(zs)], fontsize=7)
  for side in ("top", "right", "bottom", "left"):
    ax.spines[side].set_visible(False)
  _letters(ax, "R", "L", "S", "I")
  _text_panel(fig.add_subplot(grid[1, 1:]), lines, num_classes)
  return fig


def write_key_images(png_path: str | pathlib.Path, pdf_path: str | pathlib.Path,
                     image: np.ndarray, labels: np.ndarray, *, spacing_xyz, report: dict,
                     model: str, date, hu_window: Sequence[float] = LUNG_WINDOW,
                     title: str | None = None) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes the key-image page of one scan as a PNG and a one-page PDF.

  Args:
    png_path: the PNG to write (e.g. `<name>_report.png`), at `DPI`.
    pdf_path: the PDF to write (e.g. `<name>_report.pdf`), one A4 page.
    image: (z, y, x) HU on the canonical grid, or an (H, W) uint8 slice.
    labels: the predicted mask, the image's shape: 0/1, or 0/1 ground glass/
      2 consolidation for a 3-class model.
    spacing_xyz: voxel size (x, y, z) in mm; None for a 2-D slice.
    report: the scan's report (see `summary_lines`); its 'num_classes' (or
      class volumes) says whether the model has three classes.
    model: the model's name, shown in the text panel.
    date: when the images are made, shown in the text panel.
    hu_window: (low, high) HU shown from black to white (volumes only).
    title: page title; default '<report name>: key images'.

  Returns:
    (png_path, pdf_path), each written under a temporary name and renamed.

  Raises:
    KeyImageError: bad arrays, spacing, window, report or paths; nothing is written.
  """
  png_path, pdf_path, image, labels, num_classes = _check_request(
      png_path, pdf_path, image, labels, spacing_xyz, report, model, hu_window)
  fig = key_image_figure(image, labels, spacing_xyz=spacing_xyz, report=report, model=model,
                         date=date, hu_window=hu_window, title=title, num_classes=num_classes)
  fileio.atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
  # No creation date in the PDF: the same scan gives the same file.
  metadata = {"Title": fig.get_suptitle(), "Creator": "scoat_jax", "CreationDate": None}
  fileio.atomic_write(pdf_path, lambda tmp: fig.savefig(tmp, format="pdf", metadata=metadata))
  return png_path, pdf_path
