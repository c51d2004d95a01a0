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
`--overwrite` keeps the old copy until the new one is finished. Errors print
one line and exit with status 1.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import tensorflow_datasets as tfds
from absl import logging as absl_logging

from scoat_jax import datasets
from scoat_jax.datasets import base


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


def _parse(argv):
  p = argparse.ArgumentParser(prog="python -m scoat_jax.datasets.build",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("name", help="covid_semiseg | ct_volumes[/config] | ct_phantom[/config]")
  p.add_argument("--data_dir", default="", help="output root (default: the TFDS default)")
  p.add_argument("--manual_dir", default=None, help="input folder (covid_semiseg, ct_volumes)")
  p.add_argument("--overwrite", action="store_true", help="rebuild an existing dataset")
  p.add_argument("--slices", choices=base.SLICE_FILTERS, default=None,
                 help="ct_volumes: keep all slices, those with opacity, or those showing lung")
  p.add_argument("--label_map", default=None, help="ct_volumes: default | ma2020 | medseg")
  p.add_argument("--patients", type=int, default=None, help="ct_phantom: number of patients")
  p.add_argument("--timepoints", type=int, default=None, help="ct_phantom: scans per patient")
  p.add_argument("--seed", type=int, default=None, help="ct_phantom: cohort seed")
  p.add_argument("--shape", default=None, help="ct_phantom: scan shape ZxYxX, e.g. 16x64x64")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = _parse(argv)
  tfds.disable_progress_bar()
  absl_logging.set_verbosity(absl_logging.ERROR)  # TFDS warns about the folders it is creating
  options = {k: getattr(args, k) for k in ("slices", "label_map", "patients", "timepoints", "seed", "shape")}
  t0 = time.perf_counter()
  try:
    full = build(args.name, args.data_dir, args.manual_dir, overwrite=args.overwrite, **options)
    ds = base.open_source(full, args.data_dir)
  except (ValueError, OSError) as e:
    print(f"error: {e}".splitlines()[0], file=sys.stderr)
    return 1
  print(f"{full}: {ds.num_records} slices, {len(ds.scans)} scans, {len(ds.case_ids())} cases "
        f"in {ds.data_dir} ({time.perf_counter() - t0:.1f} s); read it as data.name='{full}'")
  return 0


if __name__ == "__main__":
  sys.exit(main())
