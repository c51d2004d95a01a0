"""Trains (or evaluates) SCOAT-Net on one cross-validation fold.

    python -m scoat_jax.main --flagfile=launch/cv_fold0.cfg [--workdir=DIR]
    python -m scoat_jax.main --config=scoat_jax/configs/default.py \
        --config.data.fold=1 --workdir=runs/fold1
    python -m scoat_jax.main --flagfile=launch/cv_fold0.cfg --mode=eval \
        --checkpoint=runs/cv_fold0 [--split=validation]

Data parallel over every device this process sees; several hosts join through
`jax.distributed` (see BUILD.md).
"""
import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train, or evaluate a checkpoint.")
flags.DEFINE_string("checkpoint", None, "With --mode=eval: a workdir, checkpoints folder or step.")
flags.DEFINE_enum("split", "validation", ["validation", "train"], "With --mode=eval: which split.")
flags.DEFINE_bool("overwrite", False, "Replace a different run already in --workdir.")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; flags look like --name=value.")
  config = FLAGS.config
  if config is None:
    _fail("--config (or --flagfile=launch/<name>.cfg) is required.")

  from scoat_jax import host_memory
  host_memory.keep_freed_memory()  # before JAX starts its threads
  import jax  # Imported here so that --help is fast.
  from scoat_jax import compilation_cache, parallel
  compilation_cache.enable(config.compilation_cache_dir)
  parallel.maybe_initialize_distributed(force=config.distributed)
  logging.info("JAX %s: %d process(es), %d device(s): %s", jax.__version__, jax.process_count(),
               jax.device_count(), jax.devices()[0].device_kind)

  from scoat_jax import datasets, input_pipeline, train  # noqa: F401 (datasets registers builders)
  errors = (ValueError, FileNotFoundError, train.NonFiniteLossError)
  try:
    if FLAGS.mode == "eval":
      if not FLAGS.checkpoint:
        _fail("--mode=eval needs --checkpoint=<workdir, checkpoints folder or step>.")
      aggregate, per_case = train.evaluate_checkpoint(config, FLAGS.checkpoint, FLAGS.split)
      print(json.dumps({"aggregate": aggregate, "per_case": per_case}, indent=1))
      return
    if not FLAGS.workdir:
      _fail("--workdir is required for training.")
    input_pipeline.ensure_dataset(config.data)
    final = train.train_and_evaluate(config, FLAGS.workdir, overwrite=FLAGS.overwrite)
    logging.info("final: %s", json.dumps(final))
  except KeyboardInterrupt as e:
    logging.warning("%s", e)
    sys.exit(130)
  except errors as e:
    _fail(str(e))


if __name__ == "__main__":
  flags.mark_flags_as_required([])
  app.run(main)
