"""What the three slice datasets share: errors, features, the scan index, opening.

Every builder writes one example per axial slice to ArrayRecord files (random
access, no TensorFlow needed to read) in a single 'train' split; folds are
computed by case at read time (data.folds), so one build serves every
fold. Examples are written in generation order (`disable_shuffling`): the
slices of one scan are contiguous records, in slice order.

The scan index. Training needs "which records belong to which case" before it
reads any record, and decoding every record to find out would cost minutes on a
real dataset at every start. The builders therefore record, while they
generate, one entry per scan in the dataset's own metadata (metadata.json,
written by TFDS together with the records and renamed into place with them, so
it can never disagree with the data or be half-written): case id, scan id,
first record, number of records, and one flag byte per record (bit 0: slice
shows lung, bit 1: slice shows opacity). Nothing is written beside the dataset
at training time, which keeps a shared or read-only data_dir safe for many
hosts. `open_source` checks the index against the record count.

Streaming: builders read and yield one volume (or image) at a time; TFDS's
writer keeps at most ~1 GB of serialised examples in memory before spilling to
temporary files, so no dataset is ever held whole in memory.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from scoat_jax.data import export_window, folds

INDEX_VERSION = 1
FLAG_LUNG = 1
FLAG_OPACITY = 2
SLICE_FILTERS = ("all", "opacity", "lung")


class DatasetError(ValueError):
  """A bad dataset input or request; the message names the file or flag and the fix."""


class DatasetNotBuiltError(DatasetError):
  """The requested dataset is not in data_dir; the message gives the build command."""


def slice_features(image_dtype, *, lung: bool, extra: Mapping[str, Any] | None = None):
  """The per-slice features every builder writes.

  Args:
    image_dtype: np.int16 (Hounsfield units) or np.uint8 (8-bit grey).
    lung: whether to store a `lung` (H, W) uint8 {0, 1} mask.
    extra: further features of one builder.

  Returns:
    A tfds.features.FeaturesDict.
  """
  # Two unknown dimensions need a byte encoding. Masks use zlib (mostly
  # zeros: ~50x smaller, ~0.3 ms per 512x512 slice either way). Images are
  # stored raw: noisy CT compresses only ~1.5-2x while zlib costs ~10 ms per
  # slice to write and ~3-6 ms to read, the largest cost of a build after the
  # volume itself and a real one for the input pipeline.
  def plane(dtype, encoding="zlib"):
    return tfds.features.Tensor(shape=(None, None), dtype=dtype, encoding=encoding)

  feats = {
      "image": plane(image_dtype, "bytes"),
      "mask": plane(np.uint8),
      "case_id": tfds.features.Text(),
      "scan_id": tfds.features.Text(),
      "slice_index": tfds.features.Scalar(dtype=np.int32),
      "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32),
  }
  if lung:
    feats["lung"] = plane(np.uint8)
  feats.update(extra or {})
  return tfds.features.FeaturesDict(feats)


def slice_flags(mask: np.ndarray, lung: np.ndarray | None) -> int:
  """Flag byte of one slice: FLAG_LUNG if it shows lung, FLAG_OPACITY if any label > 0."""
  flags = FLAG_OPACITY if mask.any() else 0
  if lung is not None and lung.any():
    flags |= FLAG_LUNG
  return flags


def keep_slice(slices: str, flags: int) -> bool:
  """Whether a slice with these flags passes the 'all' | 'opacity' | 'lung' filter."""
  if slices == "opacity":
    return bool(flags & FLAG_OPACITY)
  if slices == "lung":
    return bool(flags & FLAG_LUNG)
  return True


@dataclasses.dataclass(frozen=True)
class ScanEntry:
  """One scan's records in the index (records start .. start+count-1)."""
  case_id: str
  scan_id: str
  start: int
  count: int
  flags: np.ndarray            # (count,) uint8, FLAG_* bits per record
  extra: Mapping[str, Any]     # builder-specific (e.g. phantom lesion volume)


