r"""Trains (or evaluates) a network on one cross-validation fold, or on every case (fold -1).

    python -m scoat_jax.main --flagfile=launch/cv_fold0.cfg [--workdir=DIR]
    python -m scoat_jax.main --config=scoat_jax/configs/default.py \
        --config.data.fold=1 --workdir=runs/fold1
    python -m scoat_jax.main --flagfile=launch/demo.cfg --config.data.fold=all \
        --workdir=runs/final     # fold -1 (= all): every case, no validation
    python -m scoat_jax.main --flagfile=launch/cv_fold0.cfg --mode=eval \
        --checkpoint=runs/cv_fold0 [--split=validation]

Data parallel over every device this process sees; several hosts join through
`jax.distributed` (README, "Several hosts"). Exit status: 0 done, 2 bad flag,
config or data, 3 training diverged, 130 interrupted (`scoat_jax.common.cli`).
"""
import json

from absl import flags, logging
from ml_collections import config_flags

from scoat_jax.common import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train, or evaluate a checkpoint.")
flags.DEFINE_string("checkpoint", None, "With --mode=eval: a workdir, checkpoints folder or step.")
flags.DEFINE_enum("split", "validation", ["validation", "train"], "With --mode=eval: which split.")
flags.DEFINE_bool("overwrite", False, "Replace a different run already in --workdir.")


def _train_or_evaluate() -> None:
  import jax  # Imported here so that --help is fast.
  from scoat_jax import models
  from scoat_jax.common import parallel
  from scoat_jax.training import input_pipeline, train
  config = FLAGS.config
  models.create_model(config)  # a config naming no valid network fails here, before any log
  config = train.resolve_fold(config)  # and a fold that is neither an integer nor 'all'
  parallel.maybe_initialize_distributed(force=config.distributed)
  logging.info("JAX %s: %d process(es), %d device(s): %s", jax.__version__, jax.process_count(),
               jax.device_count(), jax.devices()[0].device_kind)
  if FLAGS.mode == "eval":
    aggregate, per_case = train.evaluate_checkpoint(config, FLAGS.checkpoint, FLAGS.split)
    cli.echo(json.dumps({"aggregate": aggregate, "per_case": per_case}, indent=1) + "\n")
    return
  input_pipeline.ensure_dataset(config.data)
  final = train.train_and_evaluate(config, FLAGS.workdir, overwrite=FLAGS.overwrite)
  logging.info("final: %s", json.dumps(final))
  logging.info("results in %s (metrics.jsonl, checkpoints/, tensorboard/)", FLAGS.workdir)


def main(argv):
  config = FLAGS.config
  if config is None:
    cli.fail("--config (or --flagfile=launch/<name>.cfg) is required.")
  if FLAGS.mode == "eval" and not FLAGS.checkpoint:
    cli.fail("--mode=eval needs --checkpoint=<workdir, checkpoints folder or step>.")
  if FLAGS.mode == "train" and not FLAGS.workdir:
    cli.fail("--workdir is required for training.")
  cli.run(argv, _train_or_evaluate, compilation_cache_dir=config.compilation_cache_dir)


def console_main() -> None:
  """The `scoat-train` console command."""
  cli.run_command(main)


if __name__ == "__main__":
  console_main()
