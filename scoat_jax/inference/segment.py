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
  <name>_seg.dcm             DICOM SEG for DICOM input (--output_format=dicom_seg
                             or both), referencing the source series
  <name>_report.png / .pdf   key images: the three axial slices with the most
                             opacity outlined, a coronal view, the numbers
  <name>_report.json         lov_ml, lung_volume_ml, poi_percent, lesions,
                             class volumes (3-class models), the checkpoints
  predictions.csv            one row per scan (the cohort table, `cohort_table`)

Everything is checked before anything is written: the checkpoints load and
fit their model, every input is read in full, and the output folder holds
no earlier results (unless --overwrite: `output_folder` says what it keeps)
and lies outside the input. Each file is written under a temporary name and
renamed; one scan's files and its row of predictions.csv are written with
SIGINT and SIGTERM held, so an interrupted run leaves whole scans only. A bad
input prints one line `error: ...` on stderr and exits with status 2.
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from collections.abc import Sequence

import numpy as np

from scoat_jax.data import readers, writers
from scoat_jax.data.readers import Item
from scoat_jax.common import signals
from scoat_jax.inference import cohort_table, output_folder, postprocessing, scan
from scoat_jax.inference.output_folder import PredictError

OUTPUT_FORMATS = ("nifti", "dicom_seg", "both")

# Inputs validated up front are kept in memory for the run up to this size;
# beyond it they are read again when their turn comes.
_KEEP_BYTES = 1 << 29


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

def outputs_for(item: Item, output: pathlib.Path, *, save_probabilities: bool,
                output_format: str = "nifti", key_images: bool = False) -> dict:
  """Where an input's files go (attention overlays are named per slice when written)."""
  ext = ".png" if item.kind == "image" else ".nii.gz"
  out = {}
  if item.kind == "image" or output_format != "dicom_seg":
    out["mask"] = output / f"{item.name}_mask{ext}"
  if item.kind == "volume" and output_format != "nifti" and item.path.is_dir():
    out["dicom_seg"] = output / f"{item.name}_seg.dcm"
  if save_probabilities:
    out["probability"] = output / f"{item.name}_probability{ext}"
  if key_images:
    out["key_images_png"] = output / f"{item.name}_report.png"
    out["key_images_pdf"] = output / f"{item.name}_report.pdf"
  out["report"] = output / f"{item.name}_report.json"
  return out


def attention_path(item: Item, output: pathlib.Path, z: int | None) -> pathlib.Path:
  suffix = "" if z is None else f"_z{z:04d}"
  return output / f"{item.name}_attention{suffix}.png"


# ----------------------------------------------------------------------------- the run

def _progress_bar(total: int, name: str, enabled: bool):
  from tqdm import tqdm
  # disable=None: draw only on a terminal, so logs and pipes stay clean.
  return tqdm(total=total, desc=name, unit="slice", file=sys.stderr, leave=False,
              disable=None if enabled and total else True)


@dataclasses.dataclass(frozen=True)
class Options:
  """What a predict run writes and how (the flags of `predict` past input and output)."""
  tta: bool = False
  save_probabilities: bool = False
  save_attention: bool = False
  attention_slices: tuple[int, ...] = ()
  output_format: str = "nifti"
  key_images: bool = True
  postprocessing: bool = True
  skip_outside_lung: bool = True
  lung_mask: str | None = None
  series_id: str | None = None
  lung_rule: bool = True


def lung_mask_path(lung_mask: str | None, item: Item, single: bool) -> pathlib.Path | None:
  """The external lung mask of one input: the file itself, or `<name>[_lung].*` in a folder."""
  if not lung_mask:
    return None
  path = pathlib.Path(lung_mask).expanduser()
  if path.is_file():
    if not single:
      raise PredictError(f"--lung_mask={path}: one file for several scans; give a folder with "
                         "<name>.nii.gz or <name>_lung.nii.gz per scan.")
    return path
  if not path.is_dir():
    raise PredictError(f"--lung_mask={path}: no such file or folder; give the lung mask file "
                       "(one scan) or a folder of <name>[_lung].nii.gz files.")
  for stem in (f"{item.name}_lung", item.name):
    for suffix in readers.VOLUME_SUFFIXES:
      if (path / f"{stem}{suffix}").is_file():
        return path / f"{stem}{suffix}"
  raise PredictError(f"--lung_mask={path}: no lung mask for {item.name} (looked for "
                     f"{item.name}_lung.nii.gz or {item.name}.nii.gz, .mha, .nrrd); add it.")


