r"""Cross-validation report in the paper's layout (Table II, box plots of Fig. 3).

    python -m scoat_jax.report --workdirs runs/fold* --output=reports/cv
    python -m scoat_jax.report --workdirs=runs/scoat_f0,runs/scoat_f1 \
        --workdirs=runs/unet_f0,runs/unet_f1 --labels=SCOAT-Net,SCOAT-Net,U-Net,U-Net --output=DIR
    python -m scoat_jax.report --workdirs 'runs/table2/*/fold*' --output=reports/table2

What it reads and writes: `scoat_jax.evaluation.cv_report`. Exit status:
`scoat_jax.common.cli`.
"""
import pathlib

from absl import flags

from scoat_jax.common import cli
from scoat_jax.evaluation import cv_report

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_multi_string("workdirs", None, "Training workdirs (repeat, comma-separate, or let "
                            "the shell expand runs/fold*).")
  flags.DEFINE_list("labels", [], "One row label per workdir (default: model / loss).")
  flags.DEFINE_string("output", "cv_report", "Folder for the report files.")
  flags.DEFINE_bool("overwrite", False, "Replace an earlier report in --output.")
  flags.DEFINE_string("reference", None, "Row the per-case DSC p-values compare with (default: "
                      "SCOAT-Net trained with BCE-Dice, if a row is).")
  flags.DEFINE_bool("costs", True, "Add each network's parameters, GFLOPs and forward ms per "
                    "512x512 slice (builds and times the networks).")
  flags.DEFINE_bool("timing", True, "With --costs: time the forward pass on this machine.")
  flags.DEFINE_enum("at", "best", ["best", "last"], "Score each run at its best checkpoint "
                    "(highest validation DSC) or its last evaluated one (no choice made on the "
                    "validation fold).")


def main(argv):
  # `--workdirs runs/fold*` expanded by the shell leaves all but the first
  # folder as positional arguments: they are workdirs too.
  workdirs = list(FLAGS.workdirs or []) + list(argv[1:])
  cli.run(argv, lambda: cv_report.run(workdirs, FLAGS.output, labels=FLAGS.labels,
                                      overwrite=FLAGS.overwrite, reference=FLAGS.reference,
                                      costs=FLAGS.costs, timing=FLAGS.timing, at=FLAGS.at),
          positional=True, show=pathlib.Path(FLAGS.output) / "cv_report.md")


def console_main() -> None:
  """The `scoat-report` console command."""
  define_flags()
  cli.run_command(main)


if __name__ == "__main__":
  console_main()
