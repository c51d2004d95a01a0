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

import math
import pathlib
from collections.abc import Sequence

import numpy as np

from scoat_jax.common import fileio
from scoat_jax.data import palette
from scoat_jax.inference.key_image_text import summary_lines  # noqa: F401 (ki.summary_lines)

KEY_SLICES = 3
MIN_GAP_MM = 15.0  # the spread wanted between key axial slices
PAGE_INCHES = (297 / 25.4, 210 / 25.4)  # A4 landscape
DPI = 150
LUNG_WINDOW = (-1350.0, 150.0)  # W1500 / L-600
_TICK_GAP_PX = 18  # coronal-axis labels closer than this share one label


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


def key_slices(labels: np.ndarray, k: int = KEY_SLICES, *, lung: np.ndarray | None = None,
               spacing_z: float | None = None, min_gap_mm: float = MIN_GAP_MM) -> list[int]:
  """The k axial slices to show: through the lungs, most opacity first, spread apart.

  Candidates are the slices through the lung mask (every slice when `lung`
  is None or empty). Slices with opacity (label > 0) come first, by
  decreasing opacity, ties by lower z, each at least `min_gap_mm` from those
  already chosen (with `spacing_z`, the slice thickness in mm; no gap without
  it); when the disease allows no more such slices, the most opaque remaining
  ones follow. When fewer than k candidates show opacity, the m remaining
  places go to the centres of m equal slabs of the candidates' extent
  [a, b), z = a + floor((i + 1/2) * (b - a) / m), each moved to the nearest
  candidate not yet chosen (lower z on ties); they follow in increasing z. No
  slice appears twice and at most as many slices as candidates are returned.

  Args:
    labels: (z, y, x) integer mask.
    k: how many slices (>= 1).
    lung: (z, y, x) lung mask of the same grid, or None.
    spacing_z: the distance between slices in mm (for `min_gap_mm`).
    min_gap_mm: the spread wanted between chosen opacity slices.

  Returns:
    distinct z indices.
  """
  labels = _check_labels(labels, "key_slices")
  if labels.ndim != 3 or labels.shape[0] == 0:
    raise KeyImageError(f"key_slices: labels have shape {labels.shape}; pass a (z, y, x) mask "
                        "with at least one slice")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise KeyImageError(f"key_slices: k={k!r}; pass a whole number of slices >= 1")
  gap = min_gap_mm / float(spacing_z) if spacing_z else 0.0
  return _choose(_slice_counts(labels), int(k), _lung_slices(lung, labels.shape), gap)


def _lung_slices(lung, shape) -> np.ndarray | None:
  """Which axial slices hold lung (None: no lung mask, or an empty one)."""
  if lung is None:
    return None
  lung = np.asarray(lung)
  if lung.shape != tuple(shape):
    raise KeyImageError(f"key images: the lung mask has shape {lung.shape} but the labels "
                        f"{tuple(shape)}; pass the scan's own lung mask")
  found = np.array([lung[z].any() for z in range(shape[0])])
  return found if found.any() else None


def _choose(counts: np.ndarray, k: int, allowed: np.ndarray | None = None,
            gap: float = 0.0) -> list[int]:
  pool = np.flatnonzero(np.ones(len(counts), bool) if allowed is None else allowed)
  k = min(k, pool.size)
  opaque = sorted((int(z) for z in pool if counts[z] > 0), key=lambda z: (-counts[z], z))
  chosen: list[int] = []
  for z in opaque:  # spread over the disease
    if len(chosen) < k and all(abs(z - c) >= gap for c in chosen):
      chosen.append(z)
  for z in opaque:  # the disease allows no more spread: the next most opaque
    if len(chosen) < k and z not in chosen:
      chosen.append(z)
  m = k - len(chosen)
  taken, fill = set(chosen), []
  lo, hi = int(pool[0]), int(pool[-1]) + 1
  free = set(pool.tolist())
  for i in range(m):
    target = lo + (2 * i + 1) * (hi - lo) // (2 * m)
    for d in range(hi - lo):
      z = next((c for c in (target - d, target + d) if c in free and c not in taken), None)
      if z is not None:
        break
    taken.add(z)
    fill.append(z)
  return chosen + sorted(fill)


def table_positions(geometry) -> np.ndarray:
  """Each canonical axial slice's table position in mm: the patient z (LPS, superior +) of
  its first voxel, as a viewer's slice location reads for an axial series."""
  direction = np.asarray(geometry.direction, np.float64).reshape(3, 3)
  k = np.arange(int(geometry.size[2]))
  return float(geometry.origin[2]) + direction[2, 2] * float(geometry.spacing[2]) * k


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
  """Contours (not fills) of the mask on a 2-D panel, in the palette's colours.

  Each class is contoured on its bounding box only, padded by one empty pixel
  so that an outline touching the image's edge still closes (along the edge).
  The contour runs half-way between pixel centres, i.e. on the pixels' borders.
  """
  limits = ax.get_xlim(), ax.get_ylim()
  for c in palette.LABEL_NAMES[num_classes]:
    mask = (labels2d > 0) if num_classes == 1 else (labels2d == c)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
      continue
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = np.pad(mask[r0:r1, c0:c1].astype(np.float32), 1)
    ax.contour(np.arange(c0 - 1, c1 + 1), np.arange(r0 - 1, r1 + 1), crop, levels=[0.5],
               colors=[palette.hex_colour(c)], linewidths=1.0)
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


