r"""Segments and quantifies every input of a predict run and writes its files.

    reports = segment.run(["runs/fold0", "runs/fold1"], "dicom_series_dir", "out/", tta=True)

`python -m scoat_jax.predict` is this function as a command.

`--input` is a CT volume (.nii/.nii.gz/.mha/.mhd/.nrrd), a DICOM series folder,
a folder of such scans (files and DICOM sub-folders), or a folder of 2-D 8-bit
slice images (.png/.jpg, COVID-SemiSeg style; a folder holding `Imgs/` is
read from there). Per scan `<name>`, into `--output`:

  <name>_mask.nii.gz         labels with exactly the input's size, spacing,
                             origin and direction (2-D: <name>_mask.png at the
                             image's size, palette PNG of label indices)
  <name>_probability.nii.gz  P(opacity), float32 (--save_probabilities;
                             2-D: 8-bit PNG, value = 255 x P)
  <name>_attention_z<k>.png  the network's attention maps over slice k (SCOAT-Net:
                             the SAMs of x_1_1, x_2_2, x_1_3)
                             (--save_attention; 2-D: <name>_attention.png)
  <name>_report.json         lov_ml, lung_volume_ml, poi_percent, lesions,
                             class volumes (3-class models), the checkpoints

Everything is checked before anything is written: the checkpoints load and
fit their model, every input is read in full, and the output folder holds
no earlier results (unless --overwrite, which replaces only this run's
files). Each file is written under a temporary name and renamed. A bad input
prints one line `error: ...` on stderr and exits with status 2.
"""
from __future__ import annotations

import os
import pathlib
import sys
import time
from collections.abc import Sequence

import numpy as np

from scoat_jax.data import ct_io, readers, writers
from scoat_jax.data.readers import Item
from scoat_jax.inference import quantify

# Inputs validated up front are kept in memory for the run up to this size;
# beyond it they are read again when their turn comes.
_KEEP_BYTES = 1 << 29


class PredictError(ValueError):
  """A bad prediction request (input, output folder, flags); one line naming the fix."""


def parse_slices(values: Sequence[str] | str | None) -> list[int]:
  """'--attention_slices=3,10' -> [3, 10] (non-negative, unique, sorted)."""
  if values is None:
    return []
  if isinstance(values, str):
    values = [v for v in values.split(",")]
  out = set()
  for v in values:
    v = str(v).strip()
    if not v:
      continue
    if not v.isdigit():
      raise PredictError(f"--attention_slices={','.join(map(str, values))}: {v!r} is not a slice "
                         "index; give z indices like --attention_slices=10,24.")
    out.add(int(v))
  return sorted(out)


# ----------------------------------------------------------------------------- outputs

def outputs_for(item: Item, output: pathlib.Path, *, save_probabilities: bool) -> dict:
  """Where an input's files go (attention overlays are named per slice when written)."""
  ext = ".png" if item.kind == "image" else ".nii.gz"
  out = {"mask": output / f"{item.name}_mask{ext}", "report": output / f"{item.name}_report.json"}
  if save_probabilities:
    out["probability"] = output / f"{item.name}_probability{ext}"
  return out


def attention_path(item: Item, output: pathlib.Path, z: int | None) -> pathlib.Path:
  suffix = "" if z is None else f"_z{z:04d}"
  return output / f"{item.name}_attention{suffix}.png"


def earlier_results(output: pathlib.Path) -> list[pathlib.Path]:
  """Files in `output` that a predict run wrote before."""
  if not output.is_dir():
    return []
  return sorted(p for p in output.iterdir() if p.is_file() and writers.is_output(p.name))


def check_output(output: pathlib.Path, *, overwrite: bool) -> None:
  """Raises PredictError if `output` cannot take this run's results."""
  if output.exists() and not output.is_dir():
    raise PredictError(f"--output={output}: is a file; give a folder (it is created if missing).")
  if not overwrite:
    old = earlier_results(output)
    if old:
      raise PredictError(f"--output={output}: holds earlier results ({old[0].name}"
                         f"{f' and {len(old) - 1} more' if len(old) > 1 else ''}); choose a new "
                         "folder or pass --overwrite.")
  parent = output.parent if not output.exists() else output
  while not parent.exists():
    parent = parent.parent
  if not os.access(parent, os.W_OK):
    raise PredictError(f"--output={output}: {parent} is not writable; choose another folder.")


# ----------------------------------------------------------------------------- the run

def _progress_bar(total: int, name: str, enabled: bool):
  from tqdm import tqdm
  # disable=None: draw only on a terminal, so logs and pipes stay clean.
  return tqdm(total=total, desc=name, unit="slice", file=sys.stderr, leave=False,
              disable=None if enabled and total else True)


