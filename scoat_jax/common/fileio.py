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
  """
  path = pathlib.Path(path)
  while True:
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}{_suffix(path)}"
    try:
      os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
      break
    except FileExistsError:
      continue
  try:
    write(str(tmp))
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
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
