"""What one optimizer step is: the train state, loss, optimizer and the jitted step.

The state is replicated and the batch sharded over `Mesh(devices, ('data',))`;
BatchNorm statistics are taken over the whole global batch (the means over
the sharded batch axis become cross-device reductions under jit), so N
devices compute what one would.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from scoat_jax import checkpoints, models
from scoat_jax.common import parallel
from scoat_jax.training import losses, unlabelled

# Initialisation runs once; XLA's CPU backend spends most of its compile time
# optimising the ~100 random-number kernels (about 60 s for SCOAT-Net), and
# without optimisation it compiles 3x faster and still runs in milliseconds.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


class TrainState(train_state.TrainState):
  batch_stats: Any


def create_loss(config: ml_collections.ConfigDict) -> Callable:
  """`config.loss` with `config.loss_kwargs`, applied to the heads as `config.deep_supervision` says."""
  base = losses.get_loss(config.loss, **config.loss_kwargs)
  mode = models.deep_supervision_mode(config)
  return functools.partial(losses.deep_supervision_loss, base, mode=mode)


def create_batch_loss(config: ml_collections.ConfigDict) -> Callable:
  """(logits, batch) -> scalar loss: `create_loss` on the mask, plus, with
  `config.unlabelled`, `weight` x soft BCE-Dice on the unlabelled slots.

  The slots are the same at every step (`unlabelled.pseudo_slots`), so each
  part is taken by a fixed gather of the batch rows it owns.
  """
  supervised = create_loss(config)
  cfg = config.get("unlabelled")
  if not unlabelled.enabled(cfg):
    return lambda logits, batch: supervised(logits, batch["mask"])
  pseudo = unlabelled.pseudo_slots(config.batch_size, float(cfg.ratio))
  lab_rows, soft_rows = np.flatnonzero(~pseudo), np.flatnonzero(pseudo)
  alpha = float(dict(config.loss_kwargs).get("alpha", 0.5))
  soft = functools.partial(losses.soft_bce_dice, alpha=alpha,
                           min_confidence=float(cfg.get("min_confidence", 0.0)),
                           hard=bool(cfg.get("hard", False)))
  soft_loss = functools.partial(losses.deep_supervision_loss, soft,
                                mode=models.deep_supervision_mode(config))
  weight = float(cfg.get("weight", 1.0))

  def rows(logits, idx):
    return [h[idx] for h in logits] if isinstance(logits, (list, tuple)) else logits[idx]

  def loss(logits, batch):
    total = weight * soft_loss(rows(logits, soft_rows), batch["soft"][soft_rows])
    if lab_rows.size:  # ratio 1: soft labels only
      total = total + supervised(rows(logits, lab_rows), batch["mask"][lab_rows])
    return total
  return loss


def create_optimizer(schedule: optax.Schedule) -> optax.GradientTransformation:
  """Adam (PyTorch's defaults: b1 0.9, b2 0.999, eps 1e-8) with the schedule inside."""
  return optax.adam(schedule)


def create_train_state(config, model, tx, rng, mesh) -> TrainState:
  """Initialises the replicated train state (parameters, BN statistics, optimizer)."""
  size = config.data.image_size

  def init(rng):
    # One slice, one channel: what the input pipeline feeds.
    variables = model.init(rng, jnp.zeros((1, size, size, 1)), train=False)
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables["batch_stats"])
  return jax.jit(init, out_shardings=parallel.replicated(mesh),
                 compiler_options=INIT_COMPILER_OPTIONS)(rng)


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, loss_fn: Callable,
               with_grads: bool = False):
  """One optimizer step on a (global) batch; returns (new_state, metrics).

  BatchNorm statistics are taken over the whole global batch: under jit the
  means over the sharded batch axis become cross-device reductions, so N
  devices compute exactly what one device would.
  """
  def compute_loss(params):
    # `rng` feeds the dropout of the networks that have it (FCN, PSPNet, DeepLabV3).
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"],
        train=True, mutable=["batch_stats"], rngs={"dropout": rng})
    return loss_fn(logits, batch), updates

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
  return jax.jit(functools.partial(train_step, loss_fn=create_batch_loss(config),
                                   with_grads=with_grads),
                 in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                 donate_argnums=(0,))


