"""Soft labels of an unlabelled dataset from a teacher (`python -m scoat_jax.pseudo_label`).

Every slice, in dataset order, goes through the teacher as `predict` sends a
slice (`Predictor.predict_slices`: same preprocessing, P(opacity) back on the
slice's own grid), and is written as `<output>/<name>.png`
(`scoat_jax.data.soft_labels`), with `soft_labels.json`: the teachers, their
folds, the dataset, each slice's mean confidence and opacity share. The folder
is written under a temporary name and renamed when complete. With
`match_intensity` the teacher sees every 8-bit scan with its grey levels
mapped onto the histogram of the slices it trained on
(`scoat_jax.datasets.intensity_match`), as `config.unlabelled.match_intensity`
shows them to the student.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np
from absl import logging

from scoat_jax.data import soft_labels
from scoat_jax.datasets import base as ds_base
from scoat_jax.datasets import intensity_match
from scoat_jax.inference import loading
from scoat_jax.inference.predictor import Predictor


def label(teachers, data: str, data_dir: str, output: str, *, overwrite: bool = False,
          tta: bool = False, batch_size: int = 0, match_intensity: bool = False) -> dict:
  """Writes the teacher's soft labels of every slice of `data` to `output`; returns the manifest.

  Raises:
    ValueError (CheckpointError, DatasetError, InferenceError): bad teacher,
      dataset or output, before anything is written.
  """
  output = os.path.abspath(os.path.expanduser(output))
  if os.path.exists(output) and not overwrite:
    raise ValueError(f"--output={output} exists; pass --overwrite to replace it (the old maps are "
                     "kept until the new ones are complete) or choose another folder")
  parent = os.path.dirname(output)
  if not os.path.isdir(parent):
    raise ValueError(f"--output={output}: its folder {parent} does not exist; create it first")
  ds = ds_base.open_source(data, data_dir)
  if ds.metadata.get("labelled", True):
    raise ValueError(f"--data={data} is a labelled dataset; pseudo-labels are for unlabelled_slices "
                     "or unlabelled_volumes")
  models = loading.load_ensemble(list(teachers))
  predictor = Predictor(models, tta=tta, batch_size=batch_size or None)
  folds = sorted({int(m.config.data.get("fold", -1)) if str(m.config.data.get("fold")) != "all"
                  else -1 for m in models})
  names = [n for scan in ds.scans for n in scan.extra["names"]]
  records = [scan.start + k for scan in ds.scans for k in range(scan.count)]
  luts = _teacher_luts(models, ds) if match_intensity else None
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.tmp-", dir=parent)
  t0 = time.perf_counter()
  try:
    per_slice = {}
    images = (ds.source[r]["image"] if luts is None else luts[r][ds.source[r]["image"]]
              for r in records)
    for k, (_, prob) in enumerate(predictor.predict_slices(images, source=ds.intensity)):
      soft_labels.write(staging, names[k], prob)
      per_slice[names[k]] = {"confidence": round(float(soft_labels.confidence(prob).mean()), 4),
                             "opacity": round(float((prob > 0.5).mean()), 5)}
      if (k + 1) % 200 == 0:
        logging.info("%d/%d slices labelled", k + 1, len(records))
    manifest = {"dataset": ds.name, "data_dir": ds.data_dir, "num_slices": len(records),
                "teachers": [m.describe() for m in models], "teacher_folds": folds,
                "tta": bool(tta), "match_intensity": bool(match_intensity),
                "slices": per_slice,
                "mean_confidence": round(float(np.mean([v["confidence"] for v in
                                                        per_slice.values()])), 4)}
    soft_labels.write_manifest(staging, manifest)
    old = None
    if os.path.exists(output):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.old-", dir=parent)
      os.rename(output, os.path.join(old, "maps"))
    os.rename(staging, output)
    if old:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  logging.info("%d soft labels in %s (%.1f s), mean confidence %.3f", len(records), output,
               time.perf_counter() - t0, manifest["mean_confidence"])
  return manifest


def _teacher_luts(models, ds: ds_base.SliceDataset) -> np.ndarray:
  """(num_records, 256) grey-level tables onto the teachers' own training slices."""
  if ds.intensity != "uint8":
    raise ValueError(f"--match_intensity: {ds.name} holds {ds.intensity} slices, which are on one "
                     "scale already; drop --match_intensity")
  reference = np.zeros(intensity_match.LEVELS, np.float64)
  for m in models:
    data = m.config.data
    try:
      labelled = ds_base.open_source(str(data.name), str(data.get("data_dir", "") or ""))
    except ValueError as e:
      raise ValueError(f"--match_intensity needs the teacher's labelled dataset, to map onto the "
                       f"slices it trained on: {e}") from None
    reference += intensity_match.fold_reference(labelled, data.get("fold", -1),
                                                int(data.get("num_folds", 5)),
                                                int(data.get("fold_seed", 0)),
                                                str(data.get("slices", "all") or "all"))
  return intensity_match.record_luts(ds, reference)
