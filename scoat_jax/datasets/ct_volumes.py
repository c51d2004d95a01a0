"""`ct_volumes`: axial slices of CT volumes in Hounsfield units (MSD / nnU-Net layout).

manual_dir holds `imagesTr/<case>.nii.gz` (or `<case>_0000.nii.gz`; also
.nii, .mha, .mhd, .nrrd) and `labelsTr/<case>.<same>`; every image needs its
label volume on the same grid. One example per kept axial slice, generated one
volume at a time (never the whole dataset in memory).

Features: `image` (H, W) int16 HU, `mask` (H, W) uint8 in {0 background, 1 GGO
or any opacity, 2 consolidation}, `lung` (H, W) uint8 {0, 1}, `case_id` =
`scan_id` = the case name (each file is a case: the MSD layout has no patient
ids, so give one patient's scans names that a split by file is honest about),
`slice_index` (z), `spacing` (x, y, z) mm. Intensity source: 'hu'.

Builder configs, named `<label_map>` or `<label_map>_<slices>`:
- label maps (source label -> {0, 1, 2}; the lung mask comes from the labels
  where they contain it, else from `data.lung_mask`):
  - `default`: labels already 0/1/2; any other value is an error listing it.
  - `ma2020`: COVID-19-CT-Seg (Ma et al., 2020): 1 left lung, 2 right lung,
    3 infection -> infection 1, lungs 0; lung mask = label > 0.
  - `medseg`: MedSeg volumes: 1 GGO, 2 consolidation, 3 pleural effusion
    -> 1, 2, and effusion 0 (effusion is not lung opacification).
- slices: `all` (default), `opacity` (slices with label > 0 after mapping),
  `lung` (slices showing lung).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from scoat_jax.datasets import base

# label map name -> (source value -> target value, source values that are lung
# or None to compute the lung mask from the image).
LABEL_MAPS: dict[str, tuple[dict[int, int], tuple[int, ...] | None]] = {
    "default": ({0: 0, 1: 1, 2: 2}, None),
    "ma2020": ({0: 0, 1: 0, 2: 0, 3: 1}, (1, 2, 3)),
    "medseg": ({0: 0, 1: 1, 2: 2, 3: 0}, None),
}
_EXTS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")


@dataclasses.dataclass(eq=False)
class CtVolumesConfig(tfds.core.BuilderConfig):
  label_map: str = "default"
  slices: str = "all"


def config_name(label_map: str, slices: str) -> str:
  return label_map if slices == "all" else f"{label_map}_{slices}"


def _split_ext(fname: str) -> tuple[str, str] | None:
  for ext in _EXTS:
    if fname.lower().endswith(ext):
      return fname[: -len(ext)], ext
  return None


def find_cases(manual_dir: str) -> list[tuple[str, str, str]]:
  """(case, image path, label path) of every case in `manual_dir` (imagesTr/, labelsTr/),
  sorted by case name; DatasetError for a missing or empty folder or an unpaired file."""
  img_dir, lab_dir = os.path.join(manual_dir, "imagesTr"), os.path.join(manual_dir, "labelsTr")
  for d in (img_dir, lab_dir):
    if not os.path.isdir(d):
      raise base.DatasetError(f"{d} is missing; --manual_dir must hold imagesTr/<case>.nii.gz and "
                              "labelsTr/<case>.nii.gz (MSD / nnU-Net layout)")

  def scan(folder, strip_channel):
    out = {}
    for fname in sorted(os.listdir(folder)):
      parts = _split_ext(fname)
      if parts is None or fname.startswith("."):
        continue
      stem = parts[0]
      if strip_channel and stem.endswith("_0000"):
        stem = stem[: -len("_0000")]
      if stem in out:
        raise base.DatasetError(f"{folder}: two files for case {stem!r} ({os.path.basename(out[stem])}, "
                                f"{fname}); keep one")
      out[stem] = os.path.join(folder, fname)
    return out

  images, labels = scan(img_dir, True), scan(lab_dir, False)
  if not images:
    raise base.DatasetError(f"{img_dir} holds no volume ({', '.join(_EXTS)}); put the CT volumes "
                            "there or fix --manual_dir")
  for case, path in images.items():
    if case not in labels:
      raise base.DatasetError(f"{path} has no label volume {os.path.join(lab_dir, case + '.nii.gz')}; "
                              "add the label or remove the image")
  for case, path in labels.items():
    if case not in images:
      raise base.DatasetError(f"{path} has no image {os.path.join(img_dir, case + '.nii.gz')}; "
                              "add the image or remove the label")
  return [(c, images[c], labels[c]) for c in sorted(images)]


def map_labels(label: np.ndarray, label_map: str, path: str) -> tuple[np.ndarray, np.ndarray | None]:
  """Maps a source label volume to {0, 1, 2} (and the lung mask when it holds one).

  Args:
    label: source labels, any integer dtype.
    label_map: a key of LABEL_MAPS.
    path: the label file, for error messages.

  Returns:
    (mask uint8 in {0, 1, 2}, lung uint8 {0, 1} or None).
  """
  table, lung_values = LABEL_MAPS[label_map]
  values = np.unique(label)
  unknown = [int(v) for v in values if int(v) not in table]
  if unknown:
    others = [m for m in LABEL_MAPS if m != label_map]
    raise base.DatasetError(
        f"{path}: label values {unknown} are not in the '{label_map}' label map {sorted(table)}; "
        f"pick another (--label_map={'|'.join(others)}) or relabel the volume")
  lut = np.zeros(max(int(values.max()), max(table)) + 1, np.uint8)
  for src, dst in table.items():
    lut[src] = dst
  mask = lut[label]
  lung = None if lung_values is None else np.isin(label, lung_values).astype(np.uint8)
  return mask, lung


class CtVolumes(base.SliceBuilder):
  """Axial slices (HU) of CT volumes with opacity labels, MSD / nnU-Net layout."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "A folder with imagesTr/<case>.nii.gz and labelsTr/<case>.nii.gz."
  BUILDER_CONFIGS = [
      CtVolumesConfig(name=config_name(m, s), label_map=m, slices=s,
                      description=f"label map {m}, slices: {s}")
      for m in LABEL_MAPS for s in base.SLICE_FILTERS]
  DEFAULT_BUILDER_CONFIG_NAME = "default"
  INTENSITY = "hu"
  HAS_LUNG = True
  BUILD_HINT = "--manual_dir=<folder with imagesTr/ and labelsTr/>"
  OPTIONS = ("label_map", "slices")

  @classmethod
  def config_for(cls, config, options):
    extra = sorted(set(options) - set(cls.OPTIONS))
    if extra:
      raise base.DatasetError(f"ct_volumes takes no option {extra}; options: --label_map, --slices")
    current = cls.builder_configs.get(config or "default")
    if current is None:
      raise base.DatasetError(f"unknown config {config!r} of ct_volumes "
                              f"(configs: {', '.join(sorted(cls.builder_configs))}); fix NAME")
    label_map = options.get("label_map", current.label_map)
    slices = options.get("slices", current.slices)
    if label_map not in LABEL_MAPS:
      raise base.DatasetError(f"--label_map={label_map} is unknown; choose {'|'.join(LABEL_MAPS)}")
    if slices not in base.SLICE_FILTERS:
      raise base.DatasetError(f"--slices={slices} is unknown; choose {'|'.join(base.SLICE_FILTERS)}")
    return config_name(label_map, slices)

  @classmethod
  def check_manual_dir(cls, manual_dir):
    find_cases(manual_dir)

  def _features(self):
    return base.slice_features(np.int16, lung=True)

  def _extra_metadata(self):
    return {"label_map": self.builder_config.label_map, "slices": self.builder_config.slices}

  def _scans(self, dl_manager):
    cases = find_cases(self._manual_dir(dl_manager))
    for case, image_path, label_path in cases:
      yield case, case, self._slices(case, image_path, label_path), {}

  def _slices(self, case: str, image_path: str, label_path: str):
    from scoat_jax.data import ct_io
    from scoat_jax.data.lung_mask import lung_mask
    cfg = self.builder_config
    vol = ct_io.read_ct(image_path)
    # ct_io checks the grid (size, spacing, origin, direction); the label
    # values are checked against the chosen label map below, with its hint.
    label = ct_io.read_mask(label_path, like=vol, allowed=range(256))
    mask, lung = map_labels(label, cfg.label_map, label_path)
    spacing = np.asarray(vol.geometry.spacing, np.float32)
    if lung is None:
      lung = lung_mask(vol.hu, vol.geometry.spacing).astype(np.uint8)
    hu = vol.hu
    if hu.dtype != np.int16:
      hu = np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
    for z in range(hu.shape[0]):
      if not base.keep_slice(cfg.slices, base.slice_flags(mask[z], lung[z])):
        continue
      yield {"image": np.ascontiguousarray(hu[z]), "mask": np.ascontiguousarray(mask[z]),
             "lung": np.ascontiguousarray(lung[z]), "case_id": case, "scan_id": case,
             "slice_index": z, "spacing": spacing}