def _check_options(options: Options, items: Sequence[Item]) -> None:
  if options.output_format not in OUTPUT_FORMATS:
    raise PredictError(f"--output_format={options.output_format}: choose one of "
                       f"{', '.join(OUTPUT_FORMATS)}.")
  if options.output_format == "dicom_seg":
    other = [i for i in items if i.kind != "volume" or not i.path.is_dir()]
    if other:
      raise PredictError(f"--output_format=dicom_seg: {other[0].path} is not a DICOM series; "
                         "DICOM SEG references DICOM slices: use --output_format=both (SEG "
                         "where the input is DICOM, NIfTI for all) or nifti.")
  if options.attention_slices and not options.save_attention:
    raise PredictError("--attention_slices needs --save_attention.")
  if options.attention_slices and any(i.kind == "image" for i in items):
    raise PredictError("--attention_slices applies to volumes; for 2-D images every image gets "
                       "its overlay with --save_attention.")
  if options.lung_mask and any(i.kind == "image" for i in items):
    raise PredictError(f"--lung_mask={options.lung_mask}: 2-D slices get no lung volume; drop "
                       "the flag for them.")


def _check_rule(rule: dict | None, items: Sequence[Item]) -> None:
  if not postprocessing.is_active(rule) or not rule.get("min_size"):
    return
  kind = "image" if rule["unit"] == "pixels" else "volume"
  other = [i for i in items if i.kind != kind]
  if other:
    raise PredictError(f"{other[0].path}: the bundle's post-processing counts {rule['unit']} "
                       f"(chosen on {'2-D slices' if kind == 'image' else 'CT volumes'}); pass "
                       "--no_postprocessing for this input.")


def run(checkpoints: Sequence[str], input_path: str, output: str, *, tta: bool = False,
        save_probabilities: bool = False, save_attention: bool = False,
        attention_slices: Sequence[int] = (), overwrite: bool = False, batch_size: int = 0,
        progress: bool = True, items: Sequence[Item] | None = None,
        series_id: str | None = None, output_format: str = "nifti", key_images: bool = True,
        postprocess: bool = True, skip_outside_lung: bool = True, lung_mask: str | None = None,
        config=None, lung_rule: bool = True) -> list[dict]:
  """Predicts and quantifies every input; the programmatic form of the CLI.

  Args:
    checkpoints: workdirs, checkpoints folders, step folders, bundles or
      PyTorch weights (with `config`); several average their probabilities.
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
    output_format: 'nifti', 'dicom_seg' (DICOM input only) or 'both'.
    key_images: write `<name>_report.png` and `.pdf`.
    postprocess: apply the bundle's post-processing rule.
    skip_outside_lung: no network pass on slices beyond the lungs' extent.
    lung_mask: an external lung mask file (one scan) or folder (`<name>[_lung].*`).
    lung_rule: CT volumes keep only opacity near the lung (`inference.lung_rule`).
    config: the config PyTorch weights are read with.

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
  options = Options(tta, save_probabilities, save_attention, tuple(attention_slices),
                    output_format, key_images, postprocess, skip_outside_lung, lung_mask,
                    series_id, lung_rule)
  _check_options(options, items)
  earlier = output_folder.check(output, overwrite=overwrite, input_path=input_path, items=items)
  inference.check_batch_size(batch_size)  # a bad flag is refused before the scans are read
  lungs = {i: lung_mask_path(lung_mask, i, len(items) == 1) for i in items}
  kept, budget = {}, _KEEP_BYTES
  for item in items:  # Read everything once before writing anything.
    data = readers.read_item(item, series_id)
    depth = data[0].shape[0]
    if item.kind == "volume" and attention_slices and max(attention_slices) >= depth:
      raise PredictError(f"--attention_slices={max(attention_slices)} is beyond {item.path} "
                         f"({depth} slices, z = 0..{depth - 1}).")
    lung = scan.read_lung_mask(lungs[item], data) if lungs[item] else None
    if output_format != "nifti" and item.kind == "volume" and item.path.is_dir():
      from scoat_jax.data import dicom_seg
      dicom_seg.series_files(item.path, series_id)  # the SEG's sources, checked up front
    if data[0].nbytes <= budget:
      kept[item], budget = (data, lung), budget - data[0].nbytes
  models = inference.load_ensemble(list(checkpoints), config=config)
  rule = models[0].postprocessing if postprocess else None
  _check_rule(rule, items)
  if save_attention and not type(models[0].model).attention_maps:
    from scoat_jax.models import available_models, model_class
    with_maps = [n for n in available_models() if model_class(n).attention_maps]
    raise PredictError(f"--save_attention: {models[0].config.model_name} has no attention maps "
                       f"(networks with maps: {', '.join(with_maps)}); drop the flag.")
  if any(i.kind == "volume" for i in items) and models[0].intensity == "uint8":
    if models[0].export_window is not None:
      logging.info("the model was trained on 8-bit slice exports; HU volumes are read through "
                   "the window estimated from them, %g..%g HU", *models[0].hu_window)
    else:
      logging.warning("the model was trained on 8-bit slice exports whose HU window it does not "
                      "store (trained on a dataset built before the estimate); HU volumes are "
                      "windowed to config.data.hu_window %g..%g HU for it: rebuild the dataset "
                      "and export a bundle to store it", *models[0].hu_window)
  predictor = inference.Predictor(models, tta=tta, batch_size=batch_size)
  try:
    output.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise PredictError(f"--output={output}: cannot create it ({e.strerror or e}); choose a "
                       "folder you can write to.") from None
  left = output_folder.remove_temporaries(output)
  if left:
    logging.warning("%s: removed %d temporary file(s) an interrupted run left (%s)", output,
                    len(left), ", ".join(left))
  label = scan.model_label(models)
  reports = []
  try:
    for item, data, result, seconds in _predictions(predictor, items, kept, lungs, options, rule,
                                                    progress):
      with signals.held():  # one scan's files and its row go in together
        report = _finish(predictor, item, data, result, output, options, label, seconds=seconds)
        if overwrite:
          stale = output_folder.remove_stale(output, item.name, _written_names(report))
          if stale:
            logging.info("%s: removed the earlier run's %s (not written by this run)", item.name,
                         ", ".join(stale))
        reports.append(report)
        cohort_table.write(output_folder.table_reports(reports, earlier),
                           output / cohort_table.FILE_NAME)
      logging.info("%s: LOV %s ml, lung %s ml, POI %s%%, %d lesion(s) in %.1f s", item.name,
                   _fmt(report.get("lov_ml")), _fmt(report.get("lung_volume_ml")),
                   _fmt(report.get("poi_percent")), report["num_lesions"],
                   sum(report["seconds"].values()))
  except KeyboardInterrupt as e:
    raise KeyboardInterrupt(
        f"predict {str(e) or 'stopped by Ctrl-C (SIGINT)'} after {len(reports)} of {len(items)} "
        f"scan(s): each finished scan has all its files, its report and its row in "
        f"{output / cohort_table.FILE_NAME}; the other scans got no new files (run again with "
        "--overwrite to finish)") from None
  if not reports:
    cohort_table.write(output_folder.table_reports(reports, earlier),
                       output / cohort_table.FILE_NAME)
  return reports


def _written_names(report: dict) -> list[str]:
  """The file names a scan's report lists under 'outputs' (attention overlays included)."""
  names = []
  for value in report.get("outputs", {}).values():
    names += value if isinstance(value, list) else [value]
  return names


