"""Training and evaluation loop: data parallel, resumable, evaluated every epoch.

`train_and_evaluate(config, workdir)` trains one cross-validation fold. The
state is replicated and the batch sharded over `Mesh(devices, ('data',))`;
the same code runs on one CPU, eight GPUs or several hosts. The batch at step
s is a pure function of (seed, s) and the learning rate a pure function of s,
so resuming needs only the step and the state in the latest checkpoint.
"""
from __future__ import annotations

import functools
import json
import pathlib
import signal
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from scoat_jax import checkpoints, evaluation, input_pipeline, losses, parallel
from scoat_jax.models import get_model
from scoat_jax.schedule import paper_schedule


INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


class TrainState(train_state.TrainState):
  batch_stats: Any


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or Inf."""


def create_model(config: ml_collections.ConfigDict) -> nn.Module:
  if config.deep_supervision not in ("mean", "last", "none"):
    raise ValueError(f"config.deep_supervision={config.deep_supervision!r}: use 'mean', "
                     f"'last' or 'none'.")
  if config.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.dtype={config.dtype!r}: use 'float32' or 'bfloat16'.")
  return get_model(config.model, num_classes=config.num_classes,
                   deep_supervision=config.deep_supervision != "none",
                   widths=tuple(config.widths), dtype=jnp.dtype(config.dtype),
                   fast_cpu_grad=config.get("fast_cpu_grad", True))


def create_loss(config: ml_collections.ConfigDict) -> Callable:
  kwargs = {"alpha": config.loss_alpha} if config.loss == "bce_dice" else {}
  base = losses.get_loss(config.loss, **kwargs)
  return functools.partial(losses.deep_supervision_loss, base, mode=config.deep_supervision)


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
  if config.steps_per_epoch > 0:
    return config.steps_per_epoch
  n = input_pipeline.num_train_examples(config.data)
  if n < config.batch_size:
    raise ValueError(f"the training fold has {n} slices, fewer than config.batch_size="
                     f"{config.batch_size}; lower config.batch_size.")
  return n // config.batch_size


def create_optimizer(schedule: optax.Schedule) -> optax.GradientTransformation:
  """Adam (PyTorch's defaults: b1 0.9, b2 0.999, eps 1e-8) with the schedule inside."""
  return optax.adam(schedule)


def create_train_state(config, model, tx, rng, mesh) -> TrainState:
  """Initialises the replicated train state (parameters, BN statistics, optimizer)."""
  size = config.data.image_size
  in_channels = config.get("in_channels", 1)

  def init(rng):
    variables = model.init(rng, jnp.zeros((1, size, size, in_channels)), train=False)
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables["batch_stats"])
  # Initialisation runs once; XLA's CPU backend spends most of its compile
  # time optimising the ~100 random-number kernels (about 60 s for SCOAT-Net),
  # and without optimisation it compiles 3x faster and still runs in ms.
  return jax.jit(init, out_shardings=parallel.replicated(mesh),
                 compiler_options=INIT_COMPILER_OPTIONS)(rng)


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, loss_fn: Callable,
               with_grads: bool = False):
  """One optimizer step on a (global) batch; returns (new_state, metrics).

  BatchNorm statistics are taken over the whole global batch: under jit the
  means over the sharded batch axis become cross-device reductions, so N
  devices compute exactly what one device would.
  """
  del rng  # SCOAT-Net has no dropout; kept for a uniform step signature.

  def compute_loss(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"],
        train=True, mutable=["batch_stats"])
    return loss_fn(logits, batch["mask"]), updates

  (loss, updates), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
  if with_grads:
    metrics["grads"] = grads
  return state, metrics


def make_train_step(config, mesh, *, with_grads: bool = False) -> Callable:
  """The jitted train step: state replicated and donated, batch sharded.

  Args:
    config: the experiment config (loss, deep supervision).
    mesh: the data-parallel mesh.
    with_grads: also return the gradients in the metrics (for tests).
  """
  repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return jax.jit(functools.partial(train_step, loss_fn=create_loss(config), with_grads=with_grads),
                 in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                 donate_argnums=(0,))


