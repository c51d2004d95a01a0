"""Builds a scoat_jax slice dataset into data_dir.

  python -m scoat_jax.datasets.build covid_semiseg --manual_dir=DIR --data_dir=DIR
  python -m scoat_jax.datasets.build ct_volumes/medseg --slices=lung --manual_dir=DIR --data_dir=DIR
  python -m scoat_jax.datasets.build ct_phantom --patients=4 --timepoints=2 --data_dir=DIR

Options that pick a builder config (`--slices`, `--label_map`, `--patients`,
`--timepoints`, `--seed`, `--shape`) are folded into the config name, which the
command prints: read the dataset back under that name (`data.name`).

The input layout is checked before anything is written. The dataset is then
built in a hidden staging folder inside data_dir and moved into place only when
complete, so a failed or interrupted build leaves nothing behind and
`--overwrite` keeps the old copy until the new one is finished. A bad input
prints one line `error: ...` and exits with status 2 (`scoat_jax.common.cli`).
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import time
from typing import Any

import tensorflow_datasets as tfds
from absl import flags, logging

from scoat_jax import datasets
from scoat_jax.common import cli
from scoat_jax.datasets import base


@contextlib.contextmanager
def _quiet_tfds():
  """Hides what TFDS prints while it builds (its progress bars and the staging folder's
  name, which is not where the dataset ends up) unless --verbosity is 1 or more."""
  if logging.get_verbosity() >= 1:
    yield
    return
  from tensorflow_datasets.core.utils import tqdm_utils
  was = tqdm_utils._active  # pylint: disable=protected-access
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds.display_progress_bar(was)


def build(name: str, data_dir: str | None = None, manual_dir: str | None = None, *,
          overwrite: bool = False, **options: Any) -> str:
  """Builds one dataset (no-op when it is already built and overwrite is False).

  Args:
    name: 'covid_semiseg', 'ct_volumes[/config]' or 'ct_phantom[/config]'.
    data_dir: output root ('' or None: the TFDS default).
    manual_dir: input folder, for the builders that read one.
    overwrite: rebuild even if the dataset exists (the old copy is replaced
      only once the new one is complete).
    **options: builder options (None values are ignored), e.g. slices='lung'.

  Returns:
    The full name 'name/config' to read the dataset back with.

  Raises:
    DatasetError (or ct_io.CTError, both ValueError): any bad input.
  """
  base_name, _, config = name.partition("/")
  if base_name not in datasets.BUILDERS:
    raise base.DatasetError(f"unknown dataset {base_name!r}; choose one of {sorted(datasets.BUILDERS)}")
  cls = datasets.BUILDERS[base_name]
  options = {k: v for k, v in options.items() if v is not None}
  config = cls.config_for(config or None, options)
  if manual_dir is not None and not os.path.isdir(manual_dir):
    raise base.DatasetError(f"--manual_dir={manual_dir} is not a folder; pass the folder holding the "
                            f"input files ({cls.BUILD_HINT or 'this dataset needs none'})")
  if cls.BUILD_HINT and manual_dir is None:
    raise base.DatasetError(f"{base_name} needs {cls.BUILD_HINT}")
  if not cls.BUILD_HINT and manual_dir is not None:
    raise base.DatasetError(f"{base_name} is generated and reads no input; drop --manual_dir")
  if manual_dir is not None:
    cls.check_manual_dir(manual_dir)   # fail on a bad layout before anything is written
  try:
    builder = cls(data_dir=data_dir or None, config=config)
  except ValueError as e:
    raise base.DatasetError(f"unknown config {config!r} of {base_name} "
                            f"(configs: {', '.join(sorted(cls.builder_configs))}); fix NAME") from e
  full = f"{base_name}/{builder.builder_config.name}" if builder.builder_config else base_name
  if builder.is_prepared() and not overwrite:
    return full

  root = os.fspath(builder.data_dir_root)
  final = os.fspath(builder.data_path)             # root/name[/config]/version
  made_root = not os.path.exists(root)
  os.makedirs(root, exist_ok=True)
  # Build into a hidden staging root beside the target and move the finished
  # dataset into place: a failed or interrupted build leaves nothing, and an
  # existing copy is replaced only once its successor is complete (TFDS's own
  # overwrite deletes the old copy first).
  staging = tempfile.mkdtemp(prefix=".scoat_build_", dir=root)
  try:
    staged = cls(data_dir=staging, config=config)
    with _quiet_tfds():
      staged.download_and_prepare(
          download_dir=os.path.join(staging, "downloads"),
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    os.makedirs(os.path.dirname(final), exist_ok=True)
    config_marker = os.path.join(root, base_name, ".config")
    staged_marker = os.path.join(staging, base_name, ".config")
    if os.path.isdir(staged_marker) and not os.path.exists(config_marker):
      os.rename(staged_marker, config_marker)
    old = None
    if os.path.exists(final):
      old = tempfile.mkdtemp(prefix=".scoat_old_", dir=root)
      os.rename(final, os.path.join(old, "version"))
    try:
      os.rename(os.fspath(staged.data_path), final)
    except OSError:
      if old:
        os.rename(os.path.join(old, "version"), final)
      raise
    finally:
      if old:
        shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
    if made_root and not os.listdir(root):
      os.rmdir(root)
  return full


FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("data_dir", "", "Output root (default: the TFDS default, ~/tensorflow_datasets).")
  flags.DEFINE_string("manual_dir", None, "Input folder (covid_semiseg, ct_volumes).")
  flags.DEFINE_bool("overwrite", False, "Rebuild an existing dataset (the old copy is replaced "
                    "once the new one is complete).")
  flags.DEFINE_enum("slices", None, list(base.SLICE_FILTERS), "ct_volumes: keep all slices, those "
                    "with opacity, or those showing lung.")
  flags.DEFINE_string("label_map", None, "ct_volumes: default | ma2020 | medseg.")
  flags.DEFINE_integer("patients", None, "ct_phantom: number of patients.")
  flags.DEFINE_integer("timepoints", None, "ct_phantom: scans per patient.")
  flags.DEFINE_integer("seed", None, "ct_phantom: cohort seed.")
  flags.DEFINE_string("shape", None, "ct_phantom: scan shape ZxYxX, e.g. 16x64x64.")


def main(argv):
  names = " | ".join(f"{n}[/config]" for n in sorted(datasets.BUILDERS))
  if len(argv) != 2:
    cli.fail(f"give one dataset name: python -m scoat_jax.datasets.build NAME [--flags], NAME "
             f"one of {names} (got {list(argv[1:]) or 'none'}).")
  options = {k: FLAGS[k].value for k in ("slices", "label_map", "patients", "timepoints", "seed",
                                         "shape")}

  def build_and_describe():
    if FLAGS.verbosity < 1:  # TFDS warns about every folder it creates
      logging.set_verbosity(logging.ERROR)
    t0 = time.perf_counter()
    full = build(argv[1], FLAGS.data_dir, FLAGS.manual_dir, overwrite=FLAGS.overwrite, **options)
    ds = base.open_source(full, FLAGS.data_dir)
    cli.echo(f"{full}: {ds.num_records} slices, {len(ds.scans)} scans, {len(ds.case_ids())} "
             f"cases in {ds.data_dir} ({time.perf_counter() - t0:.1f} s); read it as "
             f"data.name='{full}'\n")

  cli.run(argv, build_and_describe, positional=True)


def console_main() -> None:
  """The `scoat-build-dataset` console command."""
  define_flags()
  cli.run_command(main)


if __name__ == "__main__":
  console_main()
