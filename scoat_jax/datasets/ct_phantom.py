"""`ct_phantom`: synthetic chest CT slices, generated on the spot (no download).

Scans come from `scoat_jax.data.phantom.generate_cohort`: each patient is scanned
at several time points with evolving GGO/consolidation lesions. One example per
axial slice, one scan at a time. Everything lives in one 'train' split; folds
are computed by patient (`case_id` = patient id), so all time points of one
patient stay in the same fold. `scan_id` = '<patient>_t<timepoint>' names one
volume.

Features: `image` (H, W) int16 HU, `mask` (H, W) uint8 {0, 1 GGO, 2
consolidation}, `lung` (H, W) uint8, `case_id`, `scan_id`, `slice_index` (z),
`spacing` (x, y, z) mm. The scan index also records per scan its `timepoint`,
`study_date`, `lesion_volume_ml` and `lung_volume_ml` as the generator reports
them (voxel count x voxel volume). Intensity source: 'hu'.

Configs: `default` (the embedded demo cohort), `small` (tests), or any
`p<patients>_t<timepoints>_s<seed>[_<Z>x<Y>x<X>]`, e.g. `p4_t2_s0_16x64x64`; every size must be >= 8
(build.py --patients/--timepoints/--seed/--shape make these names).
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import tensorflow_datasets as tfds

from scoat_jax.data import phantom
from scoat_jax.datasets import base

_NAME = re.compile(r"p(\d+)_t(\d+)_s(\d+)(?:_(\d+)x(\d+)x(\d+))?")


@dataclasses.dataclass(eq=False)
class CtPhantomConfig(tfds.core.BuilderConfig):
  patients: int = phantom.DEFAULT_NUM_PATIENTS
  timepoints: int = phantom.DEFAULT_NUM_TIMEPOINTS
  seed: int = 0
  shape: tuple[int, int, int] | None = None   # (z, y, x); None: the generator's default


def cohort_name(patients: int, timepoints: int, seed: int, shape=None) -> str:
  """The config name of a custom cohort."""
  name = f"p{patients}_t{timepoints}_s{seed}"
  return name + ("_{}x{}x{}".format(*shape) if shape else "")


def parse_shape(text: str) -> tuple[int, int, int]:
  """'16x64x64' -> (16, 64, 64) (z, y, x)."""
  m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", str(text).strip())
  if not m or min(int(g) for g in m.groups()) < 1:
    raise base.DatasetError(f"--shape={text} is not ZxYxX with positive sizes; e.g. --shape=16x64x64")
  return tuple(int(g) for g in m.groups())


_PRESETS = {
    # The generator's own default cohort (8 patients x 3 scans of 48x256x256).
    "default": CtPhantomConfig(name="default", patients=phantom.DEFAULT_NUM_PATIENTS,
                               timepoints=phantom.DEFAULT_NUM_TIMEPOINTS, seed=0,
                               description="embedded demo cohort (the phantom defaults)"),
    "small": CtPhantomConfig(name="small", patients=3, timepoints=2, seed=0, shape=(8, 48, 48),
                             description="tiny cohort for tests: 3 patients x 2 scans of 8x48x48"),
}


class CtPhantom(base.SliceBuilder):
  """Synthetic chest CT phantom cohort (HU) with GGO/consolidation labels and lung masks."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = list(_PRESETS.values())
  DEFAULT_BUILDER_CONFIG_NAME = "default"
  INTENSITY = "hu"
  HAS_LUNG = True
  BUILDS_ITSELF = True
  OPTIONS = ("patients", "timepoints", "seed", "shape")

  @classmethod
  def get_builder_config(cls, name, version=None):
    found = super().get_builder_config(name, version)
    if found is not None:
      return found
    m = _NAME.fullmatch(name)
    if not m:
      return None
    p, t, s = (int(g) for g in m.groups()[:3])
    shape = tuple(int(g) for g in m.groups()[3:]) if m.group(4) else None
    return CtPhantomConfig(name=name, patients=p, timepoints=t, seed=s, shape=shape,
                           description=f"{p} patients x {t} scans, seed {s}")

  @classmethod
  def config_for(cls, config, options):
    extra = sorted(set(options) - set(cls.OPTIONS))
    if extra:
      raise base.DatasetError(f"ct_phantom takes no option {extra}; options: --patients, "
                              "--timepoints, --seed, --shape")
    current = cls.get_builder_config(config or "default")
    if current is None:
      raise base.DatasetError(f"unknown config {config!r} of ct_phantom; use default, small or "
                              "p<patients>_t<timepoints>_s<seed>[_ZxYxX]")
    if not options:
      return current.name
    p = int(options.get("patients", current.patients))
    t = int(options.get("timepoints", current.timepoints))
    s = int(options.get("seed", current.seed))
    shape = parse_shape(options["shape"]) if "shape" in options else current.shape
    if p < 1 or t < 1 or s < 0:
      raise base.DatasetError(f"--patients={p} --timepoints={t} --seed={s}: patients and timepoints "
                              "must be >= 1 and the seed >= 0")
    name = cohort_name(p, t, s, shape)
    # A preset with exactly these settings keeps its short name.
    for preset in _PRESETS.values():
      if (preset.patients, preset.timepoints, preset.seed, preset.shape) == (p, t, s, shape):
        return preset.name
    return name

  def _features(self):
    return base.slice_features(np.int16, lung=True)

  def _extra_metadata(self):
    c = self.builder_config
    return {"patients": c.patients, "timepoints": c.timepoints, "seed": c.seed,
            "shape": list(c.shape) if c.shape else None}

  def _scans(self, dl_manager):
    c = self.builder_config
    kw = {"shape": tuple(c.shape)} if c.shape else {}
    for scan in phantom.generate_cohort(c.seed, c.patients, c.timepoints, **kw):
      scan_id = f"{scan.patient_id}_t{scan.timepoint}"
      extra = {"timepoint": int(scan.timepoint), "study_date": str(scan.study_date),
               "lesion_volume_ml": float(scan.lesion_volume_ml),
               "lung_volume_ml": float(scan.lung_volume_ml)}
      yield scan.patient_id, scan_id, self._slices(scan, scan_id), extra

  @staticmethod
  def _slices(scan, scan_id):
    spacing = np.asarray(scan.geometry.spacing, np.float32)
    hu = np.asarray(scan.hu)
    if hu.dtype != np.int16:
      hu = np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
    label = np.asarray(scan.label, np.uint8)
    lung = np.asarray(scan.lung, np.uint8)
    for z in range(hu.shape[0]):
      yield {"image": np.ascontiguousarray(hu[z]), "mask": np.ascontiguousarray(label[z]),
             "lung": np.ascontiguousarray(lung[z]), "case_id": scan.patient_id,
             "scan_id": scan_id, "slice_index": z, "spacing": spacing}
