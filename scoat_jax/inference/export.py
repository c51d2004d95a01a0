r"""Exporting trained runs as a model bundle, with post-processing chosen on their folds.

    python -m scoat_jax.export --checkpoint=runs/fold0 ... --checkpoint=runs/fold4 --output=model/

What a bundle holds: `inference.bundle`. The post-processing rule
(`inference.postprocessing`) is chosen as nnU-Net's determine_postprocessing:

* `postprocessing='cv'` (default): each member predicts its own fold's
  validation cases exactly as `predict` would (lung mask, network slices,
  no rule), read from the member's training dataset; all folds' cases are
  pooled and the rule that raises mean DSC (kept only if it gains) is stored,
  with its DSC, RLP and RLR before and after and every candidate's score.
* `postprocessing='none'`: no rule.
* `postprocessing_from=BUNDLE`: the rule of another bundle, for the model
  trained on all cases (`--config.data.fold=-1`), which has no validation
  cases of its own: export the cross-validation folds first, then copy their
  rule.
"""
from __future__ import annotations

import pathlib
import shutil
import time
from collections.abc import Iterator, Sequence

import numpy as np

from scoat_jax.data import orientation
from scoat_jax.data.geometry import Geometry
from scoat_jax.data.readers import Loaded
from scoat_jax.inference import bundle, postprocessing, scan
from scoat_jax.inference.loading import LoadedModel, load_ensemble
from scoat_jax.inference.predictor import Predictor

POSTPROCESSING = ("cv", "none")


class ExportError(ValueError):
  """A bad export request; one line naming the flag and the fix."""


def provenance(m: LoadedModel) -> dict:
  """Where a member came from and how well it validated (JSON-ready)."""
  data = m.config.data
  per_case = m.meta.get("per_case") or []
  validation = {}
  for name in ("dsc", "sen", "ppv", "va", "rlp", "rlr"):
    values = [float(c[name]) for c in per_case if isinstance(c.get(name), (int, float))]
    if values:
      validation[f"val_{name}"] = float(np.mean(values))
  return {"source": str(m.step_dir), "step": m.step, "epoch": m.meta.get("epoch"),
          "dataset": data.get("name"), "fold": data.get("fold"),
          "num_folds": data.get("num_folds"), "fold_seed": data.get("fold_seed"),
          "validation": validation, "validation_cases": len(per_case)}


def validation_scans(m: LoadedModel, *, data_dir: str | None = None):
  """The dataset the member trained on and the scans of its own validation fold.

  Returns:
    (dataset, [ScanEntry of each validation case, in dataset order]).

  Raises:
    ExportError: a member trained on all cases, or its dataset not built here.
  """
  from scoat_jax.datasets import base
  data = m.config.data
  fold = int(data.get("fold", 0))
  if fold < 0:
    raise ExportError(f"{m.step_dir}: trained on all cases (fold {fold}), so it has no "
                      "validation cases to choose post-processing on; pass "
                      "--postprocessing_from=<the bundle of its cross-validation folds> or "
                      "--postprocessing=none.")
  try:
    ds = base.open_source(str(data.name), data_dir or data.get("data_dir") or None)
  except base.DatasetError as e:
    raise ExportError(f"{m.step_dir}: its dataset is needed to choose post-processing on the "
                      f"fold's validation cases ({str(e).splitlines()[0]}); or pass "
                      "--postprocessing=none.") from None
  return ds, ds.fold_scans("val", fold, int(data.num_folds), int(data.fold_seed))


def validation_cases(m: LoadedModel, *, data_dir: str | None = None,
                     progress=None) -> Iterator[dict]:
  """The member's own validation cases, predicted as `predict` does (no post-processing).

  Yields per case {'case_id', 'pred', 'truth', 'spacing_xyz' (None for 8-bit
  slices), 'lung' (None for 8-bit slices)}.

  Raises:
    ExportError: a member trained on all cases, or its dataset not built here.
  """
  ds, entries = validation_scans(m, data_dir=data_dir)
  predictor = Predictor([m])
  for entry in entries:
    records = [ds.source[entry.start + r] for r in range(entry.count)]
    truth = np.stack([np.asarray(r["mask"]) for r in records])
    images = [np.asarray(r["image"]) for r in records]
    if ds.intensity == "uint8":
      for image, t in zip(images, truth):
        labels, _ = next(predictor.predict_slices([image], source="uint8"))
        yield {"case_id": entry.scan_id, "pred": labels, "truth": t, "spacing_xyz": None,
               "lung": None}
    else:
      spacing = tuple(float(v) for v in records[0]["spacing"])
      hu = np.stack(images)
      geometry = Geometry.for_array(hu.shape, spacing)
      loaded = Loaded(hu, geometry, {}, orientation.reorientation(geometry))
      result = scan.run_volume(predictor, loaded)
      yield {"case_id": entry.scan_id, "pred": result.labels, "truth": truth,
             "spacing_xyz": spacing, "lung": result.lung}
    if progress is not None:
      progress(entry.scan_id)


