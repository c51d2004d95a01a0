r"""Scoring masks from any tool against reference masks: `python -m scoat_jax.evaluate`.

    python -m scoat_jax.evaluate --predictions=out/ --references=labelsTs/ --output=eval/
    python -m scoat_jax.evaluate --predictions=DIR --references=DIR --output=DIR \
        --labels=1,2 --tolerance_mm=2.0

Pairing: a prediction `<name>.<ext>` or `<name>_mask.<ext>` (as `predict`
names its masks) scores against the reference `<name>.<ext>`, ext being
.nii.gz, .nii, .mha, .mhd, .nrrd or .png (the two extensions may differ;
hidden files, other files and `predict`'s `_probability`/`_attention` outputs
are passed over). Every reference must have a prediction and every prediction
a reference: an unpaired file is an error naming it, so that nobody scores a
subset by accident; the fix is to add the missing file or move the unpaired
one out of its folder. Two files claiming one case (`a.nii.gz` and
`a_mask.nii.gz`, or `a.nii` and `a.nii.gz`) are an error too.

Checks before anything is scored: a prediction and its reference have the same
size and, for volumes, spacing and origin within 1e-3 mm and direction cosines
within 1e-4 (a mismatch names both files and what differs); PNGs and volumes
are not mixed (distances would mix pixels and mm). Voxel values must be
non-negative integer labels: a probability map is refused, whether stored as
non-integer values or as integer grey levels (any mask, NIfTI, MHA, NRRD or
grey PNG, with more than `MAX_LEVELS` distinct values; a palette PNG is
exempt, its indices are labels). A PNG is read as stored (palette indices, or
grey values); a PNG holding only 0 and 255 (a binary mask like COVID-SemiSeg's
GT) reads 255 as label 1.

Metrics per case, for "any opacity" (label > 0) and, with --labels, for each
listed label on its own: the paper's six (`metrics.case_metrics`, with its
empty-mask conventions), both HD95 conventions (`hd95_pooled_mm`,
`hd95_max_directed_mm`) and the surface Dice at --tolerance_mm
(`surface_dice`, DeepMind's definition: surfels on the voxel-corner grid
weighted by their marching-cubes area), see `scoat_jax.evaluation.surface`.
Distances are in mm from the volumes' spacing, in pixels for PNG masks (the
column names stay the same; summary.json says which).

Writes into --output, after every case is scored (nothing at all on an
error): `per_case.csv` (one row per case: names, metrics, voxel counts; per
label the same columns suffixed `_label<k>`; +inf where one mask is empty)
and `summary.json` (per metric the mean over cases under its own name, the
population std under 'std', and under 'n_excluded' how many cases were left
out of the mean for an infinite distance; a dict per label under 'labels';
the number of cases and the settings).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import pathlib
import re
from collections.abc import Sequence

import numpy as np

from scoat_jax.common import fileio
from scoat_jax.data import ct_io, writers
from scoat_jax.evaluation import metrics, surface

SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".png")
OUTPUTS = ("summary.json", "per_case.csv")
SPACING_TOL_MM = 1e-3   # spacing and origin
DIRECTION_TOL = 1e-4    # direction cosines
# More distinct values than this is a probability map or photo, not labels (opacity
# masks have 2-4 labels; a uint8 probability map has up to 256 grey levels).
MAX_LEVELS = 16
DISTANCES = ("hd95_pooled_mm", "hd95_max_directed_mm")
COLUMNS = metrics.METRIC_NAMES + DISTANCES + ("surface_dice",)
COUNTS = ("pred_voxels", "true_voxels", "n_pred_regions", "n_true_regions")
DEFINITIONS = {
    "any_opacity": "label > 0 (a PNG holding only 0 and 255 reads 255 as label 1)",
    "hd95_pooled_mm": "95th percentile of the union of both directed surface-distance sets "
                      "(scoat_jax.evaluation.metrics.hd95)",
    "hd95_max_directed_mm": "larger of the two directed 95th percentiles over surface voxels "
                            "(MONAI compute_hausdorff_distance(percentile=95); not DeepMind's "
                            "compute_robust_hausdorff, which weights surfels by area and can "
                            "differ by the distance to small far blobs)",
    "surface_dice": "share of both surfaces' area within tolerance_mm of the other (Nikolov et "
                    "al. 2021, DeepMind compute_surface_dice_at_tolerance): surfels on the "
                    "voxel-corner grid weighted by their marching-cubes area",
    "empty_masks": "both empty: DSC..RLR 1, distances 0, surface_dice 1; one empty: "
                   "distances inf (left out of the mean, counted in n_excluded), surface_dice 0",
}


class EvaluationError(ValueError):
  """A bad evaluation input or flag; one line naming the file or flag and the fix."""


@dataclasses.dataclass(frozen=True)
class Case:
  """One prediction paired with its reference."""
  name: str
  prediction: pathlib.Path
  reference: pathlib.Path


def _natural(name: str):
  return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def _stem(path: pathlib.Path) -> str | None:
  low = path.name.lower()
  suffix = next((s for s in SUFFIXES if low.endswith(s)), None)
  return None if suffix is None else path.name[:-len(suffix)]


def _few(names: Sequence[str]) -> str:
  shown = ", ".join(names[:5])
  return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _mask_files(folder: pathlib.Path, flag: str, *, predictions: bool) -> dict[str, pathlib.Path]:
  """{case stem: file} of the mask files in a folder."""
  if not folder.is_dir():
    what = "file" if folder.exists() else "such folder"
    raise EvaluationError(f"{flag}={folder}: no {what}; give the folder holding the "
                          f"{'predicted' if predictions else 'reference'} masks.")
  found: dict[str, pathlib.Path] = {}
  for child in sorted(folder.iterdir(), key=lambda p: _natural(p.name)):
    stem = _stem(child)
    if stem is None or child.name.startswith(".") or not child.is_file():
      continue
    if predictions and writers.is_output(child.name) and not stem.endswith("_mask"):
      continue  # predict's probability maps and attention overlays
    if stem in found:
      raise EvaluationError(f"{flag}={folder}: {found[stem].name} and {child.name} are both case "
                            f"'{stem}'; keep one.")
    found[stem] = child
  if not found:
    raise EvaluationError(f"{flag}={folder}: holds no mask ({', '.join(SUFFIXES)}); point it at "
                          "the folder of masks.")
  return found


def pair_files(predictions: str | pathlib.Path, references: str | pathlib.Path) -> list[Case]:
  """Pairs every prediction with its reference by name (see the module docstring).

  Raises:
    EvaluationError: a missing or empty folder, an unpaired file, two files for one case.
  """
  predictions, references = pathlib.Path(predictions), pathlib.Path(references)
  refs = _mask_files(references, "--references", predictions=False)
  preds = _mask_files(predictions, "--predictions", predictions=True)
  claims: dict[str, pathlib.Path] = {}
  orphans = []
  for stem, path in preds.items():
    name = stem if stem in refs else stem[:-len("_mask")] if stem.endswith("_mask") else None
    if name not in refs:
      orphans.append(path.name)
    elif name in claims:
      raise EvaluationError(f"--predictions={predictions}: {claims[name].name} and {path.name} "
                            f"both claim case '{name}'; keep one.")
    else:
      claims[name] = path
  missing = [refs[n].name for n in refs if n not in claims]
  if missing:
    raise EvaluationError(f"--references={references}: no prediction for {_few(missing)} (looked "
                          f"for <name>.<ext> or <name>_mask.<ext> in {predictions}); predict those "
                          "cases too or move their references out of the folder.")
  if orphans:
    raise EvaluationError(f"--predictions={predictions}: no reference for {_few(orphans)} in "
                          f"{references}; add their references or move those predictions out of "
                          "the folder.")
  return [Case(n, claims[n], refs[n]) for n in refs]


def parse_labels(spec: str | Sequence) -> tuple[int, ...]:
  """'1,2' or ['1', '2'] -> (1, 2): the class labels to score one by one."""
  items = spec.split(",") if isinstance(spec, str) else [str(s) for s in spec]
  items = [s.strip() for s in items if s.strip()]
  text = ",".join(items)
  try:
    labels = tuple(int(s) for s in items)
  except ValueError:
    labels = (0,)
  if any(k < 1 for k in labels):
    raise EvaluationError(f"--labels={text}: give positive integer labels separated by commas, "
                          "e.g. --labels=1,2 (0 is background; any opacity is always scored).")
  twice = sorted({k for k in labels if labels.count(k) > 1})
  if twice:
    raise EvaluationError(f"--labels={text}: label {twice[0]} is listed twice; list each once.")
  return labels


# ----------------------------------------------------------------------------- reading

def _header(path: pathlib.Path) -> dict:
  """{'kind': 'png'|'volume', 'size', and for volumes 'spacing', 'origin', 'direction'}."""
  if path.name.lower().endswith(".png"):
    from PIL import Image, UnidentifiedImageError
    try:
      with Image.open(path) as im:
        return {"kind": "png", "size": tuple(im.size)}
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
      raise EvaluationError(f"{path}: cannot decode this PNG ({str(e).splitlines()[0]}); "
                            "replace the corrupt file.") from None
  import SimpleITK as sitk
  reader = sitk.ImageFileReader()
  reader.SetFileName(str(path))
  try:
    with ct_io.quiet_itk():
      reader.ReadImageInformation()
  except RuntimeError as e:
    raise EvaluationError(f"{path}: unreadable or corrupt image ({ct_io.first_line(e)}); "
                          "export it again.") from None
  if reader.GetNumberOfComponents() != 1 or reader.GetDimension() not in (2, 3):
    raise EvaluationError(f"{path}: a {reader.GetDimension()}-D image with "
                          f"{reader.GetNumberOfComponents()} value(s) per voxel; a mask is a 2-D "
                          "or 3-D image of one label per voxel.")
  return {"kind": "volume", "size": tuple(reader.GetSize()), "spacing": reader.GetSpacing(),
          "origin": reader.GetOrigin(), "direction": reader.GetDirection()}


def _numbers(values) -> str:
  return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def check_geometry(case: Case, pred: dict, ref: dict) -> None:
  """Raises EvaluationError naming both files and what differs between their grids."""
  def fail(what: str):
    raise EvaluationError(f"{case.prediction}: {what} differs from its reference "
                          f"{case.reference}; resample the prediction onto the reference's grid.")
  if pred["kind"] != ref["kind"]:
    fail(f"the file kind ({pred['kind']} vs {ref['kind']})")
  if pred["size"] != ref["size"]:
    fail(f"the size {_numbers(pred['size'])} vs {_numbers(ref['size'])}")
  for key, tol, unit in (("spacing", SPACING_TOL_MM, " mm"), ("origin", SPACING_TOL_MM, " mm"),
                         ("direction", DIRECTION_TOL, "")):
    if key in ref and np.max(np.abs(np.subtract(pred[key], ref[key]))) > tol:
      fail(f"the {key} {_numbers(pred[key])} vs {_numbers(ref[key])}{unit}")


def _check_labels(arr: np.ndarray, path: pathlib.Path) -> np.ndarray:
  if arr.dtype.kind == "f":
    bad = ~np.isfinite(arr) | (arr != np.round(arr))
    if bad.any():
      raise EvaluationError(f"{path}: holds non-integer values (e.g. {arr[bad].flat[0]:g}), like "
                            "a probability map; save integer labels (threshold it, e.g. p >= 0.5).")
  elif arr.dtype.kind not in "iub":
    raise EvaluationError(f"{path}: voxel type {arr.dtype} is not a label type; save integer "
                          "labels.")
  if arr.size and arr.min() < 0:
    raise EvaluationError(f"{path}: holds negative values (min {arr.min():g}); labels are 0 "
                          "(background), 1, 2, ...: relabel the mask.")
  return arr.astype(np.int64) if arr.dtype.kind == "f" else arr  # a CT-sized int64 copy costs GBs


def _distinct(arr: np.ndarray) -> np.ndarray:
  """The distinct values of non-negative integer labels (by a histogram when they are small)."""
  if arr.size and int(arr.max()) < 2 ** 16:
    return np.flatnonzero(np.bincount(arr.ravel().astype(np.int64, copy=False)))
  return np.unique(arr)


def _check_levels(path: pathlib.Path, values: np.ndarray) -> None:
  if values.size > MAX_LEVELS:
    raise EvaluationError(f"{path}: {values.size} distinct values (up to {values[-1]:g}), like a "
                          "probability map or a photo, not labels; save label indices (0, 1, "
                          "2, ...; threshold a probability map, e.g. p >= 0.5) or a 0/255 "
                          "binary mask.")


def _read_png(path: pathlib.Path) -> np.ndarray:
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(path) as im:
      palette = im.mode in ("P", "PA")
      if im.mode in ("RGB", "RGBA"):
        rgb = np.asarray(im.convert("RGB"))
        if np.any(rgb != rgb[..., :1]):
          raise EvaluationError(f"{path}: a colour PNG; save the mask with one label per pixel "
                                "(palette indices or grey values).")
        arr = rgb[..., 0]
      else:
        arr = np.asarray(im.getchannel(0) if im.mode in ("LA", "PA") else im)
  except (OSError, UnidentifiedImageError, SyntaxError) as e:
    raise EvaluationError(f"{path}: cannot decode this PNG ({str(e).splitlines()[0]}); "
                          "replace the corrupt file.") from None
  arr = _check_labels(arr, path)
  values = _distinct(arr)
  if values.size == 2 and values[0] == 0 and values[1] == 255:
    return (arr > 0).astype(np.uint8)
  if not palette:
    _check_levels(path, values)
  return arr


def read_labels(path: str | pathlib.Path) -> tuple[np.ndarray, tuple[float, ...] | None]:
  """A mask's integer labels and voxel size per array axis (None for a PNG).

  Returns:
    (labels, spacing): an integer (or bool) array ((z, y, x) for a volume,
    (H, W) for a PNG) and the spacing in mm in the same axis order, or None
    for a PNG.

  Raises:
    EvaluationError, ct_io.CTError: unreadable file, non-integer or negative values.
  """
  path = pathlib.Path(path)
  if path.name.lower().endswith(".png"):
    return _read_png(path), None
  import SimpleITK as sitk
  ct_io.check_nifti_complete(path)
  try:
    with ct_io.quiet_itk():
      image = sitk.ReadImage(str(path))
  except RuntimeError as e:
    raise EvaluationError(f"{path}: unreadable or corrupt image ({ct_io.first_line(e)}); "
                          "export it again.") from None
  arr = _check_labels(sitk.GetArrayFromImage(image), path)
  _check_levels(path, _distinct(arr))
  return arr, tuple(float(v) for v in reversed(image.GetSpacing()))


# ----------------------------------------------------------------------------- scoring

def score_block(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...] | None, *,
                tolerance: float) -> dict:
  """Every metric of one binary pair: COLUMNS, then COUNTS."""
  r = metrics.case_metrics(pred, truth, spacing=spacing)
  s = surface.surface_metrics(pred, truth, tolerance=tolerance, spacing=spacing)
  out = {m: r[m] for m in metrics.METRIC_NAMES}
  out.update(hd95_pooled_mm=s["hd95_pooled"], hd95_max_directed_mm=s["hd95_max_directed"],
             surface_dice=s["surface_dice"])
  out.update({k: r[k] for k in COUNTS})
  return out


def score_case(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...] | None, *,
               labels: Sequence[int] = (), tolerance: float = 1.0) -> dict:
  """Any-opacity metrics, then each label's suffixed `_label<k>`, of one pair of label arrays."""
  row = score_block(pred > 0, truth > 0, spacing, tolerance=tolerance)
  for k in labels:
    block = score_block(pred == k, truth == k, spacing, tolerance=tolerance)
    row.update({f"{m}_label{k}": v for m, v in block.items()})
  return row


