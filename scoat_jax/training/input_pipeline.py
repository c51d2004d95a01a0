"""Training and evaluation batches of CT slices, with grain over a TFDS data source.

API: `train_batches`, `eval_batches`, `eval_case_ids`, `case_ids`, `num_train_examples`,
`ensure_dataset` (builds a dataset that can build itself on first use). Each
slice is prepared by `scoat_jax.data.preprocess.prepare_slice`, the same code
inference runs.

Config fields read from `data_cfg` (an ml_collections.ConfigDict, `config.data`):
  name              dataset: 'covid_semiseg', 'ct_volumes[/config]', 'ct_phantom[/config]'.
  data_dir          where it is built ('' -> the TFDS default).
  image_size        side S of the square slices fed to the model.
  fold, num_folds, fold_seed   k-fold split by case (data.folds.split_cases); fold -1
                    (or 'all'): every case trains, the validation split is empty.
  hu_window         (lo, hi) HU mapped to [0, 1] (HU datasets).
  uint8_normalization  8-bit datasets: 'scale' (/255) or 'equalize' (each slice's
                    own histogram; data.intensity).
  num_classes       1: mask = label > 0 (any opacity); 3: keep 0/1/2.
  augment           bool; when False the following five are ignored.
  flip              random left-right flip (p = 0.5).
  rotate_degrees    rotation uniform in [-d, d].
  scale_range       (lo, hi) zoom factor, uniform.
  gamma_range       (lo, hi): image ** gamma, log-uniform in [lo, hi] (an export
                    window's brightness), before the jitter; (1, 1) leaves it.
  intensity_jitter  j: image * U(1-j, 1+j) + U(-j, j), clipped to [0, 1].
  worker_count      grain worker processes (0: everything in the calling thread).
  slices            'all' | 'opacity' | 'lung': which training slices to use
                    (evaluation always sees every stored slice of a case, so
                    volume metrics cover the whole stored volume).

Determinism. Training positions are numbered p = step * global_batch + j.
Position p reads training record perm_e[p mod N], where N is the number of
training slices, e = p // N the epoch and perm_e a permutation drawn from
(seed, e); its augmentation is drawn from (seed, step, j). A global batch is
thus a pure function of (seed, step): resuming at start_step=k gives exactly
the batches of a continuous run, in any process and with any worker count, and
each process computes only its own slots j (process i: j in [i B, (i+1) B)).

Evaluation gives each process whole cases (case k of eval_case_ids goes to
process k % process_count), so per-case volume metrics can be computed on the
host; an evaluation "case" is one scan (one volume): for the phantom, one
patient's time points are separate eval cases, while the fold split is by
patient. Processes may yield different numbers of eval batches.
"""
from __future__ import annotations

import atexit
import dataclasses
import functools
import weakref
from collections.abc import Iterator

import grain
import numpy as np

from scoat_jax.data import folds, preprocess
from scoat_jax.data import intensity as intensity_lib
from scoat_jax import datasets
from scoat_jax.datasets import base as ds_base
from scoat_jax.datasets import intensity_match
from scoat_jax.training import unlabelled

_SPLITS = ("train", "validation", "all")
# Effectively endless: a training iterator stops only when the caller stops.
_MAX_STEPS = 1 << 40


class PipelineError(ValueError):
  """A bad input-pipeline request; the message names the config field and the fix."""


def _field(cfg, name, default=None):
  value = cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)
  if value is None:
    raise PipelineError(f"config.data.{name} is missing; set it (scoat_jax/configs/default.py)")
  return value


def _open(data_cfg) -> ds_base.SliceDataset:
  # Cheap (reads metadata.json, not records), so no cache that could go stale
  # when a dataset is rebuilt.
  return ds_base.open_source(str(_field(data_cfg, "name")), str(data_cfg.get("data_dir", "") or ""))


