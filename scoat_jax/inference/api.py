"""`scoat_jax.segment(scan, model)`: one call from a scan to its mask, probabilities and numbers.

    import scoat_jax
    result = scoat_jax.segment("scan.nii.gz", "model/")       # a bundle, workdir or step
    result.report["poi_percent"], result.report["lov_ml"]
    sitk.WriteImage(result.mask, "mask.nii.gz")                # the input's own geometry

`scan` is a path (a CT file or a DICOM series folder, or a 2-D .png/.jpg
slice), a SimpleITK image (3-D in HU, or 2-D 8-bit), or a NumPy array: (z, y,
x) in HU with `spacing=(x, y, z)` mm (and optionally `origin`), or (H, W)
8-bit. Every input goes through the checks and the steps of `predict`
(`inference.scan`): the same mask, the same report, whatever form the scan
came in. `model` is anything `--checkpoint` takes (a sequence of them for an
ensemble) or a `Predictor` made once with `load` and reused across calls,
which avoids reading the weights again.
"""
from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence

import numpy as np

from scoat_jax.data import ct_io, orientation, readers
from scoat_jax.data.readers import Loaded
from scoat_jax.inference import scan as scan_lib
from scoat_jax.inference.loading import InferenceError, load_ensemble
from scoat_jax.inference.predictor import Predictor


@dataclasses.dataclass
class Result:
  """What `segment` returns.

  Attributes:
    mask: labels as a SimpleITK image in the input's geometry (uint8; 0
      background, 1 opacity, or 1 ground glass / 2 consolidation).
    probabilities: P(opacity) as a float32 SimpleITK image on the same grid.
    report: the numbers `predict` writes in `<name>_report.json` (LOV, lung
      volume, POI, lesions, class volumes, warnings, the model).
    labels: `mask` as a NumPy array in the input's own axis order.
  """
  mask: object
  probabilities: object
  report: dict
  labels: np.ndarray


def load(model, *, tta: bool = False, batch_size: int = 0, config=None) -> Predictor:
  """A Predictor for `model` (a path or a sequence of paths), to reuse across `segment` calls."""
  paths = [model] if isinstance(model, (str, pathlib.Path)) else list(model)
  return Predictor(load_ensemble(paths, config=config), tta=tta, batch_size=batch_size)


def _from_array(scan: np.ndarray, spacing, origin) -> tuple[str, Loaded]:
  scan = np.asarray(scan)
  if scan.ndim == 2:
    if scan.dtype != np.uint8:
      raise InferenceError(f"a 2-D scan array has dtype {scan.dtype}; 2-D input is an 8-bit "
                           "slice export (uint8); a CT in HU is a 3-D (z, y, x) array.")
    return "image", Loaded(np.ascontiguousarray(scan), None, {})
  if scan.ndim != 3:
    raise InferenceError(f"a scan array has shape {scan.shape}; give (z, y, x) in HU with "
                         "spacing=(x, y, z) mm, or an (H, W) uint8 slice.")
  if spacing is None:
    raise InferenceError("a 3-D scan array needs spacing=(x, y, z) in mm: volumes and POI "
                         "depend on it.")
  spacing = tuple(float(s) for s in spacing)
  if len(spacing) != 3:
    raise InferenceError(f"spacing={spacing} must be (x, y, z) in mm")
  geometry = ct_io.Geometry.for_array(scan.shape, spacing,
                                      origin=tuple(origin) if origin is not None else (0, 0, 0))
  ct_io.check_spacing(geometry, "the scan array")
  hu = scan.astype(np.float32) if scan.dtype.kind == "f" else scan
  ct_io.check_hu(hu, "the scan array")
  turn = orientation.reorientation(geometry, what="the scan array")
  return "volume", Loaded(hu, geometry, {}, turn)


def _read(scan, spacing, origin, series_id) -> tuple[str, str, Loaded]:
  """(name, source, Loaded) of any scan form `segment` takes."""
  import SimpleITK as sitk
  if isinstance(scan, (str, pathlib.Path)):
    path = pathlib.Path(scan).expanduser()
    if path.is_file() and path.name.lower().endswith(readers.IMAGE_SUFFIXES):
      item = readers.Item(path.stem, path, "image")
    else:
      found = readers.discover_inputs(path)
      if len(found) != 1:
        raise InferenceError(f"{path}: holds {len(found)} scans; segment() takes one (use "
                             "`python -m scoat_jax.predict` for a folder).")
      item = found[0]
    return item.name, str(item.path), readers.read_item(item, series_id)
  if isinstance(scan, sitk.Image):
    if scan.GetDimension() == 2:
      return "scan", "SimpleITK image", _from_array(sitk.GetArrayFromImage(scan), None, None)[1]
    ct = ct_io.from_image(scan, "the SimpleITK image")
    return "scan", "SimpleITK image", Loaded(ct.hu, ct.geometry, {}, ct.reorientation)
  if isinstance(scan, np.ndarray):
    return "scan", "array", _from_array(scan, spacing, origin)[1]
  raise InferenceError(f"scan is a {type(scan).__name__}; give a path, a SimpleITK image or a "
                       "NumPy array.")


