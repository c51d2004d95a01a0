"""One scan through the whole inference pipeline: lung, network, post-processing, numbers.

`predict` (`inference.segment`) and the Python API (`inference.api`) both run
each scan through these steps, so they report the same numbers:

1. the lung mask: the one given (`--lung_mask`, checked against the scan's
   grid) or the classical one (`data.lung_mask`);
2. the network on the axial slices within the lungs' extent along z, widened
   above and below by the lung rule's margin, or by `MARGIN_MM` without the
   rule (`skip_outside_lung`, on by default): slices of the neck and abdomen
   get an empty mask without a forward pass. Without lung in the scan every
   slice is segmented when the rule is off, and none when it is on;
3. the lung rule (`inference.lung_rule`, on by default): labels farther than
   its margin from the lung mask are dropped; without lung the scan is not
   quantified (LOV and POI None, with a warning);
4. post-processing (`inference.postprocessing`): the rule of the model's
   bundle, if any and not turned off;
5. quantification (`inference.quantify`) with the same lung mask.

The probability map stays the network's own output, before steps 3 and 4.

2-D slices (8-bit exports) have no HU, hence no lung mask: every slice goes
through the network and only the pixel rule of post-processing applies.
"""
from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import time

import numpy as np

from scoat_jax.data import ct_io
from scoat_jax.data import lung_mask as lung_mask_lib
from scoat_jax.data.readers import Loaded
from scoat_jax.inference import lung_rule as lung_rule_lib
from scoat_jax.inference import postprocessing, quantify

# Slices this far (mm) beyond the lung mask's first and last slice still go
# through the network: lesions at the apices and bases that the classical lung
# mask misses (dense consolidation filling the lung's edge) stay segmented.
MARGIN_MM = 30.0


class ScanError(ValueError):
  """A bad per-scan request (a lung mask that does not fit its scan)."""


@dataclasses.dataclass
class ScanResult:
  """The outcome of one scan (volumes on the canonical grid, as `Loaded.array`)."""
  labels: np.ndarray
  probability: np.ndarray | None
  lung: np.ndarray | None
  stats: dict


def read_lung_mask(path: str | pathlib.Path, data: Loaded) -> np.ndarray:
  """An external lung mask for a scan, on the scan's canonical grid (any label > 0 is lung).

  Raises:
    ScanError: unreadable file or a grid other than the scan's.
  """
  try:
    like = ct_io.CTVolume(data.array, data.geometry, reorientation=data.reorientation)
    mask = ct_io.read_mask(path, like, allowed=range(256))
  except ValueError as e:
    raise ScanError(f"--lung_mask={path}: {str(e).splitlines()[0]}") from None
  return mask > 0


def network_range(lung: np.ndarray | None, spacing_xyz, depth: int,
                  margin_mm: float = MARGIN_MM) -> tuple[int, int]:
  """The slices z0 <= z < z1 that go through the network: the lung's extent +- margin_mm,
  or every slice when there is no lung mask or it is empty."""
  if lung is None or not lung.any():
    return 0, depth
  return lung_mask_lib.lung_extent(lung, spacing_xyz, margin_mm)


def run_volume(predictor, data: Loaded, *, lung: np.ndarray | None = None,
               rule: dict | None = None, skip_outside_lung: bool = True,
               with_probability: bool = False, progress=None,
               lung_rule: bool = True) -> ScanResult:
  """Segments and quantifies one CT volume (see the module docstring).

  Args:
    predictor: an `inference.Predictor`.
    data: the scan as `readers.read_item` gives it (canonical grid).
    lung: an external lung mask on that grid; None: the classical one.
    rule: a post-processing rule (None: none).
    skip_outside_lung: segment only the slices within the lungs' extent.
    with_probability: also return P(opacity).
    progress: called with the number of slices done.
    lung_rule: apply the lung rule (`inference.lung_rule`): keep only
      opacity within its margin of the lung mask; a scan without lung is then
      not quantified.
  """
  hu, geometry = data.array, data.geometry
  source = "external" if lung is not None else "classical"
  t0 = time.time()
  if lung is None:
    lung = lung_mask_lib.lung_mask(hu, geometry.spacing)
  no_lung = lung_rule and not lung.any()
  if no_lung:  # nothing can stay: no network pass
    z0 = z1 = 0
  elif skip_outside_lung:
    # With the rule, slices beyond its margin cannot keep a label.
    z0, z1 = network_range(lung, geometry.spacing, hu.shape[0],
                           lung_rule_lib.MARGIN_MM if lung_rule else MARGIN_MM)
  else:
    z0, z1 = 0, hu.shape[0]
  t1 = time.time()
  labels, prob = predictor.predict_volume(hu, with_probability=with_probability,
                                          progress=progress, z_range=(z0, z1))
  t2 = time.time()
  if lung_rule:
    labels, lung_summary = lung_rule_lib.apply(labels, lung, geometry.spacing)
  else:
    lung_summary = {"applied": False, "lung_found": bool(lung.any()),
                    "rule": lung_rule_lib.describe(False)}
  labels, post = postprocessing.apply(labels, rule, spacing_xyz=geometry.spacing, lung=lung)
  stats = quantify.quantify_volume(
      labels, geometry, lung=lung, num_classes=predictor.num_classes,
      lung_margin_mm=lung_summary["margin_mm"] if lung_summary["applied"] else None)
  if no_lung:
    stats.update(lov_ml=None, poi_percent=None)
    stats["warnings"] = [lung_rule_lib.NO_LUNG_WARNING]
  stats["lung_rule"] = lung_summary
  stats["seconds"] = {"lung_mask": round(t1 - t0, 3), "network": round(t2 - t1, 3),
                      "quantify": round(time.time() - t2, 3)}
  stats["lung_mask"] = source
  stats["network_slices"] = [int(z0), int(z1)]
  stats["postprocessing"] = post
  return ScanResult(labels, prob, lung, stats)