class SliceBuilder(tfds.core.GeneratorBasedBuilder):
  """Base of the slice builders: ArrayRecord files, generation order, the scan index.

  Subclasses state their facts as class attributes: INTENSITY ('hu' | 'uint8':
  how the slices are stored), HAS_LUNG (lung masks included), BUILD_HINT (the
  extra build.py flags a user must give, e.g. '--manual_dir=...'), BUILDS_ITSELF
  (generated from nothing: training builds it on first use); and implement
  `_features()` and `_scans(dl_manager)`.
  """
  INTENSITY = "hu"
  HAS_LUNG = False
  BUILD_HINT = ""
  BUILDS_ITSELF = False
  OPTIONS: tuple[str, ...] = ()       # build.py --flags this builder understands

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup imports `importlib_resources`, which TFDS only requires
    # on Python < 3.9 and so may be absent; the source file is all it needs.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, file_format: str | None = None, **kwargs):
    # The data sources only read ArrayRecord; make it the default so that
    # tfds.data_source(...) building on demand writes the right format.
    super().__init__(file_format=file_format or "array_record", **kwargs)

  @classmethod
  def config_for(cls, config: str | None, options: Mapping[str, Any]) -> str | None:
    """Name of the builder config that `build.py NAME[/config] --option=...` means.

    Args:
      config: the config named after '/', or None for the default.
      options: build.py options that were given (not None).

    Returns:
      The config name to build (None: the builder has no configs).
    """
    if options:
      raise DatasetError(f"{cls.name} takes no option {sorted(options)}; "
                         f"remove them (options: {list(cls.OPTIONS) or 'none'})")
    return config

  @classmethod
  def build_command(cls, full_name: str, data_dir: str) -> str:
    """The shell command that builds `full_name` ('name[/config]') into data_dir."""
    hint = f" {cls.BUILD_HINT}" if cls.BUILD_HINT else ""
    return f"python -m scoat_jax.datasets.build {full_name}{hint} --data_dir={data_dir}"

  @classmethod
  def check_manual_dir(cls, manual_dir: str) -> None:
    """Checks the input folder's layout (cheap: lists files) before a build starts."""
    del manual_dir

  def _features(self):
    raise NotImplementedError

  def _scans(self, dl_manager) -> Iterator[tuple[str, str, Iterable[dict], dict]]:
    """Yields (case_id, scan_id, slice examples, extra metadata) one scan at a time."""
    raise NotImplementedError

  def _extra_metadata(self) -> dict:
    return {}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=(self.__doc__ or "").strip().splitlines()[0],
        features=self._features(),
        metadata=tfds.core.MetadataDict(
            intensity=self.INTENSITY, has_lung=self.HAS_LUNG, index_version=INDEX_VERSION,
            **self._extra_metadata()),
        disable_shuffling=True,
    )

  def _manual_dir(self, dl_manager) -> str:
    manual = dl_manager._manual_dir  # pylint: disable=protected-access
    if not manual or not os.path.isdir(manual):
      raise DatasetError(f"manual_dir {manual or '(not given)'} is not a folder; "
                         f"pass {self.BUILD_HINT or '--manual_dir=DIR'} to build.py")
    return os.fspath(manual)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(dl_manager)}

  def _generate_examples(self, dl_manager):
    scans, record = [], 0
    # 8-bit exports: the HU window they were made with, for reading CT later (`export_window`).
    window = export_window.Estimator() if self.INTENSITY == "uint8" else None
    for case_id, scan_id, examples, extra in self._scans(dl_manager):
      start, flags = record, []
      for ex in examples:
        flags.append(slice_flags(ex["mask"], ex.get("lung")))
        if window is not None:
          window.add(ex["image"])
        # Increasing integer keys + disable_shuffling: record i is the i-th
        # example generated, which is what makes the index valid.
        yield record, ex
        record += 1
      if flags:
        scans.append({"case_id": case_id, "scan_id": scan_id, "start": start,
                      "count": len(flags), "flags": "".join(str(f) for f in flags), **extra})
    if not record:
      raise DatasetError(f"{self.name}/{self.builder_config.name if self.builder_config else ''}: "
                         "no slice was kept; check the input folder and the --slices filter")
    self.info.metadata["scans"] = scans
    if window is not None:
      try:
        self.info.metadata["export_window"] = window.result()
      except export_window.ExportWindowError as e:  # kept as unknown: HU input then warns
        self.info.metadata["export_window"] = {"window_hu": None, "error": str(e)}