def _summary_block(rows: Sequence[dict], suffix: str) -> dict:
  stats = metrics.aggregate([{m: row[m + suffix] for m in COLUMNS} for row in rows])
  finite = lambda v: v if np.isfinite(v) else None
  block = {m: finite(stats[m]["mean"]) for m in COLUMNS}
  block["std"] = {m: finite(stats[m]["std"]) for m in COLUMNS}
  block["n_excluded"] = {m: stats[m]["n_inf"] + stats[m]["n_nan"] for m in DISTANCES}
  return block


def summarise(rows: Sequence[dict], *, labels: Sequence[int], settings: dict) -> dict:
  """summary.json's content: means per metric (any opacity, then per label), n, settings."""
  summary = {"n_cases": len(rows), **_summary_block(rows, "")}
  if labels:
    summary["labels"] = {str(k): _summary_block(rows, f"_label{k}") for k in labels}
  summary["settings"] = settings
  return summary


def _csv(rows: Sequence[dict]) -> str:
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
  writer.writeheader()
  writer.writerows(rows)
  return buf.getvalue()


def _check_output(output: pathlib.Path, overwrite: bool) -> None:
  if output.exists() and not output.is_dir():
    raise EvaluationError(f"--output={output}: is a file; give a folder.")
  existing = [n for n in OUTPUTS if (output / n).exists()]
  if existing and not overwrite:
    raise EvaluationError(f"--output={output}: holds an earlier evaluation ({existing[0]}); "
                          "choose a new folder or pass --overwrite.")


