r"""Scores predicted masks from any tool against reference masks, per case and on average.

    python -m scoat_jax.evaluate --predictions=out/ --references=labelsTs/ --output=eval/
    python -m scoat_jax.evaluate --predictions=DIR --references=DIR --output=DIR \
        --labels=1,2 --tolerance_mm=2.0 --overwrite

What it pairs, checks, computes and writes: `scoat_jax.evaluation.external`.
Exit status: `scoat_jax.common.cli`.
"""
import pathlib

from absl import flags

from scoat_jax.common import cli
from scoat_jax.evaluation import external

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("predictions", None, "Folder of predicted masks (<name>.<ext> or "
                      "<name>_mask.<ext>; .nii.gz/.nii/.mha/.mhd/.nrrd/.png).")
  flags.DEFINE_string("references", None, "Folder of reference masks (<name>.<ext>).")
  flags.DEFINE_string("output", None, "Folder for summary.json and per_case.csv.")
  flags.DEFINE_list("labels", [], "Class labels to score one by one beside any opacity "
                    "(label > 0), e.g. 1,2.")
  flags.DEFINE_float("tolerance_mm", 1.0, "Surface Dice tolerance in mm (pixels for PNG masks).")
  flags.DEFINE_bool("overwrite", False, "Replace an earlier evaluation in --output.")


def main(argv):
  cli.run(argv, lambda: external.run(FLAGS.predictions, FLAGS.references, FLAGS.output,
                                     labels=FLAGS.labels, tolerance_mm=FLAGS.tolerance_mm,
                                     overwrite=FLAGS.overwrite),
          required=("predictions", "references", "output"),
          show=pathlib.Path(FLAGS.output or ".") / "summary.json")


def console_main() -> None:
  """The `scoat-evaluate` console command."""
  define_flags()
  cli.run_command(main)


if __name__ == "__main__":
  console_main()