@dataclasses.dataclass
class SliceDataset:
  """A built slice dataset: its scan index and lazy random access to its records.

  Pickles as (name, data_dir, index) and reopens its records in the new process,
  so grain worker processes can carry it.
  """
  name: str
  data_dir: str
  intensity: str
  has_lung: bool
  scans: list[ScanEntry]
  metadata: dict
  skip: tuple[str, ...] = ()   # features `source` leaves undecoded (e.g. 'lung')
  _source: Any = dataclasses.field(default=None, repr=False, compare=False)

  @property
  def num_records(self) -> int:
    return sum(s.count for s in self.scans)

  def case_ids(self) -> list[str]:
    """Sorted unique case ids (patients, or files where no patient is known)."""
    return sorted({s.case_id for s in self.scans})

  def fold_scans(self, split: str, fold, num_folds: int, fold_seed: int) -> list[ScanEntry]:
    """The scans of one side of a fold ('train' | 'val'; 'all': every scan).

    Cases are split by `data/folds.py`, so a patient's scans stay on one side.
    """
    if split == "all":
      return list(self.scans)
    train_ids, val_ids = folds.split_cases(self.case_ids(), fold, int(num_folds), int(fold_seed))
    keep = set(train_ids if split == "train" else val_ids)
    return [s for s in self.scans if s.case_id in keep]

  def fold_records(self, fold, num_folds: int, fold_seed: int, slices: str = "all") -> np.ndarray:
    """Record indices (int64, in index order) of the slices a fold trains on: those of its
    training scans that the `slices` filter keeps (`keep_slice`)."""
    records = [s.start + np.flatnonzero([keep_slice(slices, int(f)) for f in s.flags])
               for s in self.fold_scans("train", fold, num_folds, fold_seed)]
    return np.concatenate(records).astype(np.int64) if records else np.zeros(0, np.int64)

  @property
  def source(self):
    """Random access to the decoded records: source[i] -> dict of numpy arrays."""
    if self._source is None:
      decoders = {k: tfds.decode.SkipDecoding() for k in self.skip} or None
      self._source = tfds.data_source(self.name, data_dir=self.data_dir or None,
                                      split="train", download=False, decoders=decoders)
    return self._source

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None
    return state


def _parse_index(name: str, metadata: Mapping[str, Any], command: str) -> list[ScanEntry]:
  if metadata.get("index_version") != INDEX_VERSION or "scans" not in metadata:
    raise DatasetError(f"dataset {name} has no scan index of version {INDEX_VERSION} "
                       f"(built by another version); rebuild it with: {command} --overwrite")
  keys = ("case_id", "scan_id", "start", "count", "flags")
  return [ScanEntry(case_id=s["case_id"], scan_id=s["scan_id"], start=int(s["start"]),
                    count=int(s["count"]),
                    flags=np.frombuffer(s["flags"].encode(), np.uint8) - ord("0"),
                    extra={k: v for k, v in s.items() if k not in keys})
          for s in metadata["scans"]]


def _known() -> str:
  from scoat_jax import datasets as _registered
  return ", ".join(sorted(_registered.BUILDERS))


def open_source(name: str, data_dir: str | None = None) -> SliceDataset:
  """Opens a built slice dataset ('covid_semiseg', 'ct_volumes/medseg', ...).

  Args:
    name: registered name, optionally with '/config'.
    data_dir: where datasets are built; None or '' means the TFDS default
      (~/tensorflow_datasets or $TFDS_DATA_DIR).

  Returns:
    A SliceDataset (the index is read now; records are opened on first use).

  Raises:
    DatasetNotBuiltError: the dataset is not in data_dir; the message is the
      exact build command.
    DatasetError: unknown name or config, or an index that does not match.
  """
  from scoat_jax import datasets as _registered  # noqa: F401  (registers builders)
  base, _, config = name.partition("/")
  try:
    cls = tfds.builder_cls(base)
  except Exception as e:  # tfds raises its own DatasetNotFoundError
    raise DatasetError(f"unknown dataset {base!r}; choose one of {_known()} (data.name)") from e
  if not issubclass(cls, SliceBuilder):
    raise DatasetError(f"dataset {base!r} is not a scoat_jax slice dataset; choose one of "
                       f"{_known()} (data.name)")
  try:
    builder = cls(data_dir=data_dir or None, config=config or None)
  except ValueError as e:
    configs = ", ".join(sorted(cls.builder_configs)) or "none"
    raise DatasetError(f"unknown config {config!r} of {base} (configs: {configs}); "
                       f"fix data.name") from e
  full = f"{base}/{builder.builder_config.name}" if builder.builder_config else base
  command = cls.build_command(full, os.fspath(builder.data_dir_root))
  if not builder.is_prepared():
    raise DatasetNotBuiltError(f"dataset {full} is not built in {builder.data_dir_root}; "
                               f"build it with: {command}")
  meta = dict(builder.info.metadata or {})
  scans = _parse_index(full, meta, command)
  ds = SliceDataset(name=full, data_dir=os.fspath(builder.data_dir_root),
                    intensity=meta.get("intensity", ""), has_lung=bool(meta.get("has_lung")),
                    scans=scans, metadata=meta)
  n = builder.info.splits["train"].num_examples
  if ds.num_records != n:
    raise DatasetError(f"dataset {full} in {ds.data_dir}: index lists {ds.num_records} records "
                       f"but the split holds {n}; rebuild it with: {command} --overwrite")
  return ds
