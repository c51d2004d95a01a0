"""`unlabelled_slices` and `unlabelled_volumes`: CT without expert masks, for semi-supervised training.

- `unlabelled_slices`: manual_dir holds `Imgs/` (8-bit grey slices, .jpg or
  .png, as COVID-SemiSeg's unlabelled split). A file `<scan>_<k>.jpg` is slice
  k of scan `<scan>`: the scan is the case (folds and splits keep its slices
  together) and slices are stored in k order; a name without a `_<k>` suffix
  is a scan of its own. Intensity source 'uint8'.
- `unlabelled_volumes`: manual_dir holds `imagesTr/` or `imagesTs/` (or the
  volumes themselves) as .nii.gz/.nii/.mha/.mhd/.nrrd, checked by `ct_io`
  like every scan; one example per axial slice, in HU, with the lung mask of
  `data.lung_mask`. The file is the case. Intensity source 'hu'.

Both store `mask` as zeros (there are no labels: the slice flags then say
"no opacity") and, per scan in the index, the slices' `names` and `shapes`.
The name is the key of a slice's soft label: `<soft_labels>/<name>.png`
(`scoat_jax.data.soft_labels`), which is the image's own stem for slices
(so Semi-Inf-Net's `InfNet-pseudo/` maps fit as they are) and `<case>_<z>`
for volumes. Soft labels are not part of the dataset: one build serves every
teacher and every round of self-training.
"""
from __future__ import annotations

import os
import re

import numpy as np
import tensorflow_datasets as tfds

from scoat_jax.data import readers
from scoat_jax.datasets import base

_IMAGE_EXTS = (".jpg", ".jpeg", ".png")
_VOLUME_EXTS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
_SCAN_SLICE = re.compile(r"^(?P<scan>.+)_(?P<k>\d{1,9})$")


def scan_and_slice(stem: str) -> tuple[str, int]:
  """'<scan>_<k>' -> (scan, k); any other stem is a scan of its own, slice 0."""
  m = _SCAN_SLICE.match(stem)
  return (m["scan"], int(m["k"])) if m else (stem, 0)


def list_slices(manual_dir: str) -> dict[str, list[tuple[int, str, str]]]:
  """scan -> [(k, stem, path)] sorted by k, of `manual_dir/Imgs`; DatasetError if none."""
  folder = os.path.join(manual_dir, "Imgs")
  if not os.path.isdir(folder):
    raise base.DatasetError(f"{folder} is missing; --manual_dir must hold Imgs/<scan>_<k>.jpg "
                            "(COVID-SemiSeg's unlabelled layout)")
  scans: dict[str, list[tuple[int, str, str]]] = {}
  seen: dict[str, str] = {}
  for fname in sorted(os.listdir(folder)):
    stem, ext = os.path.splitext(fname)
    if fname.startswith(".") or ext.lower() not in _IMAGE_EXTS:
      continue
    if stem in seen:
      raise base.DatasetError(f"{folder}: two files for slice {stem!r} ({seen[stem]}, {fname}); "
                              "keep one")
    seen[stem] = fname
    scan, k = scan_and_slice(stem)
    scans.setdefault(scan, []).append((k, stem, os.path.join(folder, fname)))
  if not scans:
    raise base.DatasetError(f"{folder} holds no .jpg/.png image; put the slices there or fix "
                            "--manual_dir")
  for scan, entries in scans.items():
    entries.sort()
    ks = [k for k, _, _ in entries]
    if len(set(ks)) != len(ks):
      dup = sorted({k for k in ks if ks.count(k) > 1})[0]
      names = [s for k, s, _ in entries if k == dup]
      raise base.DatasetError(f"{folder}: {names} are all slice {dup} of scan {scan!r}; "
                              "rename or remove all but one")
  return dict(sorted(scans.items()))