def _legend(fig, num_classes: int) -> None:
  """The outline colours, at the page's top right (beside the title, clear of every panel)."""
  from matplotlib.lines import Line2D
  handles = [Line2D([], [], color=palette.hex_colour(c), linewidth=2, label=name)
             for c, name in palette.LABEL_NAMES[num_classes].items()]
  fig.legend(handles=handles, loc="upper right", bbox_to_anchor=(0.97, 0.995), ncols=3,
             fontsize=9, frameon=False, handlelength=1.6, columnspacing=1.2, borderaxespad=0.2)


def _text_panel(ax, lines: Sequence[str]) -> None:
  """The report's lines, the font shrunk (down to 6 pt) so that they fit the panel."""
  ax.set_axis_off()
  fig = ax.get_figure()
  height_pt = ax.get_position().height * fig.get_figheight() * 72
  size = max(6.0, min(10.0, height_pt / (1.4 * max(len(lines), 1))))
  ax.text(0.0, 1.0, "\n".join(lines), transform=ax.transAxes, ha="left", va="top",
          fontsize=size, linespacing=1.4)


def _window_text(low: float, high: float) -> str:
  return f"window W{high - low:g} L{(high + low) / 2:g} HU ({low:g} to {high:g})"


def _tick_groups(zs: Sequence[int], names: Sequence[str], px_per_slice: float):
  """Coronal-axis ticks: key slices closer than `_TICK_GAP_PX` on the page share one label."""
  order = sorted(range(len(zs)), key=lambda i: zs[i])
  groups: list[list[int]] = []
  for i in order:
    if groups and (zs[i] - zs[groups[-1][0]]) * px_per_slice < _TICK_GAP_PX:
      groups[-1].append(i)
    else:
      groups.append([i])
  return ([float(np.mean([zs[i] for i in g])) for g in groups],
          [",".join(names[i] for i in g) for g in groups])


def _coronal_row(lung: np.ndarray | None, labels: np.ndarray) -> int:
  """The coronal row y through the lungs: their centre front to back (middle without lung)."""
  if lung is None or not np.asarray(lung).any():
    return labels.shape[1] // 2
  rows = np.zeros(labels.shape[1], np.int64)
  for z in range(lung.shape[0]):
    rows += np.count_nonzero(lung[z], axis=1)
  return int(np.rint(np.arange(rows.size) @ rows / rows.sum()))


def key_image_figure(image: np.ndarray, labels: np.ndarray, *, spacing_xyz, report: dict,
                     model: str, date, hu_window: Sequence[float] = LUNG_WINDOW,
                     title: str | None = None, num_classes: int | None = None,
                     lung: np.ndarray | None = None, table_mm: Sequence[float] | None = None,
                     instance_number=None):
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
  no_lung = lung is not None and image.ndim == 3 and not np.asarray(lung).any()
  if no_lung:
    title += " (no lung found: not quantified)"
  fig.suptitle(title, fontsize=14, x=0.03, ha="left", y=0.975)
  _legend(fig, num_classes)
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
    _text_panel(fig.add_subplot(grid[0, 1]), lines)
    return fig

  sx, sy, sz = (float(s) for s in spacing_xyz)
  low, high = (float(v) for v in hu_window)
  fig.text(0.03, 0.012, f"Every panel: {_window_text(low, high)}.", ha="left", va="bottom",
           fontsize=7, color="0.4")
  counts = _slice_counts(labels)
  zs = _choose(counts, KEY_SLICES, _lung_slices(lung, labels.shape), MIN_GAP_MM / sz)
  names = [str(i + 1) for i in range(len(zs))]
  where = (np.asarray(table_mm, np.float64) if table_mm is not None
           else np.arange(labels.shape[0]) * sz)
  grid = fig.add_gridspec(2, KEY_SLICES, left=0.03, right=0.97, top=0.9, bottom=0.05,
                          wspace=0.06, hspace=0.2)
  for i, z in enumerate(zs):
    ax = fig.add_subplot(grid[0, i])
    ax.imshow(image[z], cmap="gray", vmin=low, vmax=high, aspect=sy / sx)
    _outline(ax, labels[z], num_classes)
    number = instance_number(z) if instance_number is not None else None
    place = "table" if table_mm is not None else "from slice 0:"
    head = f"{names[i]}: axial z {z}, {place} {where[z]:.1f} mm"
    if number is not None:
      head += f", image {number}"
    area_cm2 = counts[z] * sx * sy / 100.0
    volume_ml = counts[z] * sx * sy * sz / 1000.0
    ax.set_title(f"{head}\nopacity {area_cm2:.2f} cm², {volume_ml:.2f} ml", fontsize=9)
    ax.set_axis_off()
    _letters(ax, "R", "L", "A", "P")
  y = _coronal_row(lung, labels)
  ax = fig.add_subplot(grid[1, 0])
  ax.imshow(image[:, y, :], cmap="gray", vmin=low, vmax=high, origin="lower", aspect=sz / sx)
  _outline(ax, labels[:, y, :], num_classes)
  where_y = ("no lung found: middle row" if no_lung else
             "through the lungs" if lung is not None else "middle row")
  ax.set_title(f"coronal y {y}, {where_y}", fontsize=9)
  ax.apply_aspect()  # the panel's size on the page, for the axis labels (no draw needed)
  px_per_slice = ax.get_position().height * fig.bbox.height / max(labels.shape[0], 1)
  ticks, tick_names = _tick_groups(zs, names, px_per_slice)
  ax.set_xticks([])
  ax.set_yticks(ticks, tick_names, fontsize=7)
  for side in ("top", "right", "bottom", "left"):
    ax.spines[side].set_visible(False)
  _letters(ax, "R", "L", "S", "I")
  if no_lung:
    ax.text(0.5, 0.5, "no lung found", transform=ax.transAxes, ha="center", va="center",
            fontsize=12, color="white", bbox=dict(facecolor="black", edgecolor="white"))
  _text_panel(fig.add_subplot(grid[1, 1:]), lines)
  return fig


