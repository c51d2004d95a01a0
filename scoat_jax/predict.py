r"""Segments CT scans with trained checkpoints and quantifies the opacification.

    python -m scoat_jax.predict --checkpoint=runs/demo --input=scan.nii.gz --output=out/
    python -m scoat_jax.predict --checkpoint=runs/fold0 --checkpoint=runs/fold1 \
        --input=dicom_series_dir --output=out/ --tta --save_probabilities
    python -m scoat_jax.predict --checkpoint=runs/semiseg_fold0 --input=Imgs/ --output=out/

`--input` is a CT volume (.nii/.nii.gz/.mha/.mhd/.nrrd), a DICOM series folder,
a folder of such scans (files and DICOM sub-folders), or a folder of 2-D 8-bit
slice images (.png/.jpg, COVID-SemiSeg style; a folder holding `Imgs/` is
read from there). Per scan `<name>`, into `--output`:

  <name>_mask.nii.gz         labels with exactly the input's size, spacing,
                             origin and direction (2-D: <name>_mask.png at the
                             image's size, palette PNG of label indices)
  <name>_probability.nii.gz  P(opacity), float32 (--save_probabilities;
                             2-D: 8-bit PNG, value = 255 x P)
  <name>_attention_z<k>.png  SAM maps of x_1_1, x_2_2, x_1_3 over slice k
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

import contextlib
import dataclasses
import gzip
import json
import os
import pathlib
import re
import struct
import sys
import time
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from scoat_jax import quantify
from scoat_jax.fileio import atomic_write, write_text
from scoat_jax.data import ct_io

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VOLUME_SUFFIXES = ct_io.READ_SUFFIXES
# Names of files this tool writes; a folder holding any is "holding results".
_RESULT = re.compile(r"_(mask\.nii\.gz|mask\.png|probability\.nii\.gz|probability\.png|report\.json"
                     r"|attention(_z\d+)?\.png)$")
# Volumes named like label masks (the phantom's <stem>_label / _lung, this tool's
# own outputs) are not scans: a folder of scans may hold them beside the images.
_MASK_NAME = re.compile(r"_(mask|label|labels|lung|seg|probability)$", re.IGNORECASE)
# Inputs validated up front are kept in memory for the run up to this size;
# beyond it they are read again when their turn comes.
_KEEP_BYTES = 1 << 29
_PALETTE = [0, 0, 0, 255, 0, 0, 0, 200, 0]  # 0 black, 1 red (GGO/opacity), 2 green


class PredictError(ValueError):
  """A bad prediction request (input, output folder, flags); one line naming the fix."""


@dataclasses.dataclass(frozen=True)
class Item:
  """One input: a CT volume (file or DICOM folder) or one 2-D slice image."""
  name: str
  path: pathlib.Path
  kind: str  # 'volume' | 'image'


# ----------------------------------------------------------------------------- inputs

def _volume_name(path: pathlib.Path) -> str:
  name = path.name
  for suffix in VOLUME_SUFFIXES:
    if name.lower().endswith(suffix):
      return name[:-len(suffix)]
  return path.stem


def _is_dicom_dir(path: pathlib.Path) -> bool:
  import SimpleITK as sitk
  was = sitk.ProcessObject.GetGlobalWarningDisplay()
  sitk.ProcessObject.SetGlobalWarningDisplay(False)  # 'no series found' is an answer here
  try:
    return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))
  finally:
    sitk.ProcessObject.SetGlobalWarningDisplay(was)


def _natural(path: pathlib.Path):
  """Sort key: '2.png' before '10.png' (numbers compared as numbers)."""
  return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", path.name)]


def discover_inputs(path: str | pathlib.Path) -> list[Item]:
  """The scans or slice images that `--input` names.

  Args:
    path: a volume file, a DICOM series folder, a folder of volumes and DICOM
      sub-folders, or a folder of 2-D images (or one holding `Imgs/`). In a
      folder, volumes named like masks (`*_mask`, `*_label(s)`, `*_lung`,
      `*_seg`, `*_probability`) and this tool's outputs are skipped.

  Returns:
    Items in natural name order ('2' before '10').

  Raises:
    PredictError: missing path, a 2-D image given as a scan, an empty folder,
      a folder mixing images and volumes, or two inputs with one name.
  """
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    raise PredictError(f"--input={path}: no such file or folder; give a CT scan, a DICOM series "
                       "folder, or a folder of scans or of 2-D slice images.")
  if path.is_file():
    if path.name.lower().endswith(IMAGE_SUFFIXES):
      raise PredictError(f"--input={path}: a 2-D image given as a scan; a scan is a 3-D volume "
                         "(NIfTI/MHA/NRRD or a DICOM folder). To segment 2-D slices, put them "
                         "in a folder and pass the folder.")
    return [Item(_volume_name(path), path, "volume")]
  if _is_dicom_dir(path):
    return [Item(path.name, path, "volume")]
  volumes, images = [], []
  for child in sorted(path.iterdir(), key=_natural):
    if child.name.startswith(".") or _RESULT.search(child.name):
      continue
    low = child.name.lower()
    if child.is_file() and low.endswith(IMAGE_SUFFIXES):
      images.append(Item(child.stem, child, "image"))
    elif child.is_file() and low.endswith(VOLUME_SUFFIXES):
      if not _MASK_NAME.search(_volume_name(child)):
        volumes.append(Item(_volume_name(child), child, "volume"))
    elif child.is_dir() and _is_dicom_dir(child):
      volumes.append(Item(child.name, child, "volume"))
  if not volumes and not images and (path / "Imgs").is_dir():
    return discover_inputs(path / "Imgs")  # the COVID-SemiSeg layout: Imgs/ and GT/
  if volumes and images:
    raise PredictError(f"--input={path}: mixes 2-D images ({images[0].path.name}) and CT volumes "
                       f"({volumes[0].path.name}); put them in separate folders.")
  items = volumes or images
  if not items:
    raise PredictError(f"--input={path}: holds no CT scan (.nii/.nii.gz/.mha/.mhd/.nrrd, DICOM "
                       "series folders) and no .png/.jpg slice; point --input at the data.")
  names: dict[str, pathlib.Path] = {}
  for item in items:
    if item.name in names:
      raise PredictError(f"--input={path}: {names[item.name].name} and {item.path.name} would both "
                         f"write '{item.name}_*' outputs; rename one.")
    names[item.name] = item.path
  return items


def read_slice_image(path: str | pathlib.Path) -> np.ndarray:
  """Reads a 2-D 8-bit grey slice (PNG/JPG) without changing its values.

  Raises:
    PredictError: unreadable or corrupt file, colour image, more than 8 bits.
  """
  from PIL import Image, UnidentifiedImageError
  path = pathlib.Path(path)
  try:
    with Image.open(path) as im:
      mode = im.mode
      if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raise PredictError(f"{path}: a {mode} (16/32-bit) image; 2-D slices must be 8-bit grey "
                           "exports (CT in HU belongs in NIfTI or DICOM).")
      if mode in ("L", "LA"):
        arr = np.asarray(im.getchannel(0) if mode == "LA" else im)
      else:
        rgb = np.asarray(im.convert("RGB")).astype(np.int16)
        # A grey slice saved as RGB has equal channels (JPEG may differ by a few levels).
        if np.abs(rgb - rgb.mean(axis=-1, keepdims=True)).mean() > 3.0:
          raise PredictError(f"{path}: a colour image, not a grey CT slice; give 8-bit grey "
                             "slices exported in a lung window.")
        arr = np.asarray(im.convert("L"))
  except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
    if isinstance(e, PredictError):
      raise
    raise PredictError(f"{path}: cannot decode this image ({str(e).splitlines()[0]}); "
                       "replace the corrupt file.") from None
  if arr.ndim != 2 or min(arr.shape) < 2:
    raise PredictError(f"{path}: image of shape {arr.shape}; a slice must be 2-D grey, at least 2x2.")
  return np.ascontiguousarray(arr, np.uint8)


def check_nifti_complete(path: str | pathlib.Path) -> None:
  """Raises PredictError for a truncated or corrupt NIfTI (.nii / .nii.gz) file.

  ITK reads a NIfTI file that ends early (a broken download or copy) without
  complaint and fills the missing voxels with whatever was in memory. The
  header says how many bytes the voxels take; a .nii.gz is decompressed in
  full, which also checks its CRC.
  """
  path = pathlib.Path(path)
  name = path.name.lower()
  if not name.endswith((".nii", ".nii.gz")):
    return
  opener = gzip.open if name.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      header = f.read(544)
      size = len(header)
      while chunk := f.read(1 << 22):
        size += len(chunk)
  except (OSError, EOFError, zlib.error) as e:
    raise PredictError(f"{path}: corrupt or truncated file ({str(e).splitlines()[0]}); copy or "
                       "export the scan again.") from None
  for order in "<>":
    sizeof = struct.unpack(order + "i", header[:4])[0] if size >= 4 else 0
    if sizeof == 348 and size >= 348:          # NIfTI-1
      dims = struct.unpack(order + "8h", header[40:56])
      bitpix = struct.unpack(order + "h", header[72:74])[0]
      offset = int(struct.unpack(order + "f", header[108:112])[0])
    elif sizeof == 540 and size >= 540:        # NIfTI-2
      dims = struct.unpack(order + "8q", header[16:80])
      bitpix = struct.unpack(order + "h", header[14:16])[0]
      offset = struct.unpack(order + "q", header[168:176])[0]
    else:
      continue
    if not 1 <= dims[0] <= 7:
      return  # Not a header we understand: leave the verdict to ITK.
    expected = max(offset, sizeof) + int(np.prod([max(d, 1) for d in dims[1:dims[0] + 1]])) * bitpix // 8
    if size < expected:
      raise PredictError(f"{path}: truncated file ({size} of {expected} bytes); copy or export "
                         "the scan again.")
    return


@contextlib.contextmanager
def _native_stderr_silenced():
  """Hides what C++ libraries print on stderr (MetaIO, GDCM); Python errors still raise."""
  try:
    fd = sys.stderr.fileno()
  except (AttributeError, ValueError, OSError):  # stderr replaced (e.g. captured by a test runner)
    yield
    return
  sys.stderr.flush()
  saved = os.dup(fd)
  with open(os.devnull, "w") as null:
    os.dup2(null.fileno(), fd)
  try:
    yield
  finally:
    os.dup2(saved, fd)
    os.close(saved)


def _read(item: Item):
  """(array, geometry or None, DICOM metadata) of one input."""
  if item.kind == "image":
    return read_slice_image(item.path), None, {}
  check_nifti_complete(item.path)
  with _native_stderr_silenced():
    ct = ct_io.read_ct(item.path)
  return ct.hu, ct.geometry, ct.metadata


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
  """Files in `output` that this tool (or follow-up) wrote before."""
  if not output.is_dir():
    return []
  return sorted(p for p in output.iterdir()
                if p.is_file() and (_RESULT.search(p.name) or p.name.startswith("followup.")))


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


def dumps(data) -> str:
  """JSON with one key per line but short lists of numbers on one line (readable reports)."""
  text = json.dumps(data, indent=1, allow_nan=False)
  return re.sub(r"\[\s+([^\[\]{}\"]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)


def write_json(data: dict, path: pathlib.Path) -> pathlib.Path:
  """Writes `data` as JSON atomically (NaN is refused: undefined values are null)."""
  return write_text(dumps(data) + "\n", path)


def write_png(array: np.ndarray, path: pathlib.Path, *, palette: bool = False) -> pathlib.Path:
  """Writes an (H, W) 0..255 array as an 8-bit PNG; `palette` colours label indices 0/1/2."""
  from PIL import Image
  image = Image.fromarray(np.ascontiguousarray(array, np.uint8), mode="L")
  if palette:
    image = image.convert("P")
    image.putpalette(_PALETTE + [0, 0, 0] * 253)
  return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def write_volume(array: np.ndarray, geometry: ct_io.Geometry, path: pathlib.Path) -> pathlib.Path:
  """Writes labels (uint8) or P(opacity) (float32) with exactly the scan's geometry.

  Args:
    array: (z, y, x) uint8 labels or float32 probabilities; stored as that dtype.
    geometry: the scan's grid (size, spacing, origin, direction are copied).
    path: output file (.nii.gz), written atomically with the usual permissions.

  Returns:
    The written path.
  """
  import SimpleITK as sitk
  array = np.asarray(array)
  if array.dtype not in (np.uint8, np.float32) or array.shape != geometry.shape:
    raise PredictError(f"{path}: cannot write a {array.dtype} array of shape {array.shape} on "
                       f"a {geometry.shape} grid; pass uint8 labels or float32 probabilities "
                       "predicted on that scan.")
  image = geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array)))
  return atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, useCompression=True))


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
        progress: bool = True, items: Sequence[Item] | None = None) -> list[dict]:
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

  Returns:
    The reports written, in input order (each also has 'outputs').

  Raises:
    ValueError (PredictError, CTError, CheckpointError, ...): any bad input,
      before anything is written.
  """
  from absl import logging
  from scoat_jax import infer

  output = pathlib.Path(output).expanduser()
  items = list(discover_inputs(input_path) if items is None else items)
  attention_slices = list(attention_slices)
  if attention_slices and not save_attention:
    raise PredictError("--attention_slices needs --save_attention.")
  if attention_slices and any(i.kind == "image" for i in items):
    raise PredictError("--attention_slices applies to volumes; for 2-D images every image gets "
                       "its overlay with --save_attention.")
  check_output(output, overwrite=overwrite)
  kept, budget = {}, _KEEP_BYTES
  for item in items:  # Read everything once before writing anything.
    data = _read(item)
    depth = data[0].shape[0]
    if item.kind == "volume" and attention_slices and max(attention_slices) >= depth:
      raise PredictError(f"--attention_slices={max(attention_slices)} is beyond {item.path} "
                         f"({depth} slices, z = 0..{depth - 1}).")
    if data[0].nbytes <= budget:
      kept[item], budget = data, budget - data[0].nbytes
  models = infer.load_ensemble(list(checkpoints))
  if any(i.kind == "volume" for i in items) and "semiseg" in str(models[0].config.data.name):
    logging.warning("the model was trained on 8-bit COVID-SemiSeg slices; HU volumes are windowed "
                    "to %s HU for it", models[0].hu_window)
  output.mkdir(parents=True, exist_ok=True)

  predictor = infer.Predictor(models, tta=tta, batch_size=batch_size)
  options = dict(save_probabilities=save_probabilities, save_attention=save_attention,
                 attention_slices=attention_slices)
  reports = []
  for item, data, labels, prob, seconds in _predictions(predictor, items, kept,
                                                        save_probabilities, progress):
    report = _finish(predictor, item, data, labels, prob, output, seconds=seconds, **options)
    logging.info("%s: LOV %s ml, lung %s ml, POI %s%%, %d lesion(s) in %.1f s", item.name,
                 _fmt(report.get("lov_ml")), _fmt(report.get("lung_volume_ml")),
                 _fmt(report.get("poi_percent")), report["num_lesions"],
                 sum(report["seconds"].values()))
    reports.append(report)
  return reports