def ensure_dataset(data_cfg) -> str:
  """Makes sure the configured dataset is built, building one that `BUILDS_ITSELF` on first use.

  The phantom needs no input, so it is built into data_dir when missing (the
  default cohort takes ~15-50 s on a 2-core CPU). Datasets made from user files
  are never built implicitly. With several hosts sharing one data_dir, build
  it once beforehand (`python -m scoat_jax.datasets.build ...`).

  Args:
    data_cfg: the data config (name, data_dir).

  Returns:
    The dataset's full name ('name/config').

  Raises:
    DatasetNotBuiltError: a dataset from user files is missing; the message
      gives the build command.
  """
  name, data_dir = str(_field(data_cfg, "name")), str(data_cfg.get("data_dir", "") or "")
  try:
    return ds_base.open_source(name, data_dir).name
  except ds_base.DatasetNotBuiltError:
    builder = datasets.BUILDERS.get(name.partition("/")[0])
    if builder is None or not builder.BUILDS_ITSELF:
      raise
  from scoat_jax.datasets import build  # pylint: disable=g-import-not-at-top
  return build.build(name, data_dir)


def intensity(data_cfg) -> str:
  """How the configured dataset stores its slices: 'hu' or 'uint8' (8-bit exports)."""
  return _open(data_cfg).intensity


def export_window(data_cfg) -> dict | None:
  """The HU window estimated from an 8-bit dataset's slices (`data.export_window`), or None."""
  found = _open(data_cfg).metadata.get("export_window")
  return dict(found) if found else None


def _split_scans(data_cfg, ds: ds_base.SliceDataset, split: str) -> list[ds_base.ScanEntry]:
  if split not in _SPLITS:
    raise PipelineError(f"split={split!r} is unknown; choose one of {_SPLITS}")
  return ds.fold_scans(split, _field(data_cfg, "fold"), int(_field(data_cfg, "num_folds")),
                       int(_field(data_cfg, "fold_seed")))


def _train_records(data_cfg, ds: ds_base.SliceDataset) -> np.ndarray:
  slices = str(data_cfg.get("slices", "all") or "all")
  if slices not in ds_base.SLICE_FILTERS:
    raise PipelineError(f"config.data.slices={slices!r} is unknown; choose one of {ds_base.SLICE_FILTERS}")
  if slices == "lung" and not ds.has_lung:
    raise PipelineError(f"config.data.slices='lung' but {ds.name} has no lung masks; "
                        "use 'all' or 'opacity'")
  out = ds.fold_records(_field(data_cfg, "fold"), int(_field(data_cfg, "num_folds")),
                        int(_field(data_cfg, "fold_seed")), slices)
  if out.size == 0:
    raise PipelineError(f"fold {data_cfg.get('fold')} of {ds.name} has no training slice "
                        f"(slices={slices!r}); pick another fold or slices filter")
  return out


def num_train_examples(data_cfg) -> int:
  """Number of training slices of the configured fold (for steps per epoch)."""
  return int(_train_records(data_cfg, _open(data_cfg)).size)


def case_ids(data_cfg, split: str = "train") -> list[str]:
  """Sorted distinct case ids (patients) of a split: what the fold split assigns.

  Args:
    data_cfg: the data config.
    split: 'train', 'validation' (empty for fold -1) or 'all'.
  """
  return sorted({s.case_id for s in _split_scans(data_cfg, _open(data_cfg), split)})


def eval_case_ids(data_cfg, split: str = "validation") -> list[str]:
  """Names of the evaluation cases (scans) of a split; 'case' in eval batches indexes this.

  Args:
    data_cfg: the data config.
    split: 'validation' (the fold's held-out cases), 'train', or 'all'.

  Returns:
    Scan ids in dataset order.
  """
  return [s.scan_id for s in _split_scans(data_cfg, _open(data_cfg), split)]


