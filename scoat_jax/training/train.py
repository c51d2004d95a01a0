"""Training and evaluation loop: data parallel, resumable, evaluated every epoch.

`train_and_evaluate(config, workdir)` trains one cross-validation fold, or
with `data.fold=-1` (or 'all') the final model on every case, without
validation (checkpoints then carry no metrics and the latest are kept). The
state is replicated and the batch sharded over `Mesh(devices, ('data',))`;
the same code runs on one CPU, eight GPUs or several hosts. The batch at step
s is a pure function of (seed, s) and the learning rate a pure function of s,
so resuming needs only the step and the state in the latest checkpoint.
"""
from __future__ import annotations

import pathlib
import time

import jax
import ml_collections
from absl import logging

from scoat_jax import checkpoints, models
from scoat_jax.common import cli, parallel
from scoat_jax.data import folds, soft_labels
from scoat_jax.evaluation import validation
from scoat_jax.models import outputs
from scoat_jax.training import hooks, input_pipeline, optimization, unlabelled
from scoat_jax.training.metrics_writer import MetricsWriter, summary_line
from scoat_jax.training.schedule import paper_schedule


class NonFiniteLossError(cli.DivergedError):
  """The training loss became NaN or Inf (exit status 3 from the command)."""


class NoValidationError(ValueError):
  """An evaluation asked of a split without cases (fold -1 holds no case out)."""


_NO_VALIDATION_FIX = ("evaluate another fold's run, or use python -m scoat_jax.evaluate on "
                      "external data")


