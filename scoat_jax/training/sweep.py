r"""A table of the paper as runs: every row (network or loss) x fold, in sequence.

    python -m scoat_jax.sweep --flagfile=launch/table2.cfg --folds=0-4 --root=runs/table2
    python -m scoat_jax.sweep --flagfile=launch/table2.cfg --folds=0-4 --root=runs/table2 \
        --emit=slurm > table2.sbatch    # or --emit=commands: one command per line

A row is a config argument (`scoat_jax/configs/default.py:ROW`): a network of
Tables II-III (`unet`, `pspnet`, ...) or a loss of Table I (`focal`, ...),
or both (`unet+focal`). Run (row, fold) trains in `<root>/<row>/fold<k>`
with `python -m scoat_jax.main`, given the sweep's `--config` file and every
`--config.<field>=` override, then `--config.data.fold=k`.

A run is finished when its newest checkpoint is at the run's last step (the
checkpoint meta stores both); finished runs are skipped, an interrupted one
resumes from its checkpoint (main's own resume), a run that failed stops the
sweep with its exit status. `report_command` gives the report of the table
with its rows in the table's order.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence

_ROW = re.compile(r"^[A-Za-z0-9_]+(\+[A-Za-z0-9_]+)*$")


class SweepError(ValueError):
  """A sweep request that cannot run; the message names the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One (row, fold) of a table."""
  row: str
  fold: int
  workdir: pathlib.Path
  argv: tuple[str, ...]  # the training command, python first

  def shell(self) -> str:
    return " ".join(shlex.quote(a) for a in self.argv)


def parse_folds(spec: str) -> list[int]:
  """'0-4' -> [0, 1, 2, 3, 4]; '0,2' -> [0, 2]; ranges and lists mix ('0-1,3')."""
  folds: list[int] = []
  for part in filter(None, (p.strip() for p in str(spec).split(","))):
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
    if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
      raise SweepError(f"--folds={spec}: {part!r} is not a fold or a range; write e.g. "
                       "--folds=0-4 or --folds=0,2.")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    folds += [f for f in range(lo, hi + 1) if f not in folds]
  if not folds:
    raise SweepError(f"--folds={spec!r}: names no fold; write e.g. --folds=0-4.")
  return folds


def plan(*, config_file: str, overrides: Sequence[str], rows: Sequence[str],
         folds: Sequence[int], num_folds: int, root: str | pathlib.Path,
         python: str = sys.executable) -> list[Run]:
  """The runs of a table, row by row, fold by fold.

  Args:
    config_file: the sweep's `--config` value (`FILE` or `FILE:ARG`).
    overrides: `--config.<field>=<value>` arguments given to every run.
    rows: config arguments, one per row (networks and/or losses).
    folds: the folds to run.
    num_folds: the config's `data.num_folds` (folds must be below it).
    root: runs go to `<root>/<row>/fold<k>`.
    python: the interpreter the commands name.

  Raises:
    SweepError: no rows, a repeated or malformed row, a fold out of range.
  """
  if not rows:
    raise SweepError("--rows is empty; list the table's networks or losses, e.g. "
                     "--rows=scoat_net,unet (launch/table2.cfg has Table II's).")
  if len(set(rows)) != len(rows):
    raise SweepError(f"--rows={','.join(rows)} names a row twice; give each once.")
  from scoat_jax.configs import default  # pylint: disable=import-outside-toplevel
  for row in rows:
    if not _ROW.match(row):
      raise SweepError(f"--rows: {row!r} is not a network or loss name; names look like "
                       "unet or unet+focal.")
    try:
      default.parse_arg(row.replace("+", ","))
    except ValueError as e:
      raise SweepError(f"--rows: {e}.") from None
  bad = [f for f in folds if f >= num_folds]
  if bad:
    raise SweepError(f"--folds: fold {bad[0]} does not exist with config.data.num_folds="
                     f"{num_folds} (folds 0..{num_folds - 1}).")
  file, _, base_arg = config_file.partition(":")
  root = pathlib.Path(root)
  runs = []
  for row in rows:
    arg = ",".join(filter(None, [base_arg, row.replace("+", ",")]))
    for fold in folds:
      workdir = root / row / f"fold{fold}"
      argv = (python, "-m", "scoat_jax.main", f"--config={file}:{arg}", *overrides,
              f"--config.data.fold={fold}", f"--workdir={workdir}")
      runs.append(Run(row, fold, workdir, argv))
  return runs


def is_finished(workdir: pathlib.Path) -> bool:
  """Whether the run's newest checkpoint is at its last step (read from the checkpoint meta)."""
  directory = pathlib.Path(workdir) / "checkpoints"
  steps = sorted((int(p.name) for p in directory.glob("*") if p.name.isdigit()), reverse=True)
  for step in steps:
    meta_file = directory / str(step) / "meta" / "metadata"
    try:
      meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
      continue  # an unfinished or damaged save: training falls back past it too
    total = meta.get("total_steps")
    return total is not None and int(meta.get("step", step)) >= int(total)
  return False


def report_command(rows: Sequence[str], root: str | pathlib.Path) -> str:
  """The report command for a table, its rows in the table's order."""
  patterns = ",".join(str(pathlib.Path(root) / row / "fold*") for row in rows)
  return (f"python -m scoat_jax.report --workdirs={shlex.quote(patterns)} "
          f"--output={shlex.quote(str(pathlib.Path(root) / 'report'))}")


def commands(runs: Sequence[Run]) -> str:
  """One shell command per line, for any scheduler."""
  return "".join(r.shell() + "\n" for r in runs)


def slurm_script(runs: Sequence[Run], *, name: str, options: Sequence[str] = ()) -> str:
  """A Slurm array script: task i runs line i of the table's commands.

  Args:
    runs: the runs, in array order.
    name: the job name.
    options: extra `#SBATCH` options, e.g. '--gres=gpu:1', '--time=12:00:00'.
  """
  lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --array=0-{len(runs) - 1}",
           "#SBATCH --output=%x_%a.out"]
  lines += [f"#SBATCH {o}" for o in options]
  lines += ["set -euo pipefail", "RUNS=("]
  lines += [f"  {shlex.quote(r.shell())}" for r in runs]
  lines += [")", 'eval "${RUNS[$SLURM_ARRAY_TASK_ID]}"']
  return "\n".join(lines) + "\n"


def execute(runs: Sequence[Run], *, log=print) -> dict[str, int]:
  """Runs the table in sequence, skipping finished runs.

  Returns:
    {'ran': n, 'skipped': m}.

  Raises:
    subprocess.CalledProcessError: a run failed (its status; later runs are not started).
    KeyboardInterrupt: the sweep was interrupted (the run in progress saved its state).
  """
  ran = skipped = 0
  for k, run in enumerate(runs, start=1):
    if is_finished(run.workdir):
      log(f"[{k}/{len(runs)}] {run.row} fold {run.fold}: finished, skipped ({run.workdir})")
      skipped += 1
      continue
    resumed = (run.workdir / "checkpoints").is_dir()
    log(f"[{k}/{len(runs)}] {run.row} fold {run.fold}: {'resuming' if resumed else 'training'} "
        f"in {run.workdir}")
    status = subprocess.call(list(run.argv))
    if status == 130:
      raise KeyboardInterrupt(f"{run.row} fold {run.fold} interrupted; run the sweep again to "
                              "resume it")
    if status != 0:
      raise subprocess.CalledProcessError(status, run.shell())
    ran += 1
  return {"ran": ran, "skipped": skipped}
