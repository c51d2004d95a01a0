"""What a network costs: trainable parameters, GFLOPs and forward time per slice.

The paper's tables give accuracy only; these columns say what each row pays
for it. All three are measured on the network a run's config builds (so a
run with tiny widths reports its tiny network), in inference mode with one
head (the prediction path), for one 1-channel slice:

* parameters: the trainable scalars (`count_params`; BN running statistics
  excluded);
* GFLOPs: XLA's count of floating-point operations of the compiled forward
  pass of one 512x512 slice (`cost_analysis`; a multiply-add counts 2);
* forward ms: the median wall time of that forward pass over `repeats` runs
  after one warm-up, on the machine that makes the report (name it with the
  number: it is this machine's, not the network's).
"""
from __future__ import annotations

import functools
import os
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from scoat_jax import models

SLICE = 512


def _merge(base: dict, stored: dict) -> dict:
  out = dict(base)
  for key, value in stored.items():
    out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(
        out.get(key), dict) else value
  return out


def _model(config: dict[str, Any]):
  """The network of a stored config (fields it lacks take the defaults of its schema)."""
  from scoat_jax import configs  # pylint: disable=import-outside-toplevel
  from scoat_jax.configs import default  # pylint: disable=import-outside-toplevel
  stored = configs.upgrade(dict(config))
  config = ml_collections.ConfigDict(_merge(default.get_config().to_dict(), stored))
  config.deep_supervision = "none"  # the prediction path: one head
  return models.create_model(config)


def cpu_model() -> str:
  """The CPU's model name ('AMD EPYC', 'Intel(R) Xeon(R) ...'), from /proc/cpuinfo where
  there is one. XLA compiles its CPU code for the processor, so timings, and a trained
  model's last digits, belong to it."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or "CPU"


def machine() -> str:
  """A short description of where the timings were taken (backend, device, CPU count)."""
  device = jax.devices()[0]
  kind = cpu_model() if device.platform == "cpu" else device.device_kind
  return f"{device.platform}: {kind}, {os.cpu_count()} CPU cores"


def measure(config: dict[str, Any], *, size: int = SLICE, repeats: int = 3,
            timing: bool = True) -> dict[str, float | None]:
  """{'params', 'gflops', 'forward_ms'} of the network `config` describes.

  Args:
    config: a run's config as a dict (config.json).
    size: slice side for GFLOPs and timing.
    repeats: timed forward passes (median reported).
    timing: False skips the forward timing ('forward_ms' None).
  """
  model = _model(config)
  x = jnp.zeros((1, size, size, 1), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  params = models.count_params(variables["params"])
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  lowered = forward.lower(variables, x)
  compiled = lowered.compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per computation
    analysis = analysis[0] if analysis else {}
  flops = float((analysis or {}).get("flops", float("nan")))
  out = {"params": params, "gflops": flops / 1e9, "forward_ms": None}
  if timing:
    # Zero weights cost the same dense arithmetic as trained ones and need no init pass.
    real = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), variables)
    jax.block_until_ready(compiled(real, x))
    times = []
    for _ in range(max(1, repeats)):
      start = time.perf_counter()
      jax.block_until_ready(compiled(real, x))
      times.append(time.perf_counter() - start)
    out["forward_ms"] = 1000.0 * float(np.median(times))
  return out