def resolve_fold(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with `data.fold` an int ('all' -> -1, `folds.parse_fold`); a copy if it changes.

  Training stores the result in config.json, so `fold=all` and `fold=-1` are one run.

  Raises:
    FoldError: a fold that is neither -1/'all' nor in [0, data.num_folds).
  """
  fold = folds.parse_fold(config.data.fold, config.data.num_folds)
  if isinstance(config.data.fold, int):  # already an int (parse_fold refused a bool)
    return config
  values = config.to_dict()
  values["data"]["fold"] = fold
  return ml_collections.ConfigDict(values)


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
  """`config.steps_per_epoch`, or the training slices of the fold // batch size."""
  if config.steps_per_epoch > 0:
    return config.steps_per_epoch
  n = input_pipeline.num_train_examples(config.data)
  if n < config.batch_size:
    raise ValueError(f"the training fold has {n} slices, fewer than config.batch_size="
                     f"{config.batch_size}; lower config.batch_size.")
  return n // config.batch_size


def create_schedule(config: ml_collections.ConfigDict, spe: int):
  return paper_schedule(
      steps_per_epoch=spe, learning_rate=config.learning_rate,
      restart_learning_rate=config.restart_learning_rate,
      decay_every_epochs=config.decay_every_epochs, decay_factor=config.decay_factor,
      restart_epoch=config.restart_epoch)


class Validator:
  """Scores the fold's validation cases (`evaluation.validation`) with this process's devices."""

  def __init__(self, config: ml_collections.ConfigDict, model, split: str = "validation"):
    n = len(jax.local_devices())
    self.config, self.split = config, split
    self.batch_size = max(n, config.eval_batch_size // n * n)
    self.predict_fn = validation.make_predict_fn(
        model.apply, num_classes=config.num_classes,
        average_heads=config.predict_average_heads, mesh=parallel.make_mesh(jax.local_devices()),
        threshold=outputs.check_threshold(config.get("predict_threshold")))
    self.case_ids = input_pipeline.eval_case_ids(config.data, split=split)
    if not self.case_ids:  # fold -1's validation split: nothing to average over
      raise NoValidationError(f"config.data.fold={config.data.fold} has no {split} cases; "
                              f"{_NO_VALIDATION_FIX}.")

  def __call__(self, variables, num_overlays: int = 0):
    """(aggregate, per_case, overlays) of `validation.evaluate`."""
    batches = input_pipeline.eval_batches(self.config.data, split=self.split,
                                          batch_size=self.batch_size)
    return validation.evaluate(self.predict_fn, variables, batches, self.case_ids,
                               num_overlays=num_overlays, num_classes=self.config.num_classes)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       overwrite: bool = False) -> dict:
  """Trains one fold, evaluating and checkpointing every `config.eval_every_epochs`.

  With `config.data.fold` -1 (or 'all', stored as -1) it trains on every case
  and validates on none: the same checkpoints, ranked by nothing (the manager
  keeps the latest), and metrics.jsonl lines with step, epoch, learning_rate
  and train_loss only.

  Args:
    config: the experiment config (`scoat_jax/configs/default.py`).
    workdir: where checkpoints, metrics.jsonl and TensorBoard files go.
    overwrite: replace a different run already in `workdir`.

  Returns:
    The last evaluation's metrics (as written to metrics.jsonl).
  """
  workdir = pathlib.Path(workdir)
  config = resolve_fold(config)
  validating = config.data.fold != folds.ALL_FOLDS
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  optimization.check_init_head(config)
  spe = steps_per_epoch(config)
  total_steps = config.num_epochs * spe
  if config.max_steps > 0:
    total_steps = min(total_steps, config.max_steps)

  model = models.create_model(config)
  schedule = create_schedule(config, spe)
  rng = jax.random.key(config.seed)
  state = optimization.create_train_state(
      config, model, optimization.create_optimizer(schedule), jax.random.fold_in(rng, 0), mesh)
  with checkpoints.WorkdirGuard(workdir) as guard:  # refused before the first step: as found
    checkpoints.check_workdir(workdir, config, overwrite=overwrite)
    manager = guard.make_manager()
    writer = MetricsWriter(workdir)
    state = _restore_or_initialise(state, manager, writer, config)
    start_step = int(jax.device_get(state.step))
    train_step = optimization.make_train_step(config, mesh)
    validate = Validator(config, model) if validating else None
    if not validating:
      logging.info("fold -1 trains on all %d cases without validation; the latest %d "
                   "checkpoints are kept.", len(input_pipeline.case_ids(config.data)),
                   checkpoints.KEEP_LATEST)
    meta = {"config": checkpoints.config_to_dict(config), "total_steps": total_steps,
            "intensity": input_pipeline.intensity(config.data)}
    if meta["intensity"] == "uint8":
      meta["export_window"] = input_pipeline.export_window(config.data)
    if unlabelled.enabled(config.get("unlabelled")):
      meta["unlabelled"] = _unlabelled_provenance(config.unlabelled)
      logging.info("semi-supervised: %s with soft labels %s, ratio %.2f, weight %.2f",
                   config.unlabelled.name, config.unlabelled.soft_labels,
                   config.unlabelled.ratio, config.unlabelled.weight)
    batches = input_pipeline.train_batches(
        config.data, global_batch_size=config.batch_size, seed=config.seed, start_step=start_step,
        unlabelled_cfg=config.get("unlabelled"))

  def diverged(step, value):
    raise NonFiniteLossError(
        f"training loss is {value} at step {step}; stopped. The last good checkpoint is in "
        f"{manager.directory} (step {manager.latest_step()}). Lower config.learning_rate or "
        "check the data.")

  losses = hooks.LossMonitor(diverged)
  log_now = hooks.Every(config.log_every_steps, total_steps)
  evaluate_now = hooks.Every(spe * config.eval_every_epochs, total_steps)
  progress = _Progress(start_step, total_steps)
  last: dict = {}
  with writer, hooks.StopSignal() as stop:
    for step in range(start_step, total_steps):
      batch = parallel.global_batch(next(batches), mesh)
      state, step_metrics = train_step(state, batch, jax.random.fold_in(rng, step + 1))
      losses.add(step, step_metrics["loss"])
      done = step + 1
      if log_now(done):
        losses.check()
        lr = float(schedule(step))
        progress.log(done, losses.last, lr)
        writer.write_scalars(done, {"train/loss": losses.last, "train/learning_rate": lr})
      if stop.signal is not None:
        losses.check()
        checkpoints.save(manager, state, meta=meta | {"step": done, "interrupted": True})
        logging.warning("Signal %d: saved step %d to %s; exiting.", stop.signal, done,
                        manager.directory)
        raise KeyboardInterrupt(f"stopped by signal {stop.signal} at step {done}")
      if evaluate_now(done):
        losses.check()
        last = _evaluate_and_save(state, validate, writer, manager, meta, done=done,
                                  epoch=done / spe, learning_rate=float(schedule(step)),
                                  train_loss=losses.mean_and_reset(), config=config)
  return last


def _unlabelled_provenance(cfg) -> dict:
  """What the checkpoint records of its unlabelled data: dataset, soft labels and their teacher."""
  manifest = soft_labels.read_manifest(str(cfg.soft_labels)) or {}
  return {"name": str(cfg.name), "soft_labels": str(cfg.soft_labels),
          "teachers": manifest.get("teachers", []),
          "teacher_folds": manifest.get("teacher_folds", [])}


def _restore_or_initialise(state, manager, writer: MetricsWriter, config):
  """The newest readable checkpoint, else `config.init_from`, else the fresh state.

  metrics.jsonl is rewritten to hold one line per evaluation up to the step the
  run starts from.
  """
  restored, meta = checkpoints.restore_latest(manager, state)
  if restored is not None:
    logging.info("Resuming from step %d (checkpoint in %s).", int(restored.step),
                 manager.directory)
    writer.rewrite(int(restored.step), last=(meta or {}).get("record"))
    return restored
  writer.rewrite(0)
  if config.init_from:
    state = optimization.init_from(state, config)
    logging.info("Initialised from %s.", config.init_from)
  return state


def _evaluate_and_save(state, validate: Validator | None, writer: MetricsWriter, manager,
                       meta: dict, *, done: int, epoch: float, learning_rate: float,
                       train_loss: float, config) -> dict:
  """Validates the state, writes the metrics, saves a checkpoint ranked by validation DSC.

  Without a validator (fold -1) the record holds the training values only and
  the checkpoint is saved without metrics (kept while it is among the latest).
  """
  record = {"step": done, "epoch": epoch, "learning_rate": learning_rate,
            "train_loss": train_loss}
  saved, ranking, overlays = {"step": done, "epoch": epoch}, None, ()
  if validate is not None:
    variables = validation.local_variables({"params": state.params,
                                            "batch_stats": state.batch_stats})
    aggregate, per_case, overlays = validate(
        variables, num_overlays=config.num_overlays if writer.enabled else 0)
    record.update(aggregate)
    saved["per_case"] = per_case
    ranking = {checkpoints.BEST_METRIC: record.get("val_dsc", 0.0)}
    logging.info("epoch %.2f  %s", epoch, summary_line(record))
  else:
    logging.info("epoch %.2f  train_loss %.4f (no validation: fold -1)", epoch, train_loss)
  # The checkpoint first: metrics.jsonl never names a step that was not saved
  # (the record travels with the checkpoint, for a run killed in between).
  checkpoints.save(manager, state, meta=meta | saved | {"record": record}, metrics=ranking)
  writer.write_evaluation(record, overlays)
  return record


class _Progress:
  """The progress line: step, loss, learning rate, speed (compilation included) and time left."""

  def __init__(self, start_step: int, total_steps: int):
    self.start, self.total, self.t0 = start_step, total_steps, time.time()

  def log(self, done: int, loss: float, lr: float) -> None:
    rate = (done - self.start) / max(time.time() - self.t0, 1e-9)
    eta = time.strftime("%H:%M:%S", time.gmtime((self.total - done) / max(rate, 1e-9)))
    logging.info("step %d/%d  loss %.4f  lr %.2e  %.2f steps/s  ETA %s", done, self.total, loss,
                 lr, rate, eta)


def evaluate_checkpoint(config: ml_collections.ConfigDict, checkpoint: str,
                        split: str = "validation") -> tuple[dict, list[dict]]:
  """Scores a saved model on a split of the configured fold (`--mode=eval`).

  Raises:
    NoValidationError: split 'validation' with `config.data.fold` -1, or of a
      model trained with fold -1: it saw every case, none is held out.
  """
  config = resolve_fold(config)
  if split == "validation" and config.data.fold == folds.ALL_FOLDS:
    raise NoValidationError(f"--config.data.fold={config.data.fold} trains on every case and has "
                            f"no validation cases: {_NO_VALIDATION_FIX}.")
  with checkpoints.quiet_orbax():
    step_dir = checkpoints.resolve_step_dir(checkpoint)
  trained = checkpoints.read_meta(step_dir)["config"].get("data", {}).get("fold")
  if split == "validation" and trained in (folds.ALL_FOLDS, "all"):
    raise NoValidationError(f"--checkpoint={checkpoint}: a fold -1 run trained on every case, "
                            f"so it has no validation cases: {_NO_VALIDATION_FIX}.")
  variables = checkpoints.read_weights(step_dir)
  aggregate, per_case, _ = Validator(config, models.create_model(config), split)(variables)
  return aggregate, per_case
