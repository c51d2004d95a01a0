r"""Runs one table of the paper: every row (network or loss) x fold, in sequence.

    python -m scoat_jax.sweep --flagfile=launch/table2.cfg --folds=0-4 --root=runs/table2
    python -m scoat_jax.sweep --flagfile=launch/table2.cfg --folds=0-4 --root=runs/table2 \
        --emit=slurm --slurm_options=--gres=gpu:1 > table2.sbatch
    python -m scoat_jax.report --workdirs 'runs/table2/*/fold*' --output=reports/table2

`--config` and every `--config.<field>=` override apply to each run; a row
adds its network or loss (`scoat_jax.training.sweep`). Finished runs are
skipped and an interrupted one resumes, so the same command continues a
table. `--emit=commands` prints one training command per line instead,
`--emit=slurm` a Slurm array script. Exit status: `scoat_jax.common.cli`
(a failed run's own status is passed on).
"""
import subprocess
import sys

from absl import flags, logging
from ml_collections import config_flags

from scoat_jax.common import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Experiment config file for every run.",
                                  lock_config=True)
  flags.DEFINE_list("rows", [], "The table's rows: networks (Tables II-III) or losses "
                    "(Table I); 'unet+focal' sets both.")
  flags.DEFINE_string("folds", "0-4", "Folds to run: '0-4', '0,2', '0-1,3'.")
  flags.DEFINE_string("root", None, "Runs go to <root>/<row>/fold<k>.")
  flags.DEFINE_enum("emit", "run", ["run", "commands", "slurm"],
                    "run: train the runs here in sequence; commands: print one command per "
                    "line; slurm: print a Slurm array script.")
  flags.DEFINE_multi_string("slurm_options", [], "Extra #SBATCH options, e.g. --gres=gpu:1.")


def _sweep(argv) -> None:
  from scoat_jax.training import sweep
  del argv  # absl's leftovers; the runs need the command line as given
  args = cli.expanded_args(sys.argv)
  config_file = [a.split("=", 1)[1] for a in args if a.startswith("--config=")][-1]
  overrides = [a for a in args if a.startswith("--config.")]
  runs = sweep.plan(config_file=config_file, overrides=overrides, rows=FLAGS.rows,
                    folds=sweep.parse_folds(FLAGS.folds), num_folds=FLAGS.config.data.num_folds,
                    root=FLAGS.root)
  if FLAGS.emit == "commands":
    cli.echo(sweep.commands(runs))
    return
  if FLAGS.emit == "slurm":
    cli.echo(sweep.slurm_script(runs, name=f"scoat_{FLAGS.root.rstrip('/').split('/')[-1]}",
                                options=FLAGS.slurm_options))
    return
  try:
    done = sweep.execute(runs, log=lambda line: logging.info("%s", line))
  except subprocess.CalledProcessError as e:
    # The run printed its own error line; this one says which run it was.
    print(f"error: run failed with status {e.returncode}: {e.cmd}", file=sys.stderr)
    sys.exit(e.returncode)
  logging.info("%d run(s) trained, %d already finished; the table: %s", done["ran"],
               done["skipped"], sweep.report_command(FLAGS.rows, FLAGS.root))


def main(argv):
  if FLAGS.config is None:
    cli.fail("--config (or --flagfile=launch/table<N>.cfg) is required.")
  cli.run(argv, lambda: _sweep(argv), required=("root",))


def console_main() -> None:
  """The `scoat-sweep` console command."""
  define_flags()
  cli.run_command(main)


if __name__ == "__main__":
  console_main()