def choose_postprocessing(models: Sequence[LoadedModel], *, data_dir: str | None = None,
                          progress=None) -> dict:
  """The rule chosen on every member's validation fold (see the module docstring)."""
  seen = set()
  for m in models:
    key = (m.config.data.get("name"), m.config.data.get("fold"))
    if key in seen:
      raise ExportError(f"{m.step_dir}: two members validate on fold {key[1]} of {key[0]}; "
                        "choosing post-processing needs each fold once (or "
                        "--postprocessing=none).")
    seen.add(key)
  cases = [c for m in models for c in validation_cases(m, data_dir=data_dir, progress=progress)]
  return postprocessing.choose(cases)


def _export_window(model, data_dir: str | None) -> dict | None:
  """An 8-bit model's export window: from its checkpoint, else from its training dataset
  (checkpoints saved before the window was stored), else None (HU then warns)."""
  from absl import logging
  if model.intensity != "uint8":
    return None
  if model.export_window is not None:
    return dict(model.meta["export_window"])
  from scoat_jax.datasets import base as ds_base
  try:
    found = ds_base.open_source(str(model.config.data.name), data_dir).metadata.get(
        "export_window")
  except ValueError:
    found = None
  if found and found.get("window_hu"):
    logging.info("export window %s HU taken from dataset %s", found["window_hu"],
                 model.config.data.name)
    return dict(found)
  logging.warning("%s: trained on 8-bit exports whose HU window is unknown (its dataset was "
                  "built before the window was estimated); HU volumes will be read through "
                  "%s HU. Rebuild the dataset with --overwrite and export again to store it.",
                  model.step_dir, list(model.hu_window))
  return None


def run(checkpoints: Sequence[str], output: str, *, postprocessing_mode: str = "cv",
        postprocessing_from: str | None = None, overwrite: bool = False,
        data_dir: str | None = None, config=None) -> dict:
  """Writes a bundle of `checkpoints`; the programmatic form of `python -m scoat_jax.export`.

  Returns:
    The bundle's index (`bundle.json`).

  Raises:
    ValueError: a bad checkpoint, output, rule source or dataset; nothing written.
  """
  from absl import logging
  output = pathlib.Path(output).expanduser()
  if postprocessing_mode not in POSTPROCESSING:
    raise ExportError(f"--postprocessing={postprocessing_mode}: choose cv or none.")
  if output.exists() and not (overwrite and bundle.is_bundle(output)):
    raise ExportError(f"--output={output}: exists; choose a new folder"
                      + (" or pass --overwrite to replace that bundle."
                         if bundle.is_bundle(output) else " (only a bundle is replaced)."))
  if not output.parent.exists():
    raise ExportError(f"--output={output}: its folder {output.parent} does not exist; create it.")
  models = load_ensemble(list(checkpoints), config=config)
  if any(m.postprocessing is not None for m in models) or any("bundle" in m.meta for m in models):
    raise ExportError("--checkpoint names a bundle; export from training workdirs or step "
                      "folders (a bundle is already exported).")
  if postprocessing_from:
    source = bundle.read(postprocessing_from)
    rule = postprocessing.check_rule(source.postprocessing)
    if rule is not None:
      rule = {**rule, "copied_from": str(source.path)}
  elif postprocessing_mode == "cv":
    t0 = time.time()
    rule = choose_postprocessing(models, data_dir=data_dir,
                                 progress=lambda c: logging.info("validated %s", c))
    logging.info("post-processing: %s (mean DSC %.4f -> %.4f, RLP %.4f -> %.4f; %d cases, "
                 "%.0f s)", postprocessing.describe(rule), rule["chosen_on"]["before"]["dsc"],
                 rule["chosen_on"]["after"]["dsc"], rule["chosen_on"]["before"]["rlp"],
                 rule["chosen_on"]["after"]["rlp"], rule["chosen_on"]["cases"], time.time() - t0)
  else:
    rule = None
  first = models[0]
  members = [{"config": m.config.to_dict(), "variables": m.variables, "provenance": provenance(m)}
             for m in models]
  window = _export_window(first, data_dir)
  preprocessing = {"intensity": first.intensity,
                   "hu_window": list(window["window_hu"] if window else first.hu_window),
                   "uint8_normalization": first.uint8_normalization,
                   "image_size": first.image_size, "export_window": window}
  target = output
  if output.exists():  # --overwrite: the new bundle is complete before the old one goes
    target = output.parent / f".{output.name}.new"
    shutil.rmtree(target, ignore_errors=True)
  try:
    bundle.write(target, members, preprocessing=preprocessing, postprocessing=rule,
                 model_name=first.config.model_name, num_classes=first.num_classes)
  except OSError as e:
    raise ExportError(f"--output={output}: cannot write the bundle ({e}).") from None
  if target != output:
    old = output.parent / f".{output.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    output.rename(old)
    target.rename(output)
    shutil.rmtree(old, ignore_errors=True)
  return bundle.read(output).index