def segment(scan, model, *, spacing: Sequence[float] | None = None,
            origin: Sequence[float] | None = None, tta: bool = False,
            lung_mask=None, postprocessing: bool = True, skip_outside_lung: bool = True,
            lung_rule: bool = True,
            series_id: str | None = None, config=None, batch_size: int = 0) -> Result:
  """Segments and quantifies one scan, as `python -m scoat_jax.predict` does.

  Args:
    scan: a path, SimpleITK image or NumPy array (see the module docstring).
    model: a bundle, workdir, step folder or PyTorch weights (with `config`),
      a sequence of them (an ensemble), or a `Predictor` from `load`.
    spacing, origin: (x, y, z) mm of a NumPy volume (origin default 0).
    tta: flip test-time augmentation (when `model` is not a Predictor).
    lung_mask: an external lung mask: a path, or an array/SimpleITK image on
      the scan's grid (any value > 0 is lung).
    postprocessing: apply the bundle's post-processing rule.
    skip_outside_lung: no network pass beyond the lungs' extent along z.
    lung_rule: keep only opacity within 5 mm of the lung (`inference.lung_rule`);
      a scan without lung then gets LOV and POI None.
    series_id: the DICOM series of a folder holding several.
    config: the config PyTorch weights are read with.
    batch_size: slices per forward pass (0: automatic).

  Returns:
    Result with the mask, probabilities and report.

  Raises:
    ValueError: a bad scan, model or lung mask (one-line message).
  """
  import SimpleITK as sitk
  predictor = model if isinstance(model, Predictor) else load(
      model, tta=tta, batch_size=batch_size, config=config)
  name, source, data = _read(scan, spacing, origin, series_id)
  rule = predictor.models[0].postprocessing if postprocessing else None
  if data.geometry is None:
    labels, prob = next(predictor.predict_slices([data.array], source="uint8"))
    result = scan_lib.finish_slice(predictor, labels, prob, rule=rule)
    report = scan_lib.report(predictor, name, source, data, result, _label(predictor))
    return Result(sitk.GetImageFromArray(result.labels), sitk.GetImageFromArray(prob), report,
                  result.labels)
  lung = _lung(lung_mask, data)
  result = scan_lib.run_volume(predictor, data, lung=lung, rule=rule,
                               skip_outside_lung=skip_outside_lung, with_probability=True,
                               lung_rule=lung_rule)
  report = scan_lib.report(predictor, name, source, data, result, _label(predictor))
  turn = data.reorientation
  labels, prob = turn.to_stored(result.labels), turn.to_stored(result.probability)
  mask_image = turn.stored.apply_to(sitk.GetImageFromArray(labels))
  prob_image = turn.stored.apply_to(sitk.GetImageFromArray(prob))
  return Result(mask_image, prob_image, report, labels)


def _label(predictor) -> str:
  return scan_lib.model_label(predictor.models)


def _lung(lung_mask, data: Loaded):
  import SimpleITK as sitk
  if lung_mask is None:
    return None
  if isinstance(lung_mask, (str, pathlib.Path)):
    return scan_lib.read_lung_mask(lung_mask, data)
  if isinstance(lung_mask, sitk.Image):
    stored = ct_io.Geometry.from_image(lung_mask)
    if not stored.same_as(data.reorientation.stored):
      raise scan_lib.ScanError("lung_mask: its grid differs from the scan's; resample it onto "
                               "the scan.")
    lung_mask = sitk.GetArrayFromImage(lung_mask)
  lung_mask = np.asarray(lung_mask)
  if lung_mask.shape != data.reorientation.stored.shape:
    raise scan_lib.ScanError(f"lung_mask has shape {lung_mask.shape}; the scan is "
                             f"{data.reorientation.stored.shape} (z, y, x).")
  return data.reorientation.to_canonical(lung_mask > 0)
