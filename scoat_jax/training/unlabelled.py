"""Unlabelled slices with soft labels in the training batches (semi-supervised training).

Config fields read from `config.unlabelled` (an ml_collections.ConfigDict):
  name          an unlabelled dataset ('unlabelled_slices', 'unlabelled_volumes');
                '' turns semi-supervised training off.
  data_dir      where it is built ('' -> data.data_dir).
  soft_labels   folder of `<name>.png` confidence maps (`data.soft_labels`):
                Semi-Inf-Net's InfNet-pseudo/ or `python -m scoat_jax.pseudo_label`'s
                output from a teacher.
  ratio         share of every global batch taken from the unlabelled slices:
                round(ratio * batch_size) slots, spread evenly; 1 trains on the
                soft labels alone (Semi-Inf-Net's pre-training, before a
                fine-tuning run with `init_from`).
  weight        weight of their loss against the labelled one.
  min_confidence  pixels whose teacher confidence |2p - 1| is below it carry no
                loss (0: every pixel counts).
  hard          targets p > 0.5 instead of the probabilities.
  slices        'all' | 'lung': which unlabelled slices (lung: those showing lung,
                for datasets with lung masks).
  match_intensity  8-bit slices: map every unlabelled scan's grey levels onto the
                histogram of this run's labelled training slices
                (`scoat_jax.datasets.intensity_match`); label them with
                `pseudo_label --match_intensity` so the teacher saw the same.

Slots. Slot j of a global batch of G is unlabelled when floor((j + 1) u / G) >
floor(j u / G), u = round(ratio G): the same slots at every step. Labelled
slots read the labelled records as before (L = G - u of them per step);
unlabelled slot number i at step s reads unlabelled position s u + i, through
a permutation per epoch of its own seed stream. Every slot's augmentation is
drawn from (seed, step, j) as before, and the soft label is warped with its
image. So the batch is still a pure function of (seed, step), and a run with
ratio 0 is exactly the supervised one.

The unlabelled dataset is a separate set of scans: no slice of it is a
labelled case, so a fold's validation cases never train, not even as
pseudo-labels, as long as the teacher that wrote the soft labels was trained
on that fold's training cases only (`pseudo_label` records the teacher's fold
in soft_labels.json; training refuses a teacher of another fold).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from scoat_jax.data import preprocess, soft_labels
from scoat_jax.datasets import base as ds_base
from scoat_jax.datasets import intensity_match


class UnlabelledError(ValueError):
  """A bad semi-supervised setting; the message names the config field and the fix."""


def enabled(cfg) -> bool:
  return bool(cfg is not None and str(cfg.get("name", "") or ""))


def pseudo_slots(global_batch: int, ratio: float) -> np.ndarray:
  """(G,) bool: which slots of every global batch hold unlabelled slices."""
  ratio = float(ratio)
  if not 0.0 <= ratio <= 1.0:
    raise UnlabelledError(f"config.unlabelled.ratio={ratio} must be in [0, 1] (1: soft labels "
                          "only, as pre-training on them)")
  u = int(round(ratio * global_batch))
  if 0 < ratio < 1 and not 0 < u < global_batch:
    raise UnlabelledError(f"config.unlabelled.ratio={ratio} of config.batch_size={global_batch} "
                          f"gives {u} unlabelled slots; choose a ratio or batch size that leaves "
                          "both kinds at least one slot")
  j = np.arange(global_batch)
  return ((j + 1) * u // global_batch) > (j * u // global_batch)


@dataclasses.dataclass
class Source:
  """The unlabelled records of one run, their names, and the soft-label folder."""
  dataset: ds_base.SliceDataset
  records: np.ndarray       # record numbers, in dataset order
  names: list[str]          # names[i]: soft-label key of records[i]
  folder: str
  weight: float
  min_confidence: float
  hard: bool
  luts: np.ndarray | None = None   # (num_records of dataset, 256) uint8 grey-level tables


def open_source(cfg, *, intensity: str, fold, data_dir: str = "",
                reference=None) -> Source:
  """Opens and checks `config.unlabelled`: dataset built, maps complete, teacher's fold.

  Args:
    cfg: config.unlabelled.
    intensity: the labelled dataset's intensity source; both must agree.
    fold: the labelled run's fold (an int, -1 for all): a teacher of another
      fold would leak that fold's validation cases into training.
    data_dir: the labelled dataset's data_dir, used when cfg.data_dir is ''.
    reference: with cfg.match_intensity, a callable returning the (256,)
      histogram of the run's labelled training slices.

  Raises:
    UnlabelledError, DatasetError, SoftLabelError: with the field and the fix.
  """
  name = str(cfg.name)
  ds = ds_base.open_source(name, str(cfg.get("data_dir", "") or "") or data_dir)
  if ds.metadata.get("labelled", True):
    raise UnlabelledError(f"config.unlabelled.name={name} is a labelled dataset; give one built "
                          "as unlabelled_slices or unlabelled_volumes")
  if ds.intensity != intensity:
    raise UnlabelledError(f"config.unlabelled.name={name} holds {ds.intensity} slices but the "
                          f"labelled dataset holds {intensity}; use unlabelled data of the same "
                          "kind (8-bit slices with 8-bit, HU volumes with HU)")
  slices = str(cfg.get("slices", "all") or "all")
  if slices not in ("all", "lung"):
    raise UnlabelledError(f"config.unlabelled.slices={slices!r}: choose 'all' or 'lung'")
  if slices == "lung" and not ds.has_lung:
    raise UnlabelledError(f"config.unlabelled.slices='lung' but {name} has no lung masks; "
                          "use 'all'")
  records, names, shapes = [], [], {}
  for scan in ds.scans:
    for k in range(scan.count):
      if ds_base.keep_slice(slices, int(scan.flags[k])):
        records.append(scan.start + k)
        names.append(scan.extra["names"][k])
        shapes[scan.extra["names"][k]] = scan.extra["shapes"][k]
  if not records:
    raise UnlabelledError(f"config.unlabelled.name={name}: no slice passes slices={slices!r}")
  folder = str(cfg.get("soft_labels", "") or "")
  if not folder:
    raise UnlabelledError("config.unlabelled.soft_labels is empty; give the folder of confidence "
                          "maps (InfNet-pseudo/ or python -m scoat_jax.pseudo_label's output)")
  soft_labels.check_folder(folder, shapes, "config.unlabelled.soft_labels")
  manifest = soft_labels.read_manifest(folder) or {}
  teacher_folds = set(manifest.get("teacher_folds", []))
  if int(fold) != -1 and teacher_folds and teacher_folds != {int(fold)}:
    raise UnlabelledError(
        f"config.unlabelled.soft_labels={folder} was written by a teacher of fold(s) "
        f"{sorted(teacher_folds)}, which trained on this fold's ({fold}) validation cases; label "
        f"the slices with a teacher trained on fold {fold}")
  weight, min_conf = float(cfg.get("weight", 1.0)), float(cfg.get("min_confidence", 0.0))
  if weight < 0:
    raise UnlabelledError(f"config.unlabelled.weight={weight} must be >= 0")
  if not 0.0 <= min_conf < 1.0:
    raise UnlabelledError(f"config.unlabelled.min_confidence={min_conf} must be in [0, 1)")
  match = bool(cfg.get("match_intensity", False))
  if "match_intensity" in manifest and bool(manifest["match_intensity"]) != match:
    raise UnlabelledError(
        f"config.unlabelled.soft_labels={folder} was labelled from "
        f"{'matched' if manifest['match_intensity'] else 'unmatched'} grey levels but "
        f"config.unlabelled.match_intensity={match}; set it to {not match} so the student sees "
        "the slices its teacher labelled")
  luts = None
  if match:
    if ds.intensity != "uint8":
      raise UnlabelledError(f"config.unlabelled.match_intensity=True but {name} holds "
                            f"{ds.intensity} slices, which are on one scale already; set it False")
    if reference is None:
      raise UnlabelledError("config.unlabelled.match_intensity=True needs the labelled training "
                            "slices' histogram; this caller gives none")
    luts = intensity_match.record_luts(ds, reference())
  return Source(dataset=ds, records=np.asarray(records, np.int64), names=names, folder=folder,
                weight=weight, min_confidence=min_conf, hard=bool(cfg.get("hard", False)),
                luts=luts)


def read(reader, source: Source, index: int, rng) -> tuple[np.ndarray, np.ndarray]:
  """(image (S, S), soft label (S, S)) of unlabelled position `index`, augmented by `rng`."""
  record = int(source.records[index])
  ex = source.dataset.source[record]
  soft = soft_labels.read(source.folder, source.names[index])
  image = ex["image"] if source.luts is None else source.luts[record][ex["image"]]
  image, _, warped = preprocess.prepare_slice(
      image, ex["mask"], source=source.dataset.intensity, window=reader.window,
      size=reader.size, num_classes=reader.num_classes, rng=rng if reader.augment else None,
      aug=reader.aug, uint8_mode=reader.uint8_mode, soft=soft)
  return image, warped