def run(predictions: str, references: str, output: str, *, labels: str | Sequence = (),
        tolerance_mm: float = 1.0, overwrite: bool = False) -> dict:
  """Pairs, checks and scores every case, then writes per_case.csv and summary.json.

  Args:
    predictions: folder of predicted masks.
    references: folder of reference masks.
    output: folder for the two files (created only once every case is scored).
    labels: class labels to score one by one beside any opacity ('1,2' or [1, 2]).
    tolerance_mm: the surface Dice tolerance (pixels for PNG masks), >= 0.
    overwrite: replace an earlier evaluation in `output`.

  Returns:
    The summary (as written to summary.json).

  Raises:
    EvaluationError, ct_io.CTError: any bad input or flag; nothing is written then.
  """
  labels = parse_labels(labels)
  if not np.isfinite(tolerance_mm) or tolerance_mm < 0:
    raise EvaluationError(f"--tolerance_mm={tolerance_mm}: give a distance >= 0 (mm; pixels for "
                          "PNG masks), e.g. --tolerance_mm=1.0.")
  output = pathlib.Path(output).expanduser()
  _check_output(output, overwrite)
  cases = pair_files(pathlib.Path(predictions).expanduser(),
                     pathlib.Path(references).expanduser())
  headers = []
  for case in cases:
    headers.append(_header(case.reference))
    check_geometry(case, _header(case.prediction), headers[-1])
  kinds = {h["kind"] for h in headers}
  if len(kinds) > 1:
    png = next(c.reference.name for c, h in zip(cases, headers) if h["kind"] == "png")
    vol = next(c.reference.name for c, h in zip(cases, headers) if h["kind"] == "volume")
    raise EvaluationError(f"--references={references}: mixes PNG ({png}) and volume ({vol}) "
                          "masks, whose distances are in pixels and mm; evaluate them apart.")
  rows = []
  for case in cases:
    pred, _ = read_labels(case.prediction)
    truth, spacing = read_labels(case.reference)
    rows.append({"case": case.name, "prediction": case.prediction.name,
                 "reference": case.reference.name,
                 **score_case(pred, truth, spacing, labels=labels, tolerance=tolerance_mm)})
  absent = [k for k in labels
            if not any(r[f"pred_voxels_label{k}"] or r[f"true_voxels_label{k}"] for r in rows)]
  if absent:
    from absl import logging
    logging.warning("label(s) %s occur in no prediction and no reference: every case scores "
                    "1.0 there (both masks empty); check --labels.", absent)
  settings = {"predictions": str(predictions), "references": str(references),
              "labels": list(labels), "tolerance_mm": float(tolerance_mm),
              "distance_unit": "pixel" if kinds == {"png"} else "mm", **DEFINITIONS}
  summary = summarise(rows, labels=labels, settings=settings)
  output.mkdir(parents=True, exist_ok=True)
  fileio.write_text(_csv(rows), output / "per_case.csv")
  writers.write_json(summary, output / "summary.json")
  return summary