class _SliceReader:
  """Picklable (for grain workers) reader of prepared slices of one dataset."""

  def __init__(self, data_cfg, ds: ds_base.SliceDataset, augment: bool):
    # The lung mask is not fed to the model; not decoding it saves ~1 ms/slice.
    self.ds = dataclasses.replace(ds, skip=("lung",) if ds.has_lung else (), _source=None)
    self.size = int(_field(data_cfg, "image_size"))
    if self.size < 1:
      raise PipelineError(f"config.data.image_size={self.size} must be positive")
    self.window = tuple(float(v) for v in data_cfg.get("hu_window", (-1250.0, 250.0)))
    if len(self.window) != 2 or not self.window[0] < self.window[1]:
      raise PipelineError(f"config.data.hu_window={self.window} must be (lo, hi) with lo < hi")
    try:
      self.uint8_mode = intensity_lib.check_uint8_mode(
          str(data_cfg.get("uint8_normalization", "scale")))
    except intensity_lib.IntensityError as e:
      raise PipelineError(f"config.data.{e}") from None
    self.num_classes = int(_field(data_cfg, "num_classes"))
    if self.num_classes not in (1, 3):
      raise PipelineError(f"config.data.num_classes={self.num_classes} must be 1 (any opacity) "
                          "or 3 (background/GGO/consolidation)")
    if ds.intensity not in ("hu", "uint8"):
      raise PipelineError(f"dataset {ds.name} records intensity {ds.intensity!r}, not 'hu'/'uint8'; "
                          "rebuild it")
    self.augment = augment
    self.aug = {}
    if augment:
      lo, hi = (float(v) for v in data_cfg.get("scale_range", (1.0, 1.0)))
      jitter = float(data_cfg.get("intensity_jitter", 0.0))
      degrees = float(data_cfg.get("rotate_degrees", 0.0))
      if not 0 < lo <= hi:
        raise PipelineError(f"config.data.scale_range=({lo}, {hi}) needs 0 < lo <= hi")
      if not 0 <= jitter < 1:
        raise PipelineError(f"config.data.intensity_jitter={jitter} must be in [0, 1)")
      if degrees < 0:
        raise PipelineError(f"config.data.rotate_degrees={degrees} must be >= 0")
      g_lo, g_hi = (float(v) for v in data_cfg.get("gamma_range", (1.0, 1.0)))
      if not 0 < g_lo <= g_hi:
        raise PipelineError(f"config.data.gamma_range=({g_lo}, {g_hi}) needs 0 < lo <= hi")
      self.aug = {"flip": bool(data_cfg.get("flip", False)), "rotate_degrees": degrees,
                  "scale_range": (lo, hi), "intensity_jitter": jitter,
                  "gamma_range": (g_lo, g_hi)}

  def read(self, record: int, rng: np.random.Generator | None):
    ex = self.ds.source[int(record)]
    image, mask = preprocess.prepare_slice(
        ex["image"], ex["mask"], source=self.ds.intensity, window=self.window, size=self.size,
        num_classes=self.num_classes, rng=rng if self.augment else None, aug=self.aug,
        uint8_mode=self.uint8_mode)
    return image, mask, ex

  def voxel_volume_ml(self, ex) -> float:
    """Volume of one output pixel times the slice spacing (0 where spacing is unknown)."""
    sx, sy, sz = (float(v) for v in ex["spacing"])
    zoom = self.size / max(ex["image"].shape)
    return sx * sy * sz / zoom ** 2 / 1000.0


