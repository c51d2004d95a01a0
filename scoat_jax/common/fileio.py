"""Writing files so that nobody ever sees half of one.

Every file scoat_jax writes for a user (masks, reports, plots, CT volumes,
cohort tables) is written under a temporary name beside its target and
renamed into place: a crash or a full disk leaves either the old file or
nothing, never a truncated one. Temporary files and folders are created with
the usual permissions (0666 / 0777 less the umask), not the private 0600 /
0700 of `tempfile`, so the results are as readable as the user's other files.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import shutil
from collections.abc import Callable


class WriteError(OSError):
  """A file that could not be written; the message names it and says what to do."""


def _write_error(path: pathlib.Path, error: OSError) -> WriteError:
  reason = error.strerror or type(error).__name__
  fix = {28: "free disk space or write elsewhere", 13: "choose a folder you can write to",
         30: "choose a folder on a writable disk", 122: "free quota or write elsewhere"}.get(
             error.errno, "check the folder exists and can be written")
  return WriteError(error.errno, f"{path}: cannot write it ({reason}); {fix}.")


def _suffix(path: pathlib.Path) -> str:
  return ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> pathlib.Path:
  """Calls `write(tmp)` on a new file beside `path`, then renames it to `path`.

  Args:
    path: the final file.
    write: writes the content to the path it is given (the temporary name
      keeps `path`'s suffix, so writers that choose the format by suffix work).

  Returns:
    `path`.

  Raises:
    WriteError: the file could not be written (full disk, permissions, ...);
      the temporary file is removed and an earlier `path` is untouched.
  """
  path = pathlib.Path(path)
  while True:
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}{_suffix(path)}"
    try:
      os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
      break
    except FileExistsError:
      continue
    except OSError as e:
      raise _write_error(path, e) from None
  try:
    write(str(tmp))
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    if isinstance(e, OSError) and not isinstance(e, WriteError):
      raise _write_error(path, e) from None
    raise
  return path


def write_text(text: str, path: str | os.PathLike) -> pathlib.Path:
  """Writes UTF-8 text atomically."""
  return atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
  """Yields a fresh temporary folder beside `path`, renamed to `path` on success.

  On an exception the temporary folder is removed and `path` is untouched.
  `path` must not exist yet.
  """
  path = pathlib.Path(path)
  while True:
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
    try:
      tmp.mkdir(mode=0o777)
      break
    except FileExistsError:
      continue
  try:
    yield tmp
    os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