def write_key_images(png_path: str | pathlib.Path, pdf_path: str | pathlib.Path,
                     image: np.ndarray, labels: np.ndarray, *, spacing_xyz, report: dict,
                     model: str, date, hu_window: Sequence[float] = LUNG_WINDOW,
                     title: str | None = None, lung: np.ndarray | None = None,
                     table_mm: Sequence[float] | None = None,
                     instance_number=None) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes the key-image page of one scan as a PNG and a one-page PDF.

  Args:
    png_path: the PNG to write (e.g. `<name>_report.png`), at `DPI`.
    pdf_path: the PDF to write (e.g. `<name>_report.pdf`), one A4 page.
    image: (z, y, x) HU on the canonical grid, or an (H, W) uint8 slice.
    labels: the predicted mask, the image's shape: 0/1, or 0/1 ground glass/
      2 consolidation for a 3-class model (the labels the report counts).
    spacing_xyz: voxel size (x, y, z) in mm; None for a 2-D slice.
    report: the scan's report (see `summary_lines`); its 'num_classes' (or
      class volumes) says whether the model has three classes, its
      'lung_rule' which rule made the labels.
    model: the model's name, shown in the text panel.
    date: when the images are made, shown in the text panel.
    hu_window: (low, high) HU shown from black to white (volumes only).
    title: page title; default '<report name>: key images'.
    lung: the scan's lung mask (volumes): key slices are chosen among the
      slices through it and the coronal panel crosses it; an empty mask
      draws the page's "no lung found" state.
    table_mm: each axial slice's table position in mm (`table_positions`);
      None: positions from slice 0.
    instance_number: called with an axial index, the DICOM InstanceNumber a
      viewer shows for that slice (or None); None for non-DICOM scans.

  Returns:
    (png_path, pdf_path), each written under a temporary name and renamed.

  Raises:
    KeyImageError: bad arrays, spacing, window, report or paths; nothing is written.
  """
  png_path, pdf_path, image, labels, num_classes = _check_request(
      png_path, pdf_path, image, labels, spacing_xyz, report, model, hu_window)
  if lung is not None and np.shape(lung) != labels.shape:
    raise KeyImageError(f"key images {png_path}: the lung mask has shape {np.shape(lung)} but "
                        f"the labels {labels.shape}; pass the scan's own lung mask")
  if table_mm is not None and len(table_mm) != labels.shape[0]:
    raise KeyImageError(f"key images {png_path}: {len(table_mm)} table positions for "
                        f"{labels.shape[0]} slices; pass one per axial slice")
  fig = key_image_figure(image, labels, spacing_xyz=spacing_xyz, report=report, model=model,
                         date=date, hu_window=hu_window, title=title, num_classes=num_classes,
                         lung=lung, table_mm=table_mm, instance_number=instance_number)
  fileio.atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
  # No creation date in the PDF: the same scan gives the same file.
  metadata = {"Title": fig.get_suptitle(), "Creator": "scoat_jax", "CreationDate": None}
  fileio.atomic_write(pdf_path, lambda tmp: fig.savefig(tmp, format="pdf", metadata=metadata))
  return png_path, pdf_path