class _TrainBatch:
  """step -> this process's share of the global batch (pure function of seed, step).

  With an unlabelled source, the slots `unlabelled.pseudo_slots` marks read
  unlabelled slices and their soft labels (`scoat_jax.training.unlabelled`).
  """

  def __init__(self, reader: _SliceReader, records: np.ndarray, seed: int, global_batch: int,
               first: int, local: int, unlabelled_source=None, pseudo=None):
    self.reader, self.records, self.seed = reader, records, seed
    self.global_batch, self.first, self.local = global_batch, first, local
    self.unlabelled = unlabelled_source
    self.pseudo = np.zeros(global_batch, bool) if pseudo is None else np.asarray(pseudo, bool)
    # Slot j's number among the slots of its kind, and the slots of each kind per step.
    self.rank = np.where(self.pseudo, np.cumsum(self.pseudo) - 1, np.cumsum(~self.pseudo) - 1)
    self.per_step = (int((~self.pseudo).sum()), int(self.pseudo.sum()))

  @functools.lru_cache(maxsize=8)  # noqa: B019 (per-epoch permutation, reused across steps)
  def _perm(self, kind: int, epoch: int) -> np.ndarray:
    n = self.records.size if kind == 0 else self.unlabelled.records.size
    # Stream 0 is the labelled order (as without unlabelled data), stream 2 the unlabelled one.
    return np.random.default_rng([self.seed, 2 * kind, epoch]).permutation(n)

  def __call__(self, step: int) -> dict:
    size = self.reader.size
    images = np.empty((self.local, size, size, 1), np.float32)
    masks = np.zeros((self.local, size, size), np.int32)
    soft = np.zeros((self.local, size, size), np.float32) if self.unlabelled else None
    for k in range(self.local):
      j = self.first + k
      kind = int(self.pseudo[j])
      n = self.records.size if kind == 0 else self.unlabelled.records.size
      pos = int(step) * self.per_step[kind] + int(self.rank[j])
      index = self._perm(kind, pos // n)[pos % n]
      rng = np.random.default_rng([self.seed, 1, int(step), j])
      if kind == 0:
        images[k, ..., 0], masks[k], _ = self.reader.read(self.records[index], rng)
      else:
        images[k, ..., 0], soft[k] = unlabelled.read(self.reader, self.unlabelled, index, rng)
    out = {"image": images, "mask": masks}
    if soft is not None:
      out["soft"] = soft
    return out


class _EvalBatch:
  """A list of (record, case index) -> one padded eval batch."""

  def __init__(self, reader: _SliceReader, batch_size: int):
    self.reader, self.batch_size = reader, batch_size

  def __call__(self, items) -> dict:
    b, size = self.batch_size, self.reader.size
    out = {"image": np.zeros((b, size, size, 1), np.float32),
           "mask": np.zeros((b, size, size), np.int32),
           "case": np.zeros((b,), np.int32), "slice_index": np.zeros((b,), np.int32),
           "valid": np.zeros((b,), bool), "voxel_volume_ml": np.zeros((b,), np.float32)}
    for k, (record, case) in enumerate(items):
      image, mask, ex = self.reader.read(record, None)
      out["image"][k, ..., 0], out["mask"][k] = image, mask
      out["case"][k], out["slice_index"][k], out["valid"][k] = case, int(ex["slice_index"]), True
      out["voxel_volume_ml"][k] = self.reader.voxel_volume_ml(ex)
    return out


def _processes(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # only the caller needs jax; grain workers never import it
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise PipelineError(f"process_index={process_index} is not in [0, process_count={process_count})")
  return int(process_index), int(process_count)


def _iterate(ds: grain.MapDataset, data_cfg) -> Iterator[dict]:
  workers = int(data_cfg.get("worker_count", 0) or 0)
  if workers < 0:
    raise PipelineError(f"config.data.worker_count={workers} must be >= 0")
  # Elements are whole batches (MBs each): keep grain's buffers to a few.
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if workers else 0,
                                            prefetch_buffer_size=2 if workers else 0))
  if workers:
    from absl import flags
    if not flags.FLAGS.is_parsed():
      # grain reads its absl flags when starting workers; outside absl.app
      # (scripts, tests) nothing parsed them, so take their defaults.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
  return _closing(iter(it))


class _closing:
  """Iterator that shuts grain's workers down when exhausted, closed or collected.

  Live iterators are also closed at interpreter exit, before module teardown,
  when grain's own finalisers would fail noisily and leak shared memory.
  """
  _live: weakref.WeakSet = weakref.WeakSet()

  def __init__(self, it):
    self._it = it
    _closing._live.add(self)

  def __iter__(self):
    return self

  def __next__(self):
    try:
      return next(self._it)
    except StopIteration:
      self.close()
      raise

  def close(self):
    it, self._it = self._it, iter(())
    if hasattr(it, "close"):
      it.close()

  def __del__(self):
    self.close()