def _predictions(predictor, items, kept, lungs, options: Options, rule, progress: bool):
  """Yields (item, (array, geometry, meta, turn), ScanResult, seconds) in input order.

  Volumes go one at a time, each with its own progress bar. 2-D images share
  batches: they stream through one `predict_slices` call, and each image is
  held in `ahead` (at most two batches) until its prediction comes back.
  """
  from absl import logging
  ahead: dict[Item, tuple] = {}

  def read(item):
    if item in kept:
      return kept.pop(item)
    data = readers.read_item(item, options.series_id)
    return data, (scan.read_lung_mask(lungs[item], data) if lungs.get(item) else None)

  def images():
    for item in items:
      if item.kind == "image":
        ahead[item] = read(item)[0]
        yield ahead[item][0]

  image_predictions = predictor.predict_slices(images(), source="uint8",
                                               count=sum(i.kind == "image" for i in items))
  with _progress_bar(sum(i.kind == "image" for i in items), "slices", progress) as image_bar:
    for item in items:
      t0 = time.time()
      if item.kind == "image":
        labels, prob = next(image_predictions)
        data = ahead.pop(item)
        image_bar.update(1)
        result = scan.finish_slice(predictor, labels, prob, rule=rule)
      else:
        data, lung = read(item)
        depth = data[0].shape[0]
        with _progress_bar(depth, item.name, progress) as bar:
          def advance(n, bar=bar, depth=depth, name=item.name, t0=t0):
            bar.update(n - bar.n)
            # Without a terminal the bar is off: a log line every tenth of the scan instead.
            if bar.disable and progress and n * 10 // depth != (n - 1) * 10 // depth:
              logging.info("%s: %d/%d slices, %.1f s", name, n, depth, time.time() - t0)
          result = scan.run_volume(predictor, data, lung=lung, rule=rule,
                                   skip_outside_lung=options.skip_outside_lung,
                                   lung_rule=options.lung_rule,
                                   with_probability=options.save_probabilities, progress=advance)
      # Volumes time their own steps (lung mask, network, quantify) in result.stats.
      yield item, data, result, ({"network": round(time.time() - t0, 3)}
                                 if item.kind == "image" else {})


