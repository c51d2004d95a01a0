"""Checks that loaded weights can give numbers at all, and their content hash.

Weights of the right shapes can still be broken: a diverged run saves NaN
parameters, a damaged or hand-edited file can hold infinite values or a
negative BatchNorm variance. Such a model predicts no opacity anywhere (NaN
probabilities are below every threshold) and its report would read "LOV 0 mL,
POI 0 %" without a word. `check_values` refuses them when the model is
loaded, before any scan is segmented:

* every parameter and batch statistic finite;
* every BatchNorm running variance (`batch_stats/.../var`) >= 0;
* the network's outputs finite on a probe input (a smooth ramp over one slice
  of `PROBE_SIZE` pixels, or the model's own size if smaller): weights that
  are finite but overflow (e.g. 1e30) are caught there.

`weights_sha256` is the content hash of a model's variables (names, dtypes,
shapes and bytes), reported as the model's identity in `predictions.csv`.
"""
from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from scoat_jax.checkpoints import CheckpointError

PROBE_SIZE = 64
_FIX = ("the weights are broken (a diverged run, a damaged or edited file): pass another "
        "checkpoint (e.g. an earlier step of the run) or export the bundle again from one.")


def _flat(tree) -> list[tuple[str, np.ndarray]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return sorted((jax.tree_util.keystr(path, simple=True, separator="/"), np.asarray(leaf))
                for path, leaf in flat)


def _check_arrays(where, variables: dict) -> None:
  for part in ("params", "batch_stats"):
    for key, leaf in _flat(variables.get(part, {})):
      if leaf.dtype.kind not in "fiub":
        raise CheckpointError(f"{where}: {part} {key} has dtype {leaf.dtype}, not a number; "
                              + _FIX)
      bad = ~np.isfinite(leaf) if leaf.dtype.kind == "f" else np.zeros(leaf.shape, bool)
      if bad.any():
        raise CheckpointError(f"{where}: {part} {key} holds {int(bad.sum())} NaN or infinite "
                              f"value(s) of {leaf.size}; " + _FIX)
      if part == "batch_stats" and key.rpartition("/")[2] == "var" and (leaf < 0).any():
        raise CheckpointError(f"{where}: batch_stats {key} holds {int((leaf < 0).sum())} "
                              f"negative variance(s) (min {float(leaf.min()):g}), which no "
                              "batch can give; " + _FIX)


def probe_input(size: int) -> np.ndarray:
  """(1, size, size, 1) float32: a diagonal ramp from 0 to 1, as a normalised slice."""
  ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
  return ((ramp[:, None] + ramp[None, :]) / 2)[None, :, :, None]


@functools.lru_cache(maxsize=16)
def _probe_fn(model):
  """Jitted `(variables, x) -> whether every output is finite` (one compile per network)."""
  def finite(variables, x):
    leaves = jax.tree_util.tree_leaves(model.apply(variables, x, train=False))
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))
  return jax.jit(finite)


def probe_size(model, image_size: int) -> int:
  multiple = int(type(model).input_multiple)
  return min(int(image_size), -(-PROBE_SIZE // multiple) * multiple)


def check_values(where, model, variables: dict, image_size: int) -> None:
  """Raises CheckpointError naming `where` unless the weights are finite and usable.

  Args:
    where: the checkpoint, bundle member or file the weights came from.
    model: the linen module (its shapes already checked against `variables`).
    variables: {'params', 'batch_stats'}.
    image_size: the model's input size (the probe is at most this big).
  """
  _check_arrays(where, variables)
  size = probe_size(model, image_size)
  parts = {k: variables[k] for k in ("params", "batch_stats") if variables.get(k)}
  if not bool(_probe_fn(model)(parts, probe_input(size))):
    raise CheckpointError(f"{where}: the network's outputs are not finite on a probe slice "
                          f"({size} x {size} px) although every weight is; " + _FIX)


def weights_sha256(variables: dict) -> str:
  """SHA-256 (hex) of the parameters and batch statistics: names, dtypes, shapes, bytes."""
  digest = hashlib.sha256()
  for part in ("params", "batch_stats"):
    for key, leaf in _flat(variables.get(part, {})):
      digest.update(f"{part}/{key}|{leaf.dtype.str}|{leaf.shape}\n".encode())
      digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()
