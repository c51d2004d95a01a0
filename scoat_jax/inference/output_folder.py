"""The output folder of a predict run: checked before anything is written, kept consistent after.

A folder holding an earlier run's results is refused unless `--overwrite`.
With it, the scans this run segments get all their files anew: the earlier
files of such a scan that this run does not write again (a probability map,
attention overlays, a DICOM SEG or key images written with other flags) are
removed once its new report is written, so every file of a scan comes from
one run. Scans of the earlier run that this run does not segment keep their
files, and their rows stay in `predictions.csv` (rebuilt from their
reports): the table lists every scan whose report the folder holds.

An output folder inside the input (or equal to it) is refused: the results
would become inputs of the next run (a DICOM folder would hold two series).
Temporary files that a killed run left behind (`fileio.atomic_write`'s
`.<name>.tmp-<8 hex digits><suffix>` of a predict output) are removed when
the next run starts writing.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Sequence

from scoat_jax.data import writers
from scoat_jax.inference import cohort_table

_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.tmp-[0-9a-f]{8}(?P<suffix>.*)$")
_REPORT = "_report.json"


class PredictError(ValueError):
  """A bad prediction request (input, output folder, flags); one line naming the fix."""


def earlier_results(output: pathlib.Path) -> list[pathlib.Path]:
  """Files in `output` that a predict run wrote before."""
  if not output.is_dir():
    return []
  return sorted(p for p in output.iterdir() if p.is_file() and (
      writers.is_output(p.name) or p.name == cohort_table.FILE_NAME))


def _is_within(inner: pathlib.Path, outer: pathlib.Path) -> bool:
  inner, outer = pathlib.Path(os.path.realpath(inner)), pathlib.Path(os.path.realpath(outer))
  return inner == outer or outer in inner.parents


def _check_not_inside(output: pathlib.Path, input_path: str | None, items: Sequence) -> None:
  folders = [pathlib.Path(input_path).expanduser()] if input_path else []
  folders += [i.path for i in items]
  for folder in folders:
    if folder.is_dir() and _is_within(output, folder):
      raise PredictError(f"--output={output} lies inside --input={folder}: the results would "
                         "join the input (a DICOM folder would hold two series); choose an "
                         "output folder outside the input.")


def _earlier_reports(output: pathlib.Path) -> dict[str, dict]:
  """{scan name: report} of the reports an earlier run left in `output`."""
  out = {}
  for path in sorted(output.glob(f"*{_REPORT}")) if output.is_dir() else []:
    try:
      report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
      report = None
    if not isinstance(report, dict):
      raise PredictError(f"--output={output}: {path.name} is not a report predict can read, so "
                         "its row of predictions.csv cannot be kept; move it away or choose a "
                         "new folder.")
    name = path.name[:-len(_REPORT)]
    out[name] = {**report, "name": report.get("name", name)}
  return out


def check(output: pathlib.Path, *, overwrite: bool, input_path: str | None = None,
          items: Sequence = ()) -> dict[str, dict]:
  """Raises PredictError if `output` cannot take this run's results.

  Args:
    output: the results folder (it need not exist).
    overwrite: whether earlier results may be replaced.
    input_path: what `--input` names; the output may not lie inside it.
    items: the inputs (`readers.Item`); nor inside a DICOM series folder of them.

  Returns:
    {scan name: report} of the earlier run's reports in `output` (with
    `overwrite`), whose rows `predictions.csv` keeps unless this run
    segments those scans again.
  """
  if output.exists() and not output.is_dir():
    raise PredictError(f"--output={output}: is a file; give a folder (it is created if missing).")
  _check_not_inside(output, input_path, items)
  if not overwrite:
    old = earlier_results(output)
    if old:
      raise PredictError(f"--output={output}: holds earlier results ({old[0].name}"
                         f"{f' and {len(old) - 1} more' if len(old) > 1 else ''}); choose a new "
                         "folder or pass --overwrite.")
  parent = output
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir():
    raise PredictError(f"--output={output}: {parent} is a file, not a folder; choose an output "
                       "folder whose parents are folders.")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise PredictError(f"--output={output}: {parent} is not writable; choose another folder.")
  return _earlier_reports(output) if overwrite else {}


def scan_files(output: pathlib.Path, name: str) -> list[pathlib.Path]:
  """The files in `output` that predict writes for the scan `name`."""
  own = re.compile("^" + re.escape(name) + writers.OUTPUT_NAME.pattern)
  return sorted(p for p in output.iterdir() if p.is_file() and own.match(p.name))


def remove_stale(output: pathlib.Path, name: str, written: Sequence[str]) -> list[str]:
  """Removes the files of scan `name` that this run did not write; returns their names."""
  keep = set(written)
  stale = [p for p in scan_files(output, name) if p.name not in keep]
  for p in stale:
    p.unlink(missing_ok=True)
  return [p.name for p in stale]


def remove_temporaries(output: pathlib.Path) -> list[str]:
  """Removes the temporary files of predict outputs that a killed run left; returns their names."""
  removed = []
  for p in sorted(output.iterdir()) if output.is_dir() else []:
    m = _TEMPORARY.match(p.name)
    if not m or not p.is_file() or p.is_symlink():
      continue
    target = m["target"]
    suffix = ".nii.gz" if target.endswith(".nii.gz") else pathlib.Path(target).suffix
    if m["suffix"] == suffix and (writers.is_output(target) or target == cohort_table.FILE_NAME):
      p.unlink(missing_ok=True)
      removed.append(p.name)
  return removed


def table_reports(this_run: Sequence[dict], earlier: dict[str, dict]) -> list[dict]:
  """The reports predictions.csv lists: this run's, then the earlier run's other scans'."""
  done = {r["name"] for r in this_run}
  return list(this_run) + [r for n, r in earlier.items() if n not in done]