def _predictions(predictor, items, kept, with_probability: bool, progress: bool):
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
        ahead[item] = kept.pop(item) if item in kept else _read(item)
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
        data = kept.pop(item) if item in kept else _read(item)
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
  from scoat_jax import attention
  array, geometry, meta = data
  num_classes = predictor.num_classes
  t0 = time.time()
  if item.kind == "image":
    stats = quantify.quantify_slice(labels, num_classes=num_classes)
  else:
    stats = quantify.quantify_volume(labels, geometry, hu=array, num_classes=num_classes)
  seconds = {**seconds, "quantify": round(time.time() - t0, 3)}
  t0 = time.time()

  paths = outputs_for(item, output, save_probabilities=save_probabilities)
  if item.kind == "image":
    write_png(labels, paths["mask"], palette=True)
    if save_probabilities:
      write_png(np.rint(np.clip(prob, 0, 1) * 255), paths["probability"])
  else:
    write_volume(labels, geometry, paths["mask"])
    if save_probabilities:
      write_volume(prob, geometry, paths["probability"])
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
    report["geometry"] = _geometry_json(geometry)
  else:
    report["size_hw"] = list(array.shape)
  if meta:
    report["dicom"] = dict(meta)
  report.update(num_classes=num_classes, tta=predictor.tta,
                checkpoints=[m.describe() for m in predictor.models], outputs=written,
                seconds={**seconds, "write": round(time.time() - t0, 3)})
  write_json(report, paths["report"])
  return report


