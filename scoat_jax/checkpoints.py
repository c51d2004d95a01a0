"""Checkpoints (Orbax) and the workdir they live in.

Layout of a training workdir:

    <workdir>/config.json        the run's config; a different run is refused
    <workdir>/checkpoints/<step>/state   params, batch_stats, opt_state, step
    <workdir>/checkpoints/<step>/meta    JSON: config, epoch, validation metrics
    <workdir>/metrics.jsonl      one line per evaluation
    <workdir>/tensorboard/       event files

Two checkpoints are preserved: the latest (to resume) and the best by
validation DSC (to deploy). Orbax's `best_fn` with `max_to_keep` alone can
delete the latest, so preservation is an explicit "latest OR best" policy.
"""
from __future__ import annotations

import contextlib
import json
import logging as py_logging
import pathlib
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from scoat_jax import configs

BEST_METRIC = "val_dsc"
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
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(new, indent=2, sort_keys=True))
    tmp.replace(path)


def make_manager(workdir: str | pathlib.Path) -> ocp.CheckpointManager:
  """A manager keeping the latest checkpoint and the best by validation DSC."""
  directory = pathlib.Path(workdir).absolute() / "checkpoints"
  best = lambda metrics: metrics[BEST_METRIC]  # noqa: E731
  options = ocp.CheckpointManagerOptions(
      best_fn=best, best_mode="max",
      preservation_policy=policies.AnyPreservationPolicy([
          policies.LatestN(n=1),
          policies.BestN(get_metric_fn=best, reverse=False, n=1,
                         keep_checkpoints_without_metrics=False),
      ]),
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory, item_names=("state", "meta"), options=options)


def state_to_tree(state) -> dict:
  return {"step": state.step, "params": state.params,
          "batch_stats": state.batch_stats, "opt_state": state.opt_state}


def save(manager: ocp.CheckpointManager, state, *, meta: dict,
         metrics: dict | None = None) -> None:
  """Saves `state` at its step with JSON `meta`; `metrics` rank it for 'best'."""
  step = int(jax.device_get(state.step))
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state_to_tree(state)),
      meta=ocp.args.JsonSave(meta)), metrics=metrics, force=True)
  manager.wait_until_finished()


def restore_latest(manager: ocp.CheckpointManager, state):
  """Restores the latest checkpoint into the structure and shardings of `state`.

  Returns:
    (state, meta) or (None, None) when there is no checkpoint yet.
  """
  step = manager.latest_step()
  if step is None:
    return None, None
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_to_tree(state))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  tree = restored["state"]
  state = state.replace(step=tree["step"], params=tree["params"],
                        batch_stats=tree["batch_stats"], opt_state=tree["opt_state"])
  return state, restored["meta"]


def resolve_step_dir(path: str | pathlib.Path) -> pathlib.Path:
  """Finds one saved step from a workdir (its best), a checkpoints dir, or a step dir.

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
  step = manager.best_step() if manager is not None else None
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
    path: a training workdir (its best checkpoint), its `checkpoints` folder,
      or one saved step folder.

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
