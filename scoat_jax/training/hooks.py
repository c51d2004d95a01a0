"""Small helpers that keep the training loop to its story: when to act, signals, losses."""
from __future__ import annotations

import signal
from collections.abc import Callable

import jax
import numpy as np


class Every:
  """True at every `period`-th step and at the last one (`every(step)`, steps counted from 1)."""

  def __init__(self, period: int, last_step: int):
    if period < 1:
      raise ValueError(f"a period of {period} steps must be >= 1")
    self.period, self.last_step = int(period), int(last_step)

  def __call__(self, step: int) -> bool:
    return step % self.period == 0 or step == self.last_step


class StopSignal:
  """Turns SIGINT/SIGTERM into a flag the loop checks after each step (`.signal`)."""

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


class LossMonitor:
  """Collects the step losses without waiting for them; `check()` fetches and vets them.

  The loop dispatches steps asynchronously; reading a loss blocks until its
  step is done, so losses are held as device arrays and read only when the
  loop logs, evaluates or stops.

  Args:
    on_non_finite: called with (step, value) for the first NaN or Inf loss;
      it raises.
  """

  def __init__(self, on_non_finite: Callable[[int, float], None]):
    self._pending: list[tuple[int, jax.Array]] = []
    self._epoch: list[float] = []
    self._on_non_finite = on_non_finite

  def add(self, step: int, loss: jax.Array) -> None:
    self._pending.append((step, loss))

  def check(self) -> None:
    for step, loss in self._pending:
      value = float(jax.device_get(loss))
      if not np.isfinite(value):
        self._on_non_finite(step, value)
      self._epoch.append(value)
    self._pending.clear()

  @property
  def last(self) -> float:
    """The latest checked loss."""
    return self._epoch[-1]

  def mean_and_reset(self) -> float:
    """The mean of the losses checked since the last call (NaN if none)."""
    mean = float(np.mean(self._epoch)) if self._epoch else float("nan")
    self._epoch.clear()
    return mean