class _Interrupt:
  """Turns SIGINT/SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.signal = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


def _append_jsonl(path: pathlib.Path, record: dict) -> None:
  with path.open("a") as f:
    f.write(json.dumps(record) + "\n")


def _truncate_jsonl(path: pathlib.Path, max_step: int) -> None:
  """Drops records past the restored step (written before a crash)."""
  if not path.exists():
    return
  kept = [l for l in path.read_text().splitlines() if l and json.loads(l)["step"] <= max_step]
  tmp = path.with_suffix(".tmp")
  tmp.write_text("".join(l + "\n" for l in kept))
  tmp.replace(path)


def _init_from(state: TrainState, source: str) -> TrainState:
  """Replaces parameters and BN statistics with those of a checkpoint or PyTorch file."""
  if source.endswith((".npz", ".pth", ".pt")):
    from scoat_jax.models import torch_weights
    variables = torch_weights.load(source)
  else:
    variables, _ = checkpoints.load_variables(source)
  def check(a, b):
    if np.shape(a) != np.shape(b):
      raise checkpoints.CheckpointError(
          f"config.init_from={source}: a parameter has shape {np.shape(b)}, the model "
          f"needs {np.shape(a)}; use weights of the same model, widths and classes.")
    return jax.device_put(jnp.asarray(b, a.dtype), a.sharding)
  try:
    params = jax.tree_util.tree_map(check, state.params, variables["params"])
    stats = jax.tree_util.tree_map(check, state.batch_stats, variables["batch_stats"])
  except ValueError as e:
    if isinstance(e, checkpoints.CheckpointError):
      raise
    raise checkpoints.CheckpointError(
        f"config.init_from={source}: its parameter tree differs from the model's "
        f"({str(e).splitlines()[0]}); use weights of the same model.") from None
  return state.replace(params=params, batch_stats=stats)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       overwrite: bool = False) -> dict:
  """Trains one fold, evaluating and checkpointing every epoch.

  Args:
    config: the experiment config (`scoat_jax/configs/default.py`).
    workdir: where checkpoints, metrics.jsonl and TensorBoard files go.
    overwrite: replace a different run already in `workdir`.

  Returns:
    The last evaluation's metrics (as written to metrics.jsonl).
  """
  workdir = pathlib.Path(workdir)
  checkpoints.check_workdir(workdir, config, overwrite=overwrite)
  is_lead = jax.process_index() == 0
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  spe = steps_per_epoch(config)
  total_steps = config.num_epochs * spe
  if config.max_steps > 0:
    total_steps = min(total_steps, config.max_steps)

  model = create_model(config)
  schedule = paper_schedule(
      steps_per_epoch=spe, learning_rate=config.learning_rate,
      restart_learning_rate=config.restart_learning_rate,
      decay_every_epochs=config.decay_every_epochs, decay_factor=config.decay_factor,
      restart_epoch=config.restart_epoch)
  rng = jax.random.key(config.seed)
  state = create_train_state(config, model, create_optimizer(schedule),
                             jax.random.fold_in(rng, 0), mesh)
  manager = checkpoints.make_manager(workdir)
  restored, _ = checkpoints.restore_latest(manager, state)
  metrics_path = workdir / "metrics.jsonl"
  if restored is not None:
    state = restored
    logging.info("Resuming from step %d (checkpoint in %s).", int(state.step), manager.directory)
    if is_lead:
      _truncate_jsonl(metrics_path, int(state.step))
  elif config.init_from:
    state = _init_from(state, config.init_from)
    logging.info("Initialised from %s.", config.init_from)
  start_step = int(jax.device_get(state.step))

  p_train_step = make_train_step(config, mesh)
  local_mesh = parallel.make_mesh(jax.local_devices())
  predict_fn = evaluation.make_predict_fn(
      model.apply, num_classes=config.num_classes,
      average_heads=config.predict_average_heads, mesh=local_mesh)
  eval_batch = max(len(jax.local_devices()),
                   config.eval_batch_size // len(jax.local_devices()) * len(jax.local_devices()))
  case_ids = input_pipeline.eval_case_ids(config.data)
  writer = None
  if is_lead:
    from tensorboardX import SummaryWriter
    writer = SummaryWriter(str(workdir / "tensorboard"))
  meta = {"config": checkpoints.config_to_dict(config)}

  batches = input_pipeline.train_batches(
      config.data, global_batch_size=config.batch_size, seed=config.seed, start_step=start_step)
  pending: list[tuple[int, jax.Array]] = []
  epoch_losses: list[float] = []
  last: dict = {}
  t_start, steps_done = time.time(), 0

  def check_losses():
    for s, loss in pending:
      value = float(jax.device_get(loss))
      if not np.isfinite(value):
        raise NonFiniteLossError(
            f"training loss is {value} at step {s}; stopped. The last good checkpoint "
            f"is in {manager.directory} (step {manager.latest_step()}). Lower "
            f"config.learning_rate or check the data.")
      epoch_losses.append(value)
    pending.clear()

  with _Interrupt() as interrupt:
    for step in range(start_step, total_steps):
      batch = parallel.global_batch(next(batches), mesh)
      state, step_metrics = p_train_step(state, batch, jax.random.fold_in(rng, step + 1))
      pending.append((step, step_metrics["loss"]))
      steps_done += 1
      done = step + 1
      if done % config.log_every_steps == 0 or done == total_steps:
        check_losses()
        rate = steps_done / (time.time() - t_start)
        logging.info("step %d/%d  loss %.4f  lr %.2e  %.2f steps/s  ETA %s", done, total_steps,
                     epoch_losses[-1], float(schedule(step)), rate,
                     time.strftime("%H:%M:%S", time.gmtime((total_steps - done) / max(rate, 1e-9))))
        if writer is not None:
          writer.add_scalar("train/loss", epoch_losses[-1], done)
          writer.add_scalar("train/learning_rate", float(schedule(step)), done)
      if interrupt.signal is not None:
        check_losses()
        checkpoints.save(manager, state, meta=meta | {"step": done, "interrupted": True})
        logging.warning("Signal %d: saved step %d to %s; exiting.", interrupt.signal, done,
                        manager.directory)
        raise KeyboardInterrupt(f"stopped by signal {interrupt.signal} at step {done}")
      end_of_epoch = done % spe == 0
      if (end_of_epoch and (done // spe) % config.eval_every_epochs == 0) or done == total_steps:
        check_losses()
        epoch = done / spe
        aggregate, per_case, overlays = evaluation.evaluate(
            predict_fn, evaluation.local_variables({"params": state.params,
                                                    "batch_stats": state.batch_stats}),
            input_pipeline.eval_batches(config.data, batch_size=eval_batch), case_ids,
            num_overlays=config.num_overlays if is_lead else 0)
        last = {"step": done, "epoch": epoch, "learning_rate": float(schedule(step)),
                "train_loss": float(np.mean(epoch_losses)) if epoch_losses else float("nan"),
                **aggregate}
        epoch_losses.clear()
        logging.info("epoch %.2f  %s", epoch, "  ".join(
            f"{k} {v:.4f}" for k, v in last.items() if k.startswith("val_") and "_" not in k[4:]))
        if is_lead:
          _append_jsonl(metrics_path, last)
          for k, v in last.items():
            if k.startswith("val_") or k == "train_loss":
              writer.add_scalar(f"eval/{k}" if k.startswith("val_") else "train/epoch_loss", v, done)
          for i, (image, truth, pred) in enumerate(overlays):
            writer.add_image(f"overlay/{i}", evaluation.overlay_rgb(image, truth, pred), done,
                             dataformats="HWC")
          writer.flush()
        checkpoints.save(manager, state, meta=meta | {"step": done, "epoch": epoch,
                                                      "per_case": per_case},
                         metrics={checkpoints.BEST_METRIC: last.get("val_dsc", 0.0)})
  if writer is not None:
    writer.close()
  return last


def evaluate_checkpoint(config: ml_collections.ConfigDict, checkpoint: str,
                        split: str = "validation") -> tuple[dict, list[dict]]:
  """Scores a saved model on a split of the configured fold (`--mode=eval`)."""
  variables, _ = checkpoints.load_variables(checkpoint)
  model = create_model(config)
  local_mesh = parallel.make_mesh(jax.local_devices())
  predict_fn = evaluation.make_predict_fn(
      model.apply, num_classes=config.num_classes,
      average_heads=config.predict_average_heads, mesh=local_mesh)
  n = len(jax.local_devices())
  aggregate, per_case, _ = evaluation.evaluate(
      predict_fn, variables,
      input_pipeline.eval_batches(config.data, split=split,
                                  batch_size=max(n, config.eval_batch_size // n * n)),
      input_pipeline.eval_case_ids(config.data, split=split))
  return aggregate, per_case