def _geometry_json(g: ct_io.Geometry) -> dict:
  return {"size_xyz": list(g.size), "spacing_mm_xyz": list(g.spacing),
          "origin_mm_xyz": list(g.origin), "direction": list(g.direction)}


def run(checkpoints: Sequence[str], input_path: str, output: str, *, tta: bool = False,
        save_probabilities: bool = False, save_attention: bool = False,
        attention_slices: Sequence[int] = (), overwrite: bool = False, batch_size: int = 0,
        progress: bool = True, items: Sequence[Item] | None = None,
        series_id: str | None = None) -> list[dict]:
  """Predicts and quantifies every input; the programmatic form of the CLI.

  Args:
    checkpoints: one or more workdirs / checkpoints folders / step folders;
      several average their probabilities.
    input_path: what `--input` names (see `discover_inputs`).
    output: results folder (created after validation).
    tta: flip test-time augmentation.
    save_probabilities: also write P(opacity).
    save_attention: also write SAM overlays (first checkpoint).
    attention_slices: z indices for the overlays of volumes; empty = the slice
      with the most predicted opacity.
    overwrite: allow an output folder holding earlier results.
    batch_size: slices per forward pass (0: one per CPU device, 8 per accelerator).
    progress: draw a progress bar per scan (on a terminal).
    items: inputs already discovered (used by follow-up); default from input_path.
    series_id: the DICOM series to read from folders that hold several.

  Returns:
    The reports written, in input order (each also has 'outputs').

  Raises:
    ValueError (PredictError, CTError, CheckpointError, ...): any bad input,
      before anything is written.
  """
  from absl import logging
  from scoat_jax import inference

  output = pathlib.Path(output).expanduser()
  items = list(readers.discover_inputs(input_path) if items is None else items)
  attention_slices = list(attention_slices)
  if attention_slices and not save_attention:
    raise PredictError("--attention_slices needs --save_attention.")
  if attention_slices and any(i.kind == "image" for i in items):
    raise PredictError("--attention_slices applies to volumes; for 2-D images every image gets "
                       "its overlay with --save_attention.")
  check_output(output, overwrite=overwrite)
  inference.check_batch_size(batch_size)  # a bad flag is refused before the scans are read
  kept, budget = {}, _KEEP_BYTES
  for item in items:  # Read everything once before writing anything.
    data = readers.read_item(item, series_id)
    depth = data[0].shape[0]
    if item.kind == "volume" and attention_slices and max(attention_slices) >= depth:
      raise PredictError(f"--attention_slices={max(attention_slices)} is beyond {item.path} "
                         f"({depth} slices, z = 0..{depth - 1}).")
    if data[0].nbytes <= budget:
      kept[item], budget = data, budget - data[0].nbytes
  models = inference.load_ensemble(list(checkpoints))
  if save_attention and not type(models[0].model).attention_maps:
    from scoat_jax.models import available_models, model_class
    with_maps = [n for n in available_models() if model_class(n).attention_maps]
    raise PredictError(f"--save_attention: {models[0].config.model_name} has no attention maps "
                       f"(networks with maps: {', '.join(with_maps)}); drop the flag.")
  if any(i.kind == "volume" for i in items) and models[0].intensity == "uint8":
    logging.warning("the model was trained on 8-bit slice exports; HU volumes are windowed to "
                    "%s HU for it", models[0].hu_window)
  predictor = inference.Predictor(models, tta=tta, batch_size=batch_size)
  try:
    output.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise PredictError(f"--output={output}: cannot create it ({e.strerror or e}); choose a "
                       "folder you can write to.") from None
  options = dict(save_probabilities=save_probabilities, save_attention=save_attention,
                 attention_slices=attention_slices)
  reports = []
  for item, data, labels, prob, seconds in _predictions(predictor, items, kept,
                                                        save_probabilities, progress, series_id):
    report = _finish(predictor, item, data, labels, prob, output, seconds=seconds, **options)
    logging.info("%s: LOV %s ml, lung %s ml, POI %s%%, %d lesion(s) in %.1f s", item.name,
                 _fmt(report.get("lov_ml")), _fmt(report.get("lung_volume_ml")),
                 _fmt(report.get("poi_percent")), report["num_lesions"],
                 sum(report["seconds"].values()))
    reports.append(report)
  return reports