INIT_HEADS = ("same", "new", "expand")


def _class_head(path) -> str:
  """'kernel' or 'bias' where a parameter path ends in one, else ''."""
  name = getattr(path[-1], "key", "") if path else ""
  return name if name in ("kernel", "bias") else ""


def check_init_head(config: ml_collections.ConfigDict) -> str:
  """`config.init_head`, refused unless one of INIT_HEADS (new and expand need init_from)."""
  head = config.get("init_head", "same")
  if head not in INIT_HEADS or (head != "same" and not config.init_from):
    raise checkpoints.CheckpointError(
        f"config.init_head={head!r}: choose one of {', '.join(INIT_HEADS)}; "
        "new and expand need config.init_from (the weights to load).")
  return head


def init_from(state: TrainState, config: ml_collections.ConfigDict) -> TrainState:
  """Replaces parameters and BN statistics with those of `config.init_from`.

  `config.init_head` says what happens to a classifier whose output channels
  differ from the model's `num_classes` (a 1-class model under a 3-class one):
  'same' refuses it (the default: every shape must match), 'new' keeps that
  classifier's fresh initialisation, and 'expand' turns a 1-class sigmoid head
  into a K-class softmax one whose P(not class 0) equals the 1-class model's
  sigmoid at the first step: class 0 (background) gets zero weights and bias,
  every other class the 1-class weights and its bias minus log(K - 1).
  Every other parameter must match in shape.
  """
  source = config.init_from
  head = check_init_head(config)
  if source.endswith((".npz", ".pth", ".pt")):
    variables = models.load_torch_weights(config.model_name, source)
  else:
    try:
      variables, _ = checkpoints.load_variables(source)
    except checkpoints.CheckpointError as e:
      raise checkpoints.CheckpointError(f"config.init_from={source}: {e}") from None
  classes = int(config.num_classes)
  changed = []

  def convert(path, a, b):
    a_shape, b_shape = np.shape(a), np.shape(b)
    if a_shape != b_shape:
      b = _new_head(path, a, b, head, classes, source)
      changed.append(jax.tree_util.keystr(path))
    return jax.device_put(jnp.asarray(b, a.dtype), a.sharding)

  try:
    params = jax.tree_util.tree_map_with_path(convert, state.params, variables["params"])
    stats = jax.tree_util.tree_map_with_path(convert, state.batch_stats,
                                             variables["batch_stats"])
  except ValueError as e:
    if isinstance(e, checkpoints.CheckpointError):
      raise
    raise checkpoints.CheckpointError(
        f"config.init_from={source}: its parameter tree differs from the model's "
        f"({str(e).splitlines()[0]}); use weights of the same model.") from None
  if changed:
    logging.info("init_head=%s: %s", head, ", ".join(changed))
  return state.replace(params=params, batch_stats=stats)


def _new_head(path, a, b, head: str, classes: int, source: str):
  """The value of a classifier leaf whose class count differs (see `init_from`)."""
  a_shape, b_shape = np.shape(a), np.shape(b)
  kind = _class_head(path)
  is_head = (kind and len(a_shape) == len(b_shape) and a_shape[:-1] == b_shape[:-1]
             and a_shape[-1] == classes)
  if head == "same" or not is_head:
    hint = ("; a classifier of another class count loads with config.init_head=new or "
            "expand" if is_head else "; use weights of the same model, widths and classes")
    raise checkpoints.CheckpointError(
        f"config.init_from={source}: {jax.tree_util.keystr(path)} has shape {b_shape}, "
        f"the model needs {a_shape}{hint}.")
  if head == "new":
    return np.asarray(a)
  if b_shape[-1] != 1 or classes < 2:
    raise checkpoints.CheckpointError(
        f"config.init_from={source}: init_head=expand turns a 1-class head into a "
        f"{classes}-class one, but {jax.tree_util.keystr(path)} has {b_shape[-1]} "
        "outputs; use init_head=new.")
  b = np.asarray(b, np.float32)
  shift = np.log(classes - 1) if kind == "bias" else 0.0
  return np.concatenate([np.zeros_like(b)] + [b - shift] * (classes - 1), axis=-1)
