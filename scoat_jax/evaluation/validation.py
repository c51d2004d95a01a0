"""Validation: the paper's six metrics per case, on the host.

The network runs slice by slice (jitted, batch sharded over this process's
devices); the predicted slices of each case are stacked back into a volume
and scored with `evaluation.metrics.case_metrics` (DSC, SEN, PPV, VA, RLP,
RLR), then aggregated over cases. Inference in eval mode has no cross-sample
reduction, so every process scores its own cases on its own devices and the
per-case results are gathered at the end.
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils

from scoat_jax.common import parallel
from scoat_jax.evaluation import metrics as metrics_lib
from scoat_jax.models import outputs

METRIC_NAMES = ("dsc", "sen", "ppv", "va", "rlp", "rlr")
# Three-class models: the DSC of each opacity class beside any-opacity DSC (label: name).
CLASS_DSC = {1: "dsc_ggo", 2: "dsc_consolidation"}


def class_dsc(pred: np.ndarray, truth: np.ndarray, label: int) -> float:
  """DSC of one class; NaN where neither mask holds it (undefined, left out of means)."""
  p, t = pred == label, truth == label
  den = int(np.count_nonzero(p)) + int(np.count_nonzero(t))
  return float("nan") if den == 0 else 2.0 * int(np.count_nonzero(p & t)) / den


def make_predict_fn(apply_fn: Callable, *, num_classes: int, average_heads: bool,
                    mesh, threshold: float | None = None) -> Callable:
  """A jitted `(variables, images) -> labels`, batch sharded over `mesh`."""
  def predict(variables, images):
    logits = apply_fn(variables, images, train=False)
    return outputs.predict_labels(logits, num_classes=num_classes, average_heads=average_heads,
                                  threshold=threshold)
  return jax.jit(predict, in_shardings=(parallel.replicated(mesh), parallel.data_sharding(mesh)),
                 out_shardings=parallel.data_sharding(mesh))


def local_variables(variables: Any) -> Any:
  """This process's copy of replicated variables, as host arrays."""
  return jax.tree_util.tree_map(
      lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, variables)


def evaluate(predict_fn: Callable, variables, batches: Iterable[dict], case_ids: list[str], *,
             num_overlays: int = 0, num_classes: int = 1) -> tuple[dict, list[dict], list[tuple]]:
  """Runs `predict_fn` over `batches` and scores every case.

  Args:
    predict_fn: from `make_predict_fn` (over this process's devices).
    variables: model variables (replicated or host arrays).
    batches: this process's eval batches (`input_pipeline.eval_batches`), with
      'image', 'mask', 'case', 'slice_index' and 'valid'.
    case_ids: names of all cases of the split (indexed by 'case').
    num_overlays: how many (image, truth, prediction) slices to return for
      image summaries, taking slices with the most opacity first.
    num_classes: 3 adds each case's `dsc_ggo` and `dsc_consolidation` (None
      where neither mask holds the class) and their aggregates.

  Returns:
    (aggregate, per_case, overlays): `aggregate` maps 'val_<metric>' to the
    mean over cases (plus '_std' and '_median'); `per_case` holds one dict per
    case with 'case_id' and the six metrics (all processes' cases).
  """
  slices: dict[int, list] = collections.defaultdict(list)
  overlays: list[tuple] = []
  for batch in batches:
    labels = np.asarray(predict_fn(variables, batch["image"]))
    for k in np.flatnonzero(batch["valid"]):
      case = int(batch["case"][k])
      slices[case].append((int(batch["slice_index"][k]), labels[k], np.asarray(batch["mask"][k])))
      if num_overlays:
        overlays.append((int(np.count_nonzero(batch["mask"][k])), batch["image"][k], batch["mask"][k], labels[k]))
        overlays = sorted(overlays, key=lambda o: -o[0])[:num_overlays]

  names = METRIC_NAMES + (tuple(CLASS_DSC.values()) if num_classes == 3 else ())
  local = np.full((len(case_ids), len(names)), np.nan, np.float64)
  for case, items in slices.items():
    items.sort(key=lambda t: t[0])
    labels = np.stack([p for _, p, _ in items])
    truth_labels = np.stack([m for _, _, m in items])
    pred, truth = labels > 0, truth_labels > 0
    result = metrics_lib.case_metrics(pred if len(items) > 1 else pred[0],
                                      truth if len(items) > 1 else truth[0])
    result.update({name: class_dsc(labels, truth_labels, c) for c, name in CLASS_DSC.items()})
    local[case] = [result[name] for name in names]
  table = local
  if jax.process_count() > 1:
    gathered = np.asarray(multihost_utils.process_allgather(local))
    table = np.where(np.isnan(gathered), -np.inf, gathered).max(axis=0)
    table[np.isinf(table)] = np.nan
  scored = ~np.isnan(table[:, :len(METRIC_NAMES)]).any(axis=1)
  per_case = [dict(case_id=case_ids[c], **{n: None if np.isnan(table[c, i]) else float(table[c, i])
                                           for i, n in enumerate(names)})
              for c in np.flatnonzero(scored)]
  aggregate = {}
  if per_case:
    for name, stats in metrics_lib.aggregate(
        [{n: np.nan if r[n] is None else r[n] for n in names} for r in per_case]).items():
      if not isinstance(stats, dict) or not np.isfinite(stats["mean"]):
        continue  # e.g. dsc_consolidation when no case shows consolidation
      aggregate[f"val_{name}"] = stats["mean"]
      aggregate[f"val_{name}_std"] = stats["std"]
      aggregate[f"val_{name}_median"] = stats["median"]
  aggregate["val_cases"] = len(per_case)
  return aggregate, per_case, [o[1:] for o in overlays]


def overlay_rgb(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
  """Side-by-side RGB uint8: slice | truth in green | prediction in red."""
  grey = np.clip(np.asarray(image, np.float32)[..., 0] if np.ndim(image) == 3 else image, 0, 1)
  base = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=-1)
  def tint(mask, channel):
    out = base.copy()
    on = np.asarray(mask) > 0
    out[on, channel] = 255
    out[on, (channel + 1) % 3] //= 2
    return out
  return np.concatenate([base, tint(truth, 1), tint(pred, 0)], axis=1)