def _fmt(v) -> str:
  return "n/a" if v is None else f"{v:.2f}"


# ----------------------------------------------------------------------------- CLI

def define_flags() -> None:
  from absl import flags
  flags.DEFINE_multi_string("checkpoint", None, "Training workdir (its best step), its checkpoints "
                            "folder, or a step folder; repeat to average an ensemble.")
  flags.DEFINE_string("input", None, "CT file, DICOM series folder, folder of scans, or folder "
                      "of 2-D .png/.jpg slices.")
  flags.DEFINE_string("output", None, "Results folder (created if missing).")
  flags.DEFINE_bool("save_probabilities", False, "Also write P(opacity) maps.")
  flags.DEFINE_bool("save_attention", False, "Write SAM overlays (x_1_1, x_2_2, x_1_3).")
  flags.DEFINE_list("attention_slices", [], "z indices for --save_attention (default: the slice "
                    "with the most predicted opacity).")
  define_run_flags()


def define_run_flags() -> None:
  """The flags of every command that segments scans (predict, followup)."""
  from absl import flags
  # Registered as the main program's own flags (absl names it by sys.argv[0]),
  # so that `--help` of whichever tool runs lists them.
  main = dict(module_name=sys.argv[0])
  flags.DEFINE_bool("tta", False, "Flip test-time augmentation (twice the compute).", **main)
  flags.DEFINE_bool("overwrite", False, "Allow an output folder holding earlier results (only "
                    "this run's files are replaced).", **main)
  flags.DEFINE_integer("batch_size", 0, "Slices per forward pass; memory grows with it. 0: one "
                       "per CPU device (fastest there), 8 per GPU/TPU.", **main)
  flags.DEFINE_string("compilation_cache_dir", "~/.cache/scoat_jax/jax_cache",
                      "JAX compilation cache ('' turns it off).", **main)


