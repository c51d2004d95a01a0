"""Post-processing of predicted masks, and its choice on cross-validation.

Predicted opacity often holds small false-positive components (low region
precision, RLP) and, on some slices, marks outside the lung (heart,
mediastinum). Two rules remove whole connected components of the opacity
mask (26-connected in 3-D, 8-connected in 2-D; every class of a 3-class
mask with them):

* `min_size`: components smaller than a volume in mm^3 (volumes) or an area
  in pixels (2-D slices without spacing);
* `inside_lung`: components with less than half of their voxels inside the
  lung mask (volumes in HU only: 8-bit slices have no lung mask).

`choose` picks the rule as nnU-Net's `determine_postprocessing` does: on the
folds' validation predictions, every candidate is scored by the mean DSC over
cases, and a rule is kept only where it raises mean DSC by at least
`MIN_GAIN` over no post-processing; what it does to RLP is reported beside.
The rule is stored in an exported bundle and applied by `predict` unless
`--no_postprocessing`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from scoat_jax.evaluation import metrics

MIN_SIZES_MM3 = (0, 10, 20, 50, 100, 200, 500, 1000, 2000)
MIN_SIZES_PX = (0, 5, 10, 20, 50, 100, 200, 500)
LUNG_SHARE = 0.5
MIN_GAIN = 1e-3


class PostprocessingError(ValueError):
  """A bad post-processing rule or request."""


def none_rule() -> dict:
  return {"min_size": 0.0, "unit": None, "inside_lung": False}


def check_rule(rule: dict | None) -> dict | None:
  """A rule as stored (`min_size`, `unit` 'mm3' | 'pixels', `inside_lung`), validated.

  `min_size` is a finite number >= 0 (0 or absent: no size rule), `unit` is
  required with a positive `min_size` (None or absent otherwise), and
  `inside_lung` is true or false (absent: false). Other keys (`chosen_on`,
  `copied_from`) are kept as they are.

  Raises:
    PostprocessingError: naming the field that is wrong.
  """
  if rule is None:
    return None
  if not isinstance(rule, dict):
    raise PostprocessingError(f"the post-processing rule is {type(rule).__name__} {rule!r}, not "
                              "{min_size, unit, inside_lung}; export the bundle again.")
  shown = {k: rule[k] for k in ("min_size", "unit", "inside_lung") if k in rule}
  size, unit, inside = rule.get("min_size", 0), rule.get("unit"), rule.get("inside_lung", False)
  problem = None
  if isinstance(size, bool) or not isinstance(size, (int, float)) or not np.isfinite(size):
    problem = f"min_size {size!r} is not a number"
  elif size < 0:
    problem = f"min_size {size!r} is negative"
  elif unit not in (None, "mm3", "pixels"):
    problem = f"unit {unit!r} is not 'mm3' or 'pixels'"
  elif size > 0 and unit is None:
    problem = f"min_size {size!r} has no unit ('mm3' or 'pixels')"
  elif not isinstance(inside, bool):
    problem = f"inside_lung {inside!r} is not true or false"
  if problem:
    raise PostprocessingError(f"post-processing rule {shown}: {problem} (min_size >= 0 with unit "
                              "'mm3' or 'pixels', inside_lung true/false); export the bundle "
                              "again.")
  return {**rule, "min_size": float(size), "unit": unit, "inside_lung": inside}


def is_active(rule: dict | None) -> bool:
  return rule is not None and (float(rule.get("min_size", 0)) > 0 or bool(rule.get("inside_lung")))


def describe(rule: dict | None) -> str:
  if not is_active(rule):
    return "none"
  parts = []
  if rule["min_size"] > 0:
    parts.append(f"components under {rule['min_size']:g} {'mm^3' if rule['unit'] == 'mm3' else 'px'}"
                 " removed")
  if rule["inside_lung"]:
    parts.append("components mostly outside the lung removed")
  return "; ".join(parts)


def _components(labels: np.ndarray) -> tuple[np.ndarray, int]:
  structure = np.ones((3,) * labels.ndim, bool)
  return ndimage.label(labels > 0, structure=structure)


def _unit_size(labels: np.ndarray, spacing_xyz) -> tuple[float, str]:
  if spacing_xyz is None:
    return 1.0, "pixels"
  return float(np.prod(spacing_xyz[:labels.ndim])), "mm3"


def apply(labels: np.ndarray, rule: dict | None, *, spacing_xyz: Sequence[float] | None = None,
          lung: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
  """Applies a rule to a (z, y, x) or (H, W) label mask.

  Args:
    labels: integer labels, > 0 is opacity.
    rule: from `choose` or a bundle; None or an inactive rule returns `labels`.
    spacing_xyz: voxel size in mm for volumes (min_size in mm^3); None for
      2-D slices (min_size in pixels).
    lung: bool mask of the lung for `inside_lung` (skipped, and said so, when None).

  Returns:
    (labels, summary): the new labels (a copy when anything changed) and
    {'rule', 'removed_components', 'removed_voxels', 'skipped'}.

  Raises:
    PostprocessingError: a rule whose unit does not fit the input (mm^3 on a
      slice without spacing).
  """
  rule = check_rule(rule)
  summary = {"rule": describe(rule), "removed_components": 0, "removed_voxels": 0, "skipped": []}
  if not is_active(rule):
    return labels, summary
  per_unit, unit = _unit_size(labels, spacing_xyz)
  if rule["min_size"] > 0 and rule["unit"] != unit:
    raise PostprocessingError(f"the post-processing rule counts {rule['unit']}, but this input "
                              f"is measured in {unit}; pass --no_postprocessing or a bundle "
                              "made on inputs like it.")
  comp, n = _components(labels)
  if n == 0:
    return labels, summary
  sizes = np.bincount(comp.ravel(), minlength=n + 1)
  drop = np.zeros(n + 1, bool)
  if rule["min_size"] > 0:
    drop |= sizes * per_unit < rule["min_size"]
  if rule["inside_lung"]:
    if lung is None or np.shape(lung) != labels.shape:
      summary["skipped"].append("inside_lung (no lung mask for this input)")
    else:
      inside = np.bincount(comp.ravel(), weights=np.asarray(lung, bool).ravel(), minlength=n + 1)
      drop |= inside < LUNG_SHARE * sizes
  drop[0] = False
  if not drop.any():
    return labels, summary
  out = np.where(drop[comp], 0, labels).astype(labels.dtype)
  summary.update(removed_components=int(drop.sum()), removed_voxels=int(sizes[drop].sum()))
  return out, summary


def _case_table(pred: np.ndarray, truth: np.ndarray, lung, spacing_xyz):
  comp, n = _components(pred)
  flat = comp.ravel()
  sizes = np.bincount(flat, minlength=n + 1)
  hits = np.bincount(flat, weights=(truth > 0).ravel(), minlength=n + 1)
  inside = (np.bincount(flat, weights=np.asarray(lung, bool).ravel(), minlength=n + 1)
            if lung is not None else sizes.astype(float))
  per_unit, unit = _unit_size(pred, spacing_xyz)
  return {"sizes": sizes[1:], "hits": hits[1:], "inside": inside[1:],
          "truth": int(np.count_nonzero(truth)), "per_unit": per_unit, "unit": unit}


def _dsc(t: dict, min_size: float, inside_lung: bool) -> float:
  keep = t["sizes"] * t["per_unit"] >= min_size
  if inside_lung:
    keep &= t["inside"] >= LUNG_SHARE * t["sizes"]
  p, tp = float(t["sizes"][keep].sum()), float(t["hits"][keep].sum())
  return 1.0 if p + t["truth"] == 0 else 2 * tp / (p + t["truth"])


def _mean_region(cases, rule) -> dict:
  scored = [metrics.case_metrics(apply(c["pred"], rule, spacing_xyz=c["spacing_xyz"],
                                       lung=c.get("lung"))[0] > 0, c["truth"] > 0)
            for c in cases]
  return {k: float(np.mean([s[k] for s in scored])) for k in ("dsc", "rlp", "rlr")}


def choose(cases: Sequence[dict]) -> dict:
  """Picks the rule that raises mean DSC most over validation cases (or none).

  Args:
    cases: per validation case {'pred' labels, 'truth' labels, 'spacing_xyz'
      (None for 2-D slices), 'lung' bool mask or None}, all in one unit
      (all volumes, or all slices).

  Returns:
    The rule, with 'chosen_on' {cases, candidates, mean DSC / RLP / RLR before
    and after, the table of every candidate's mean DSC}; an inactive rule when
    nothing gains MIN_GAIN.

  Raises:
    PostprocessingError: no cases, or volumes mixed with slices.
  """
  if not cases:
    raise PostprocessingError("no validation cases to choose post-processing on")
  tables = [_case_table(c["pred"], c["truth"], c.get("lung"), c["spacing_xyz"]) for c in cases]
  units = {t["unit"] for t in tables}
  if len(units) != 1:
    raise PostprocessingError("validation cases mix volumes (mm^3) and slices (pixels)")
  unit = units.pop()
  with_lung = all(c.get("lung") is not None for c in cases)
  sizes = MIN_SIZES_MM3 if unit == "mm3" else MIN_SIZES_PX
  table = []
  for inside in ((False, True) if with_lung else (False,)):
    for size in sizes:
      table.append({"min_size": float(size), "inside_lung": inside,
                    "mean_dsc": float(np.mean([_dsc(t, size, inside) for t in tables]))})
  base = table[0]["mean_dsc"]
  best = max(table, key=lambda r: (r["mean_dsc"], -r["min_size"], not r["inside_lung"]))
  chosen = ({"min_size": best["min_size"], "unit": unit if best["min_size"] > 0 else None,
             "inside_lung": best["inside_lung"]}
            if best["mean_dsc"] >= base + MIN_GAIN else none_rule())
  before, after = _mean_region(cases, None), _mean_region(cases, chosen)
  chosen["chosen_on"] = {"cases": len(cases), "unit": unit, "min_gain": MIN_GAIN,
                         "before": before, "after": after, "candidates": table}
  return chosen
