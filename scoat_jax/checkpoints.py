"""Checkpoints (Orbax) and the workdir they live in.

Layout of a training workdir:

    <workdir>/config.json        the run's config; a different run is refused
    <workdir>/checkpoints/<step>/state   params, batch_stats, opt_state, step
    <workdir>/checkpoints/<step>/meta    JSON: config, epoch, validation metrics
    <workdir>/metrics.jsonl      one line per evaluation
    <workdir>/tensorboard/       event files

Checkpoints preserved: the KEEP_LATEST latest (to resume) and the best by
validation DSC (to deploy). Orbax's `best_fn` with `max_to_keep` alone can
delete the latest, so preservation is an explicit "latest OR best" policy. A
run without validation (`data.fold=-1`, the final model on every case) saves
its checkpoints without metrics: no best exists, the latest are kept, and the
latest is the one deployed (`resolve_step_dir`).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging as py_logging
import os
import pathlib
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as policies

from scoat_jax import configs
from scoat_jax.common import fileio

BEST_METRIC = "val_dsc"
# Recent checkpoints kept besides the best: if the newest is damaged, the run
# resumes from the one before.
KEEP_LATEST = 2
# Config fields that may differ when a run is resumed: they do not change what
# is trained, only where data comes from and how the run is logged or launched.
RESUMABLE_FIELDS = frozenset({
    "data.data_dir", "data.worker_count", "log_every_steps", "compilation_cache_dir",
    "distributed", "num_overlays", "max_steps", "eval_batch_size", "cpu_weight_grad",
})


class CheckpointError(ValueError):
  """A checkpoint or workdir that cannot be used as asked."""


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json())


def check_workdir(workdir: str | pathlib.Path, config: ml_collections.ConfigDict, *,
                  overwrite: bool = False) -> None:
  """Refuses a workdir that holds a run with another config, unless `overwrite`.

  On first use writes `<workdir>/config.json`. With `overwrite`, the earlier
  run's checkpoints, metrics and event files are removed first.

  Raises:
    CheckpointError: the workdir holds a different run and overwrite is False.
  """
  workdir = pathlib.Path(workdir)
  path = workdir / "config.json"
  new = config_to_dict(config)
  if path.exists():
    try:
      old = configs.upgrade(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
      raise CheckpointError(f"{path}: cannot read the run's config ({str(e).splitlines()[0]}); "
                            "choose a new --workdir, or pass --overwrite to delete that run.") from None
    old_flat, new_flat = _flatten(old), _flatten(new)
    diff = sorted(k for k in set(old_flat) | set(new_flat)
                  if k not in RESUMABLE_FIELDS and old_flat.get(k) != new_flat.get(k))
    if diff and not overwrite:
      shown = ", ".join(f"{k}: {old_flat.get(k)!r} -> {new_flat.get(k)!r}" for k in diff[:4])
      raise CheckpointError(
          f"{workdir} holds a run with another config ({shown}"
          f"{', ...' if len(diff) > 4 else ''}); choose a new --workdir, or pass "
          f"--overwrite to delete that run.")
    if diff and overwrite:
      for name in ("checkpoints", "metrics.jsonl", "tensorboard"):
        target = workdir / name
        if target.is_dir():
          shutil.rmtree(target)
        elif target.exists():
          target.unlink()
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    fileio.write_text(json.dumps(new, indent=2, sort_keys=True), path)


class WorkdirGuard:
  """Undoes what a run wrote into its workdir when it fails before training starts.

  A run refused after `check_workdir` (bad `init_from` weights, a dataset that
  does not open, ...) must leave the workdir as it found it, or the corrected
  command would be refused as "another config". Only entries that did not exist
  before are removed; a workdir the guard saw created is removed when empty.
  """

  def __init__(self, workdir: str | pathlib.Path):
    self.workdir = pathlib.Path(workdir)
    self.existed = self.workdir.exists()
    self.before = set(os.listdir(self.workdir)) if self.workdir.is_dir() else set()
    self.manager: ocp.CheckpointManager | None = None

  def make_manager(self) -> ocp.CheckpointManager:
    """`make_manager(workdir)`, closed by the guard before it removes the folder."""
    self.manager = make_manager(self.workdir)
    return self.manager

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None or jax.process_index() != 0 or not self.workdir.is_dir():
      return False
    if self.manager is not None:
      self.manager.close()
    for name in set(os.listdir(self.workdir)) - self.before:
      target = self.workdir / name
      if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target, ignore_errors=True)
      else:
        target.unlink(missing_ok=True)
    if not self.existed and not any(self.workdir.iterdir()):
      self.workdir.rmdir()
    return False


def make_manager(workdir: str | pathlib.Path) -> ocp.CheckpointManager:
  """A manager keeping the KEEP_LATEST latest checkpoints and the best by validation DSC.

  Checkpoints saved without metrics (fold -1, or an interrupted run's) are
  never the best; they are kept only while among the latest. Unfinished saves
  (`*.orbax-checkpoint-tmp*` folders a killed run left) are removed.
  """
  directory = pathlib.Path(workdir).absolute() / "checkpoints"
  best = lambda metrics: metrics[BEST_METRIC]  # noqa: E731
  options = ocp.CheckpointManagerOptions(
      best_fn=best, best_mode="max",
      preservation_policy=policies.AnyPreservationPolicy([
          policies.LatestN(n=KEEP_LATEST),
          policies.BestN(get_metric_fn=best, reverse=False, n=1,
                         keep_checkpoints_without_metrics=False),
      ]),
      cleanup_tmp_directories=True, enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory, item_names=("state", "meta"), options=options)


def state_to_tree(state) -> dict:
  return {"step": state.step, "params": state.params,
          "batch_stats": state.batch_stats, "opt_state": state.opt_state}


def _nbytes(tree) -> int:
  return int(sum(getattr(x, "nbytes", 0) for x in jax.tree_util.tree_leaves(tree)))


def _disk_full(error: BaseException) -> bool:
  while error is not None:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    if "No space left on device" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def _remove_unfinished(directory: pathlib.Path) -> None:
  for tmp in directory.glob("*.orbax-checkpoint-tmp*"):
    shutil.rmtree(tmp, ignore_errors=True)


def save(manager: ocp.CheckpointManager, state, *, meta: dict,
         metrics: dict | None = None) -> None:
  """Saves `state` at its step with JSON `meta`; `metrics` rank it for 'best'.

  With `metrics` None (a run without validation) the step is saved unranked:
  it is kept while among the KEEP_LATEST latest, and never the best.

  Raises:
    CheckpointError: the disk is full; the unfinished save is removed and the
      earlier checkpoints are untouched.
  """
  step = int(jax.device_get(state.step))
  tree = state_to_tree(state)
  absl_logger, unranked = py_logging.getLogger("absl"), _DropUnrankedWarning()
  if metrics is None:  # Orbax warns at every such save; here it is intended
    absl_logger.addFilter(unranked)
  try:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
        metrics=metrics, force=True)
    manager.wait_until_finished()
  except Exception as e:  # Orbax wraps the OSError of a full disk in its own errors.
    if not _disk_full(e):
      raise
    directory = pathlib.Path(manager.directory)
    _remove_unfinished(directory)
    free = shutil.disk_usage(directory).free
    raise CheckpointError(
        f"{directory.parent}: the disk is full; saving step {step} needs about "
        f"{_nbytes(tree) / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free. Free space and run "
        f"the same command again: it resumes from step {manager.latest_step() or 0}.") from None
  finally:
    absl_logger.removeFilter(unranked)


class _DropUnrankedWarning(py_logging.Filter):
  # "Requested `tracked_metric`; did not provide metrics.": Orbax's warning for
  # a step saved without metrics, which fold -1 and interrupted runs do on purpose.
  def filter(self, record):
    return "did not provide metrics" not in record.getMessage()


def restore_latest(manager: ocp.CheckpointManager, state):
  """Restores the newest readable checkpoint into the structure and shardings of `state`.

  A checkpoint that cannot be read (a truncated or damaged file) is moved aside
  to `<step>.damaged` (never deleted) with a warning naming it, and the one
  before is tried.

  Returns:
    (state, meta) or (None, None) when there is no readable checkpoint.
  """
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_to_tree(state))
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types for a damaged checkpoint.
      directory = pathlib.Path(manager.directory)
      aside = directory / f"{step}.damaged"
      if jax.process_index() == 0:
        os.replace(directory / str(step), aside)
      manager.reload()
      logging.warning("the checkpoint of step %d cannot be read (%s: %s); moved it to %s and "
                      "resuming from the one before.", step, type(e).__name__,
                      str(e).splitlines()[0][:200] if str(e) else "", aside)
      continue
    tree = restored["state"]
    state = state.replace(step=tree["step"], params=tree["params"],
                          batch_stats=tree["batch_stats"], opt_state=tree["opt_state"])
    return state, restored["meta"]
  return None, None


def resolve_step_dir(path: str | pathlib.Path) -> pathlib.Path:
  """Finds one saved step from a workdir, a checkpoints dir, or a step dir.

  From a workdir or its checkpoints folder: the best step by validation DSC;
  where no step has validation metrics, the latest step. That is a run
  trained with `data.fold=-1` (every case, no validation: its latest step is
  its final model), or one interrupted before its first evaluation.

  Raises:
    CheckpointError: when `path` holds no checkpoint.
  """
  path = pathlib.Path(path).expanduser().absolute()
  if (path / "state").is_dir():
    return path
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  if not path.is_dir():
    raise CheckpointError(f"{path}: no such checkpoint; pass a training workdir, its "
                          f"checkpoints folder, or one saved step folder.")
  manager = make_manager(path.parent) if path.name == "checkpoints" else None
  step = None
  if manager is not None:
    step = manager.best_step()  # None when no step has metrics: then the latest
    step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"{path}: holds no saved step; train first or pass a step folder.")
  return path / str(step)


def read_meta(step_dir: str | pathlib.Path) -> dict:
  """The meta JSON of a saved step, its config in the current schema (`configs.upgrade`).

  Meta written before `intensity` was stored gets it from the dataset name
  (COVID-SemiSeg is the one 8-bit dataset).

  Raises:
    CheckpointError: no readable meta, or one without a training config.
  """
  step_dir = pathlib.Path(step_dir)
  path = step_dir / "meta" / "metadata"
  try:
    meta = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{step_dir}: cannot read its meta JSON {path} ({type(e).__name__}); "
                          "pass a step saved by scoat_jax training.") from None
  if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
    raise CheckpointError(f"{step_dir}: its meta JSON holds no training config; pass a step "
                          "saved by scoat_jax training.")
  try:
    meta["config"] = configs.upgrade(meta["config"])
  except ValueError as e:
    raise CheckpointError(f"{step_dir}: {e}") from None
  if "intensity" not in meta:
    name = str(meta["config"].get("data", {}).get("name", ""))
    meta["intensity"] = "uint8" if name.partition("/")[0] == "covid_semiseg" else "hu"
  return meta


def load_variables(path: str | pathlib.Path) -> tuple[dict[str, Any], dict]:
  """Loads `{'params', 'batch_stats'}` and the meta JSON of a saved step.

  Args:
    path: a training workdir (its best checkpoint; a fold -1 run's latest), its
      `checkpoints` folder, or one saved step folder.

  Returns:
    (variables, meta) with NumPy leaves, ready for `model.apply`.
  """
  with quiet_orbax():
    step_dir = resolve_step_dir(path)
  meta = read_meta(step_dir)
  return read_weights(step_dir), meta


class _DropOrbaxNoise(py_logging.Filter):
  # Orbax logs every read at INFO and warns that a step's item folder has no
  # _CHECKPOINT_METADATA (it lives one level up): noise for a CLI user.
  def filter(self, record):
    return record.levelno >= py_logging.ERROR or "orbax" not in record.pathname


@contextlib.contextmanager
def quiet_orbax():
  """Silences Orbax's INFO/WARNING chatter (for CLI tools that only read checkpoints)."""
  logger, flt = py_logging.getLogger("absl"), _DropOrbaxNoise()
  logger.addFilter(flt)
  try:
    yield
  finally:
    logger.removeFilter(flt)


def read_weights(step_dir: pathlib.Path) -> dict:
  """Params and BN statistics as NumPy arrays, whatever devices the checkpoint was saved from.

  Restoring into a target tree built from the checkpoint's own metadata makes
  the result independent of the saving topology (a run trained on 8 GPUs
  loads on one CPU), and leaving out the Adam moments saves 2/3 of the reads.
  """
  try:
    with quiet_orbax():
      ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
      tree = ckptr.metadata(step_dir / "state").item_metadata.tree
      wanted = {k: tree[k] for k in ("params", "batch_stats")}
      item = jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), wanted)
      args = jax.tree_util.tree_map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
      return ckptr.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
          item=item, restore_args=args, partial_restore=True))
  except Exception as e:  # Orbax raises many types for a damaged checkpoint.
    first = str(e).splitlines()[0] if str(e) else ""
    raise CheckpointError(f"{step_dir}: cannot read its weights ({type(e).__name__}: {first}); "
                          "the checkpoint may be incomplete or damaged.") from None