def _predictions(predictor, items, kept, with_probability: bool, progress: bool,
                 series_id: str | None = None):
  """Yields (item, (array, geometry, meta), labels, P(opacity), seconds) in input order.

  Volumes go one at a time, each with its own progress bar. 2-D images share
  batches: they stream through one `predict_slices` call, and each image is
  held in `ahead` (at most two batches) until its prediction comes back.
  """
  from absl import logging
  ahead: dict[Item, tuple] = {}

  def images():
    for item in items:
      if item.kind == "image":
        ahead[item] = kept.pop(item) if item in kept else readers.read_item(item, series_id)
        yield ahead[item][0]

  image_predictions = predictor.predict_slices(images(), source="uint8")
  with _progress_bar(sum(i.kind == "image" for i in items), "slices", progress) as image_bar:
    for item in items:
      t0 = time.time()
      if item.kind == "image":
        labels, prob = next(image_predictions)
        data = ahead.pop(item)
        image_bar.update(1)
      else:
        data = kept.pop(item) if item in kept else readers.read_item(item, series_id)
        depth = data[0].shape[0]
        with _progress_bar(depth, item.name, progress) as bar:
          def advance(n, bar=bar, depth=depth, name=item.name, t0=t0):
            bar.update(n - bar.n)
            # Without a terminal the bar is off: a log line every tenth of the scan instead.
            if bar.disable and progress and n * 10 // depth != (n - 1) * 10 // depth:
              logging.info("%s: %d/%d slices, %.1f s", name, n, depth, time.time() - t0)
          labels, prob = predictor.predict_volume(data[0], with_probability=with_probability,
                                                  progress=advance)
      yield item, data, labels, prob, {"predict": round(time.time() - t0, 3)}


def _finish(predictor, item: Item, data: tuple, labels: np.ndarray, prob: np.ndarray | None,
            output: pathlib.Path, *, save_probabilities: bool, save_attention: bool,
            attention_slices: Sequence[int], seconds: dict) -> dict:
  """Quantifies one prediction and writes its files; the report goes last (it marks completion)."""
  from absl import logging
  from scoat_jax.inference import attention
  array, geometry, meta, turn = data
  num_classes = predictor.num_classes
  t0 = time.time()
  if item.kind == "image":
    stats = quantify.quantify_slice(labels, num_classes=num_classes)
  else:
    stats = quantify.quantify_volume(labels, geometry, hu=array, num_classes=num_classes)
    _lesion_indices_to_stored(stats["lesions"], turn)
    for warning in stats["warnings"]:
      logging.warning("%s: %s", item.name, warning)
  seconds = {**seconds, "quantify": round(time.time() - t0, 3)}
  t0 = time.time()

  paths = outputs_for(item, output, save_probabilities=save_probabilities)
  if item.kind == "image":
    writers.write_png(labels, paths["mask"], palette=True)
    if save_probabilities:
      writers.write_png(np.rint(np.clip(prob, 0, 1) * 255), paths["probability"])
  else:
    # Back onto the input's own grid, voxel for voxel (`data.orientation`).
    writers.write_volume(turn.to_stored(labels), turn.stored, paths["mask"])
    if save_probabilities:
      writers.write_volume(turn.to_stored(prob), turn.stored, paths["probability"])
  written = {k: p.name for k, p in paths.items()}
  if save_attention:
    source = "uint8" if item.kind == "image" else "hu"
    zs = ([None] if item.kind == "image" else list(attention_slices)
          or [int(np.argmax(np.count_nonzero(labels, axis=(1, 2))))])
    written["attention"] = []
    for z in zs:
      image = array if z is None else array[z]
      path = attention_path(item, output, z)
      attention.save_overlay(path, predictor.display_image(image, source),
                             attention.slice_attention(predictor, image, source=source),
                             labels if z is None else labels[z],
                             title=item.name if z is None else f"{item.name}  z={z}")
      written["attention"].append(path.name)

  report = {"name": item.name, "input": str(item.path),
            "kind": "slice" if item.kind == "image" else "volume", **stats}
  if geometry is not None:
    report["geometry"] = _geometry_json(turn.stored)
    report["orientation"] = turn.describe()
    if save_attention:
      report["attention_slices"] = [turn.axial_slice(z) for z in zs]
  else:
    report["size_hw"] = list(array.shape)
  if meta:
    report["dicom"] = dict(meta)
  report.update(num_classes=num_classes, tta=predictor.tta,
                checkpoints=[m.describe() for m in predictor.models], outputs=written,
                seconds={**seconds, "write": round(time.time() - t0, 3)})
  writers.write_json(report, paths["report"])
  return report


def _lesion_indices_to_stored(found: list[dict], turn) -> None:
  """Lesion centres and boxes are found on the canonical grid; reports index the stored one."""
  if turn is None or turn.is_identity:
    return
  for lesion in found:
    lesion["centre_index"] = list(turn.canonical_index_to_stored(lesion["centre_index"]))
    lesion["bbox_start"], lesion["bbox_stop"] = turn.box_to_stored(lesion["bbox_start"],
                                                                   lesion["bbox_stop"])


def _fmt(v) -> str:
  return "n/a" if v is None else f"{v:.2f}"