def finish_slice(predictor, labels: np.ndarray, prob: np.ndarray | None, *,
                 rule: dict | None = None) -> ScanResult:
  """Post-processes and quantifies the prediction of one 2-D slice."""
  labels, post = postprocessing.apply(labels, rule, spacing_xyz=None)
  stats = quantify.quantify_slice(labels, num_classes=predictor.num_classes)
  stats["postprocessing"] = post
  return ScanResult(labels, prob, None, stats)


def model_label(models) -> str:
  """'scoat_net, model (2026-12-05T14:28:38+00:00 (scoat_jax 0.1.0), 5 members), sha256
  5c505453fa3a': the report's and key image's model, without a local path (`model_identity`)."""
  ident = model_identity(models)
  detail = ", ".join(x for x in (ident["version"], f"{ident['members']} members"
                                 if ident["members"] > 1 else "") if x)
  return (f"{models[0].config.model_name}, {ident['name']}" + (f" ({detail})" if detail else "")
          + f", sha256 {ident['sha256'][:12]}")


def _source_name(m) -> str:
  """A model's name without the local path: its bundle's folder name, else its run's."""
  if m.meta.get("bundle"):
    return pathlib.Path(m.meta["bundle"]).name
  where = pathlib.Path(m.step_dir)
  if where.parent.name == "checkpoints":   # <workdir>/checkpoints/<step>
    return where.parent.parent.name
  return where.stem if where.suffix else where.name


def model_identity(models) -> dict:
  """What `predictions.csv` names a model by: {'name', 'version', 'sha256'}.

  name: the bundle's folder name (a run's folder for a checkpoint, the file's stem for
  PyTorch weights); version: the bundle's creation date and scoat_jax version, or the
  step; sha256: the weights' content hash (`model_checks.weights_sha256`), for an
  ensemble the hash of its members' hashes in order. Two rows with one sha256 come from
  the very same weights wherever the files lay.
  """
  def unique(values):
    return list(dict.fromkeys(values))
  names = unique(_source_name(m) for m in models)
  versions = unique(m.meta.get("bundle_version") or (f"step {m.step}" if m.step is not None
                                                       else "") for m in models)
  hashes = [m.weights_sha256 for m in models]
  digest = hashes[0] if len(hashes) == 1 else hashlib.sha256(
      "\n".join(hashes).encode()).hexdigest()
  return {"name": " + ".join(names), "version": " + ".join(v for v in versions if v),
          "sha256": digest, "members": len(models)}


def _geometry_json(g: ct_io.Geometry) -> dict:
  return {"size_xyz": list(g.size), "spacing_mm_xyz": list(g.spacing),
          "origin_mm_xyz": list(g.origin), "direction": list(g.direction)}


def _lesion_indices_to_stored(found: list[dict], turn) -> list[dict]:
  """Lesion centres and boxes are found on the canonical grid; reports index the stored one."""
  if turn is None or turn.is_identity:
    return found
  out = []
  for lesion in found:
    lesion = dict(lesion)
    lesion["centre_index"] = list(turn.canonical_index_to_stored(lesion["centre_index"]))
    lesion["bbox_start"], lesion["bbox_stop"] = turn.box_to_stored(lesion["bbox_start"],
                                                                   lesion["bbox_stop"])
    out.append(lesion)
  return out


def report(predictor, name: str, source: str, data: Loaded, result: ScanResult,
           model: str) -> dict:
  """The JSON report of one scan, as `predict` writes it (without its 'outputs' and 'seconds').

  Lesion indices and the geometry are given on the input's own (stored) grid.
  """
  stats = dict(result.stats)
  volume = data.geometry is not None
  if volume:
    stats["lesions"] = _lesion_indices_to_stored(stats["lesions"], data.reorientation)
  out = {"name": name, "input": source, "kind": "volume" if volume else "slice", **stats,
         "model": model, "model_id": model_identity(predictor.models)}
  if volume:
    turn = data.reorientation
    out["geometry"] = _geometry_json(turn.stored if turn is not None else data.geometry)
    if turn is not None:
      out["orientation"] = turn.describe()
  else:
    out["size_hw"] = list(data.array.shape)
  if data.metadata:
    out["dicom"] = dict(data.metadata)
  out.update(num_classes=predictor.num_classes, tta=predictor.tta,
             checkpoints=[m.describe() for m in predictor.models])
  return out