@atexit.register
def _close_live_iterators():
  for it in list(_closing._live):
    it.close()


def train_batches(data_cfg, *, global_batch_size: int, seed: int, start_step: int = 0,
                  process_index: int | None = None, process_count: int | None = None,
                  unlabelled_cfg=None) -> Iterator[dict]:
  """Endless training batches of this process, starting at `start_step`.

  Args:
    data_cfg: the data config (fields in the module docstring).
    global_batch_size: batch size over all processes.
    seed: data seed (order and augmentation); non-negative.
    start_step: first step to produce (resume).
    process_index, process_count: default jax.process_index()/process_count().
    unlabelled_cfg: `config.unlabelled` (`scoat_jax.training.unlabelled`), or
      None / an empty name for labelled slices only.

  Returns:
    An iterator of {'image': float32 (B, S, S, 1) in [0, 1], 'mask': int32
    (B, S, S)} with B = global_batch_size / process_count, and with
    unlabelled data 'soft': float32 (B, S, S) soft labels (0 on labelled
    slots; `pseudo_slots` says which slots are which). With worker_count
    > 0, call its .close() when done to stop the worker processes at once.
  """
  pi, pc = _processes(process_index, process_count)
  if global_batch_size < 1 or global_batch_size % pc:
    raise PipelineError(f"global batch size {global_batch_size} is not a positive multiple of "
                        f"process_count={pc}; set config.batch_size to a multiple of {pc}")
  if int(seed) < 0 or int(start_step) < 0:
    raise PipelineError(f"seed={seed} and start_step={start_step} must be >= 0")
  ds = _open(data_cfg)
  reader = _SliceReader(data_cfg, ds, augment=bool(data_cfg.get("augment", False)))
  local = global_batch_size // pc
  source = pseudo = None
  train_records = _train_records(data_cfg, ds)
  if unlabelled.enabled(unlabelled_cfg):
    source = unlabelled.open_source(unlabelled_cfg, intensity=ds.intensity,
                                    fold=folds.parse_fold(data_cfg.fold, data_cfg.num_folds),
                                    data_dir=str(data_cfg.get("data_dir", "") or ""),
                                    reference=lambda: intensity_match.histogram(ds, train_records))
    pseudo = unlabelled.pseudo_slots(global_batch_size, float(unlabelled_cfg.ratio))
  fn = _TrainBatch(reader, train_records, int(seed), global_batch_size,
                   pi * local, local, source, pseudo)
  steps = grain.MapDataset.range(int(start_step), int(start_step) + _MAX_STEPS)
  return _iterate(steps.map(fn), data_cfg)


def eval_batches(data_cfg, *, split: str = "validation", batch_size: int,
                 process_index: int | None = None, process_count: int | None = None
                 ) -> Iterator[dict]:
  """Deterministic evaluation batches of this process's cases (no augmentation).

  Args:
    data_cfg: the data config.
    split: 'validation', 'train' or 'all' (cases of the configured fold).
    batch_size: slices per batch of this process (the last one is padded).
    process_index, process_count: default jax.process_index()/process_count().

  Returns:
    An iterator of {'image' float32 (B, S, S, 1), 'mask' int32 (B, S, S),
    'case' int32 (B,) index into eval_case_ids(data_cfg, split), 'slice_index'
    int32 (B,), 'valid' bool (B,) (False on padding), 'voxel_volume_ml'
    float32 (B,): volume of one output pixel x slice spacing, 0 if unknown}.
    Slices of a case come in slice order; case k belongs to process k % count.
  """
  pi, pc = _processes(process_index, process_count)
  if batch_size < 1:
    raise PipelineError(f"eval batch_size={batch_size} must be >= 1")
  ds = _open(data_cfg)
  reader = _SliceReader(data_cfg, ds, augment=False)
  items = [(s.start + r, k) for k, s in enumerate(_split_scans(data_cfg, ds, split))
           if k % pc == pi for r in range(s.count)]
  chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
  return _iterate(grain.MapDataset.source(chunks).map(_EvalBatch(reader, batch_size)), data_cfg)