def _finish(predictor, item: Item, data: tuple, result, output: pathlib.Path, options: Options,
            model: str, *, seconds: dict) -> dict:
  """Writes one scan's files; the report goes last (it marks completion)."""
  from absl import logging
  array, geometry, _, turn = data
  labels, prob = result.labels, result.probability
  for warning in result.stats.get("warnings", []):
    logging.warning("%s: %s", item.name, warning)
  t0 = time.time()
  paths = outputs_for(item, output, save_probabilities=options.save_probabilities,
                      output_format=options.output_format, key_images=options.key_images)
  # A DICOM series' files in slice order, listed once for the SEG and the key images.
  files = None
  if item.kind == "volume" and item.path.is_dir() and ("dicom_seg" in paths or options.key_images):
    from scoat_jax.data import dicom_seg
    files = dicom_seg.series_files(item.path, options.series_id)
  if item.kind == "image":
    writers.write_png(labels, paths["mask"], palette=True)
    if options.save_probabilities:
      writers.write_png(np.rint(np.clip(prob, 0, 1) * 255), paths["probability"])
  else:
    # Back onto the input's own grid, voxel for voxel (`data.orientation`).
    stored = turn.to_stored(labels)
    if "mask" in paths:
      writers.write_volume(stored, turn.stored, paths["mask"])
    if "dicom_seg" in paths:
      _write_dicom_seg(stored, files, paths["dicom_seg"], predictor.num_classes, model)
    if options.save_probabilities:
      writers.write_volume(turn.to_stored(prob), turn.stored, paths["probability"])
  written = {k: p.name for k, p in paths.items()}
  zs = []
  if options.save_attention:
    zs = _write_attention(predictor, item, array, labels, output, options)
    written["attention"] = [attention_path(item, output, z).name for z in zs]

  report = scan.report(predictor, item.name, str(item.path), readers.Loaded(*data), result,
                       model)
  if options.save_attention:
    report["attention_slices"] = [turn.axial_slice(z) for z in zs]
  report["outputs"] = written
  if options.key_images:
    from scoat_jax.inference import key_images
    volume = geometry is not None
    key_images.write_key_images(
        paths["key_images_png"], paths["key_images_pdf"], array, labels,
        spacing_xyz=geometry.spacing if volume else None, report=report, model=model,
        date=time.strftime("%Y-%m-%d"), title=item.name,
        lung=result.lung if volume else None,
        table_mm=key_images.table_positions(geometry) if volume else None,
        instance_number=_instance_numbers(files, turn) if volume else None)
  report["seconds"] = {**report.pop("seconds", {}), **seconds, "write": round(time.time() - t0, 3)}
  writers.write_json(report, paths["report"])
  return report


def _instance_numbers(files: list[pathlib.Path] | None, turn):
  """For a DICOM series read as axial slices (`files` in slice order): canonical z -> the
  slice's InstanceNumber (the image number a viewer shows), else None (non-DICOM input, or
  a series stored otherwise)."""
  if files is None or turn is None or turn.source_axis[2] != 2:
    return None
  import pydicom

  def number(z: int):
    stored = turn.axial_slice(z)["stored_index"]
    if not 0 <= stored < len(files):
      return None
    value = pydicom.dcmread(files[stored], stop_before_pixels=True,
                            specific_tags=["InstanceNumber"]).get("InstanceNumber")
    return int(value) if value not in (None, "") else None
  return number


def _write_dicom_seg(stored: np.ndarray, files: list[pathlib.Path], path: pathlib.Path,
                     num_classes: int, model: str) -> None:
  from scoat_jax.data import dicom_seg
  # ContentDescription is a DICOM LO (64 characters): the network, not the paths.
  dicom_seg.write_dicom_seg(stored, files, path, num_classes=num_classes,
                            model_description=model.split(",")[0][:64])


def _write_attention(predictor, item: Item, array, labels, output, options: Options) -> list:
  from scoat_jax.inference import attention
  source = "uint8" if item.kind == "image" else "hu"
  zs = ([None] if item.kind == "image" else list(options.attention_slices)
        or [int(np.argmax(np.count_nonzero(labels, axis=(1, 2))))])
  for z in zs:
    image = array if z is None else array[z]
    attention.save_overlay(attention_path(item, output, z), predictor.display_image(image, source),
                           attention.slice_attention(predictor, image, source=source),
                           labels if z is None else labels[z],
                           title=item.name if z is None else f"{item.name}  z={z}")
  return zs


def _fmt(v) -> str:
  return "n/a" if v is None else f"{v:.2f}"