def list_volumes(manual_dir: str) -> list[tuple[str, str]]:
  """(case, path) of the volumes in imagesTr/, imagesTs/ or manual_dir itself, sorted."""
  folders = [os.path.join(manual_dir, d) for d in ("imagesTr", "imagesTs")
             if os.path.isdir(os.path.join(manual_dir, d))] or [manual_dir]
  cases: dict[str, str] = {}
  for folder in folders:
    for fname in sorted(os.listdir(folder)):
      ext = next((e for e in _VOLUME_EXTS if fname.lower().endswith(e)), None)
      if ext is None or fname.startswith("."):
        continue
      case = fname[: -len(ext)]
      case = case[: -len("_0000")] if case.endswith("_0000") else case
      if readers.MASK_NAME.search(case):  # <case>_label, _lung, ...: masks beside the scans
        continue
      if case in cases:
        raise base.DatasetError(f"{manual_dir}: two volumes for case {case!r} "
                                f"({cases[case]}, {os.path.join(folder, fname)}); keep one")
      cases[case] = os.path.join(folder, fname)
  if not cases:
    raise base.DatasetError(f"{manual_dir} holds no volume ({', '.join(_VOLUME_EXTS)}) in "
                            "imagesTr/, imagesTs/ or itself; put the CT volumes there or fix "
                            "--manual_dir")
  return sorted(cases.items())


class UnlabelledSlices(base.SliceBuilder):
  """8-bit CT slices without masks (a folder Imgs/<scan>_<k>.jpg)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "A folder with Imgs/<scan>_<k>.jpg (8-bit slices, no masks)."
  INTENSITY = "uint8"
  HAS_LUNG = False
  BUILD_HINT = "--manual_dir=<folder with Imgs/>"

  @classmethod
  def check_manual_dir(cls, manual_dir):
    list_slices(manual_dir)

  def _features(self):
    return base.slice_features(np.uint8, lung=False)

  def _extra_metadata(self):
    return {"labelled": False}

  def _scans(self, dl_manager):
    for scan, entries in list_slices(self._manual_dir(dl_manager)).items():
      examples, names, shapes = [], [], []
      for k, stem, path in entries:
        try:
          image = readers.read_slice_image(path)
        except readers.InputError as e:
          raise base.DatasetError(str(e)) from None
        examples.append({"image": image, "mask": np.zeros(image.shape, np.uint8),
                         "case_id": scan, "scan_id": scan, "slice_index": k,
                         "spacing": np.zeros(3, np.float32)})
        names.append(stem)
        shapes.append(list(image.shape))
      yield scan, scan, examples, {"names": names, "shapes": shapes}


class UnlabelledVolumes(base.SliceBuilder):
  """Axial slices (HU) of CT volumes without labels (imagesTr/ or imagesTs/)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "A folder of CT volumes (or one with imagesTr/ or imagesTs/)."
  INTENSITY = "hu"
  HAS_LUNG = True
  BUILD_HINT = "--manual_dir=<folder of CT volumes, or with imagesTr/ or imagesTs/>"

  @classmethod
  def check_manual_dir(cls, manual_dir):
    list_volumes(manual_dir)

  def _features(self):
    return base.slice_features(np.int16, lung=True)

  def _extra_metadata(self):
    return {"labelled": False}

  def _scans(self, dl_manager):
    from scoat_jax.data import ct_io
    from scoat_jax.data.lung_mask import lung_mask
    for case, path in list_volumes(self._manual_dir(dl_manager)):
      vol = ct_io.read_ct(path)
      hu = vol.hu if vol.hu.dtype == np.int16 else np.clip(
          np.rint(vol.hu), -32768, 32767).astype(np.int16)
      lung = lung_mask(vol.hu, vol.geometry.spacing).astype(np.uint8)
      spacing = np.asarray(vol.geometry.spacing, np.float32)
      examples = [{"image": np.ascontiguousarray(hu[z]), "mask": np.zeros(hu.shape[1:], np.uint8),
                   "lung": np.ascontiguousarray(lung[z]), "case_id": case, "scan_id": case,
                   "slice_index": z, "spacing": spacing} for z in range(hu.shape[0])]
      yield case, case, examples, {"names": [f"{case}_{z}" for z in range(hu.shape[0])],
                                   "shapes": [list(hu.shape[1:])] * hu.shape[0]}
