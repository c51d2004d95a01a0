"""Model bundles: what inference needs of trained models, and nothing else.

    model/
      bundle.json          format and version, scoat_jax version, date, model, classes,
                           preprocessing, post-processing, and per member its
                           provenance (dataset, fold, step, validation metrics, source)
      fold0/config.json    the member's training config (the schema of `configs`)
      fold0/variables.npz  its parameters and batch statistics, keys `params/...` and
                           `batch_stats/...` (float32, exactly the checkpoint's values)
      fold1/ ...

No optimizer state, no training log: a bundle of SCOAT-Net is a tenth of its
training workdir. Arrays are stored losslessly, so a bundle predicts bit for
bit what the checkpoints it came from predict. `python -m scoat_jax.export`
writes one (`write`); every inference entry point reads one (`read`) through
`inference.loading`. A bundle of a newer `FORMAT_VERSION` than this version
reads is refused with the version to upgrade to; older ones are read as
they are (the config inside is upgraded by `configs.upgrade`).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
import re
import zipfile
import zlib
from collections.abc import Sequence

import numpy as np
from flax import traverse_util

from scoat_jax import configs
from scoat_jax.checkpoints import CheckpointError
from scoat_jax.common import fileio
from scoat_jax.inference import postprocessing

FORMAT = "scoat_jax model bundle"
FORMAT_VERSION = 1
INDEX = "bundle.json"


@dataclasses.dataclass(frozen=True)
class Member:
  """One model of a bundle, as read."""
  path: pathlib.Path
  config: dict
  variables: dict
  meta: dict


@dataclasses.dataclass(frozen=True)
class Bundle:
  """A bundle as read: its members, its post-processing rule and its index."""
  path: pathlib.Path
  members: list[Member]
  postprocessing: dict | None
  index: dict

  @property
  def version(self) -> str:
    """What tells two exports apart besides their weights: when and by what they were made."""
    return (f"{self.index.get('created', '?')} (scoat_jax "
            f"{self.index.get('scoat_jax_version', '?')})")


def is_bundle(path: str | pathlib.Path) -> bool:
  return (pathlib.Path(path) / INDEX).is_file()


def version() -> str:
  from importlib import metadata
  try:
    return metadata.version("scoat_jax")
  except metadata.PackageNotFoundError:
    return "unknown"


def member_name(fold, taken: set[str]) -> str:
  """'fold0', 'fold1', ..., 'all' for a model trained on every case; unique within a bundle."""
  base = "all" if fold is not None and int(fold) < 0 else (
      f"fold{int(fold)}" if fold is not None else "model")
  name, k = base, 1
  while name in taken:
    k += 1
    name = f"{base}_{k}"
  return name


def write(output: str | pathlib.Path, members: Sequence[dict], *, preprocessing: dict,
          postprocessing: dict | None, model_name: str, num_classes: int) -> pathlib.Path:
  """Writes a bundle folder (created whole, by renaming a finished temporary folder).

  Args:
    output: the bundle folder; must not exist.
    members: per model {'config': dict, 'variables': {'params', 'batch_stats'},
      'provenance': JSON-ready dict (dataset, fold, step, validation, source)}.
    preprocessing: {'intensity', 'hu_window', 'uint8_normalization', 'image_size',
      'export_window' (8-bit models: the window estimated from their exports, or None)}.
    postprocessing: the rule (`inference.postprocessing`), or None.
    model_name, num_classes: what every member is.

  Returns:
    The bundle folder.
  """
  output = pathlib.Path(output)
  taken: set[str] = set()
  index = {"format": FORMAT, "format_version": FORMAT_VERSION, "scoat_jax_version": version(),
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "model_name": model_name, "num_classes": int(num_classes),
           "preprocessing": preprocessing, "postprocessing": postprocessing, "members": []}
  with fileio.atomic_directory(output) as tmp:
    for m in members:
      name = member_name(m["provenance"].get("fold"), taken)
      taken.add(name)
      (tmp / name).mkdir()
      fileio.write_text(json.dumps(m["config"], indent=1, sort_keys=True) + "\n",
                        tmp / name / "config.json")
      flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(
          {k: m["variables"].get(k, {}) for k in ("params", "batch_stats")}, sep="/").items()}
      fileio.atomic_write(tmp / name / "variables.npz", lambda t, flat=flat: np.savez(t, **flat))
      index["members"].append({"path": name, **m["provenance"]})
    fileio.write_text(json.dumps(index, indent=1, allow_nan=False) + "\n", tmp / INDEX)
  return output


def _bad(path, what: str) -> CheckpointError:
  return CheckpointError(f"{path}: {what}; export the bundle again with "
                         "`python -m scoat_jax.export`.")


# A truncated, CRC-corrupt or empty variables.npz raises BadZipFile, EOFError
# or zlib.error (not OSError or ValueError); a config of the wrong shape
# TypeError, AttributeError or KeyError.
_MEMBER_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError,
                  zipfile.BadZipFile, zlib.error)


def _read_arrays(file: pathlib.Path) -> dict:
  with np.load(file, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def _read_member(file: pathlib.Path, read_fn):
  try:
    return read_fn(file)
  except _MEMBER_ERRORS as e:
    detail = str(e).splitlines()[0] if str(e) else "empty or cut short"
    raise _bad(file, f"cannot read the member's file ({type(e).__name__}: {detail})") from None


def read(path: str | pathlib.Path) -> Bundle:
  """Reads and checks a bundle (its members' arrays in memory as NumPy).

  Everything is checked here, before any model runs: the index's fields and
  their types, the post-processing rule (`postprocessing.check_rule`; the
  rule returned is the validated one), and each member's config and arrays
  (a truncated, corrupt or empty `variables.npz` included).

  Raises:
    CheckpointError: not a bundle, a newer format version, a bad index field
      or rule, a missing or damaged member; one line naming the file.
  """
  path = pathlib.Path(path).expanduser().absolute()
  try:
    index = json.loads((path / INDEX).read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise _bad(path, f"cannot read {INDEX} ({type(e).__name__})") from None
  if not isinstance(index, dict) or index.get("format") != FORMAT:
    raise _bad(path, f"{INDEX} is not a scoat_jax bundle index")
  got = index.get("format_version")
  if not isinstance(got, int) or got < 1:
    raise _bad(path, f"{INDEX} has no valid format_version ({got!r})")
  if got > FORMAT_VERSION:
    raise CheckpointError(
        f"{path}: a bundle of format version {got}, written by scoat_jax "
        f"{index.get('scoat_jax_version', '?')}; this scoat_jax ({version()}) reads up to "
        f"version {FORMAT_VERSION}: upgrade scoat_jax (pip install -U scoat_jax).")
  entries = index.get("members")
  if not isinstance(entries, list) or not entries:
    raise _bad(path, f"{INDEX} lists no member")
  preprocessing = index.setdefault("preprocessing", {})
  if not isinstance(preprocessing, dict):
    raise _bad(path / INDEX, f"'preprocessing' is {type(preprocessing).__name__} "
                             f"{preprocessing!r}, not an object of intensity, hu_window, ...")
  try:
    rule = postprocessing.check_rule(index.get("postprocessing"))
  except postprocessing.PostprocessingError as e:
    raise CheckpointError(f"{path / INDEX}: {e}") from None
  members = []
  for entry in entries:
    name = str(entry.get("path", "")) if isinstance(entry, dict) else ""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
      raise _bad(path, f"{INDEX} names a member folder {name!r} that is not a plain name")
    folder = path / name
    config = _read_member(folder / "config.json", lambda f: configs.upgrade(
        json.loads(f.read_text(encoding="utf-8"))))
    if not isinstance(config, dict):
      raise _bad(folder / "config.json", f"holds {type(config).__name__}, not a config")
    flat = _read_member(folder / "variables.npz", _read_arrays)
    classes = index.get("num_classes")
    if classes is not None and classes != config.get("num_classes"):
      raise _bad(folder, f"config.json says num_classes={config.get('num_classes')!r} but "
                         f"{INDEX} says {classes!r}")
    variables = traverse_util.unflatten_dict(flat, sep="/")
    variables.setdefault("batch_stats", {})
    meta = {k: v for k, v in entry.items() if k != "path"}
    meta.setdefault("intensity", index.get("preprocessing", {}).get("intensity", "hu"))
    if index.get("preprocessing", {}).get("export_window"):
      meta.setdefault("export_window", index["preprocessing"]["export_window"])
    members.append(Member(folder, config, variables, meta))
  return Bundle(path, members, rule, index)
