r"""Bundles trained runs for inference: weights, config, pre- and post-processing, provenance.

    python -m scoat_jax.export --checkpoint=runs/fold0 --checkpoint=runs/fold1 --output=model/
    python -m scoat_jax.export --checkpoint=runs/all --postprocessing_from=model/ \
        --output=model_all/

What a bundle holds and how post-processing is chosen: `scoat_jax.inference.export`.
`predict`, `followup` and `scoat_jax.segment` take the bundle as `--checkpoint`.
"""
from absl import flags
from ml_collections import config_flags

from scoat_jax.common import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_multi_string("checkpoint", None, "Training workdir (its best step, or latest "
                            "for fold -1), step folder, or PyTorch weights with --config; "
                            "repeat for a fold ensemble.")
  flags.DEFINE_string("output", None, "The bundle folder to write (must not exist).")
  flags.DEFINE_enum("postprocessing", "cv", ["cv", "none"], "cv: choose the rule on the "
                    "members' validation folds; none: no rule.")
  flags.DEFINE_string("postprocessing_from", None, "Copy the rule of this bundle (for a model "
                      "trained on all cases).")
  flags.DEFINE_string("data_dir", None, "Where the training datasets are built (default: the "
                      "runs' own data_dir or ~/tensorflow_datasets).")
  flags.DEFINE_bool("overwrite", False, "Replace an existing bundle at --output.")
  config_flags.DEFINE_config_file("config", None, "Config for PyTorch weights.")


def main(argv):
  from scoat_jax.inference import export
  cli.run(argv, lambda: export.run(
      FLAGS.checkpoint, FLAGS.output, postprocessing_mode=FLAGS.postprocessing,
      postprocessing_from=FLAGS.postprocessing_from, overwrite=FLAGS.overwrite,
      data_dir=FLAGS.data_dir, config=FLAGS.config), required=("checkpoint", "output"))


def console_main() -> None:
  """The `scoat-export` console command."""
  define_flags()
  cli.run_command(main)


if __name__ == "__main__":
  console_main()
