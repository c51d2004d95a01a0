"""One writer for a run's metrics: `metrics.jsonl` and TensorBoard together.

Only the lead process (process 0) writes; on the others every call is a
no-op, so the loop needs no `if is_lead` of its own.
"""
from __future__ import annotations

import json
import pathlib

import jax
import numpy as np

from scoat_jax.common import fileio
from scoat_jax.evaluation import validation


class MetricsWriter:
  """Writes `<workdir>/metrics.jsonl` (one line per evaluation) and `<workdir>/tensorboard/`.

  Use as a context manager; `rewrite(step)` makes the file hold exactly one line
  per evaluation up to the step a run resumes from, so it never repeats one.
  """

  def __init__(self, workdir: str | pathlib.Path):
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / "metrics.jsonl"
    self.enabled = jax.process_index() == 0
    self._tb = None

  def __enter__(self):
    if self.enabled:
      from tensorboardX import SummaryWriter  # TensorBoard event files, no TensorFlow
      self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
    return self

  def __exit__(self, *exc):
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def rewrite(self, max_step: int, last: dict | None = None) -> None:
    """Keeps one record per step up to `max_step` (the step training resumes from).

    Lines past it were written by a run that stopped before its next checkpoint;
    a step written twice keeps its last line; `last` (the record saved with the
    checkpoint resumed from) is put back if the run stopped before writing it.
    """
    if not self.enabled or (not self.path.exists() and last is None):
      return
    records = {}
    lines = self.path.read_text().splitlines() if self.path.exists() else []
    for line in lines:
      try:
        record = json.loads(line)
      except ValueError:
        continue  # a line cut off by a kill
      if isinstance(record, dict) and record.get("step", max_step + 1) <= max_step:
        records[record["step"]] = record
    if last is not None and last.get("step", max_step + 1) <= max_step:
      records.setdefault(last["step"], last)
    fileio.write_text("".join(json.dumps(records[s]) + "\n" for s in sorted(records)), self.path)

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    """TensorBoard scalars, e.g. {'train/loss': 0.3}."""
    if self._tb is not None:
      for name, value in scalars.items():
        self._tb.add_scalar(name, value, step)

  def write_evaluation(self, record: dict, overlays=()) -> None:
    """One metrics.jsonl line, its scalars and the (image, truth, prediction) overlays."""
    if not self.enabled:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    step = record["step"]
    for k, v in record.items():
      if k.startswith("val_"):
        self._tb.add_scalar(f"eval/{k}", v, step)
      elif k == "train_loss":
        self._tb.add_scalar("train/epoch_loss", v, step)
    for i, (image, truth, pred) in enumerate(overlays):
      self._tb.add_image(f"overlay/{i}", validation.overlay_rgb(image, truth, pred), step,
                         dataformats="HWC")
    self._tb.flush()


def summary_line(record: dict) -> str:
  """'val_dsc 0.8123  val_sen ...' with the means only (no _std or _median)."""
  return "  ".join(f"{k} {v:.4f}" for k, v in record.items()
                   if k.startswith("val_") and "_" not in k[4:] and np.isscalar(v))