def echo(text: str) -> None:
  """Prints text to stdout even where the terminal cannot show every character (e.g. '±')."""
  encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
  sys.stdout.write(text.encode(encoding, "replace").decode(encoding))
  sys.stdout.flush()


def fail(message: str) -> None:
  """Prints a one-line error and exits with status 2."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(2)


def cli(argv: Sequence[str], call: Callable[[], object], *, required: Sequence[str] = (),
        show: str | pathlib.Path | None = None, positional: bool = False,
        compilation_cache_dir: str | None = None) -> None:
  """The shared body of the command-line tools' `main`.

  Args:
    argv: what absl left over; refused unless `positional`.
    call: does the work; its ValueError or OSError becomes one line
      `error: ...` on stderr and exit status 2.
    required: names of flags that must be given.
    show: a text file to print on success (the table the tool wrote).
    positional: leftover arguments are allowed (the caller uses them).
    compilation_cache_dir: enable JAX's persistent compilation cache there.
  """
  from absl import flags
  if len(argv) > 1 and not positional:
    fail(f"unexpected arguments {list(argv[1:])}; flags look like --name=value.")
  tool = pathlib.Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "scoat_jax"
  for name in required:
    if not getattr(flags.FLAGS, name):
      fail(f"--{name} is required (python -m scoat_jax.{tool} --help).")
  from scoat_jax import host_memory
  host_memory.keep_freed_memory()  # before JAX starts its threads
  try:
    if compilation_cache_dir is not None:
      from scoat_jax import compilation_cache
      compilation_cache.enable(compilation_cache_dir)
    call()
  except (ValueError, OSError) as e:
    fail(str(e))
  if show is not None:
    echo(pathlib.Path(show).expanduser().read_text(encoding="utf-8"))


def main(argv):
  from absl import flags
  FLAGS = flags.FLAGS
  cli(argv, lambda: run(
      FLAGS.checkpoint, FLAGS.input, FLAGS.output, tta=FLAGS.tta,
      save_probabilities=FLAGS.save_probabilities, save_attention=FLAGS.save_attention,
      attention_slices=parse_slices(FLAGS.attention_slices), overwrite=FLAGS.overwrite,
      batch_size=FLAGS.batch_size),
      required=("checkpoint", "input", "output"), compilation_cache_dir=FLAGS.compilation_cache_dir)


if __name__ == "__main__":
  from absl import app
  define_flags()
  app.run(main)
