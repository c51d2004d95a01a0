"""`python -m scoat_jax.data.phantom`: writes a synthetic cohort with lesion and lung masks.

    python -m scoat_jax.data.phantom --out=DIR --patients=2 --timepoints=3 --format=nifti

Exit status as every command (`scoat_jax.common.cli`): 0 done, 2 bad flag or
an output folder holding earlier files (nothing is written then).
"""
import time

from absl import flags

from scoat_jax.common import cli
from scoat_jax.data.phantom.anatomy import DEFAULT_NOISE_SD, DEFAULT_SHAPE, FORMATS
from scoat_jax.data.phantom.cohort import write_cohort

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("out", None, "Output folder (created if missing).")
  flags.DEFINE_integer("patients", 2, "Number of patients.", lower_bound=1)
  flags.DEFINE_integer("timepoints", 3, "Scans per patient (follow-up time points).", lower_bound=1)
  flags.DEFINE_integer("seed", 0, "Cohort seed: the same seed gives the same scans.")
  flags.DEFINE_enum("format", "nifti", sorted(FORMATS), "File format of the scans.")
  flags.DEFINE_list("shape", [str(n) for n in DEFAULT_SHAPE], "Scan shape z,y,x in voxels.")
  flags.DEFINE_float("noise_sd", DEFAULT_NOISE_SD, "Gaussian noise in HU.")
  flags.DEFINE_bool("overwrite", False, "Replace existing outputs.")


def main(argv):
  try:
    shape = tuple(int(v) for v in FLAGS.shape)
  except ValueError:
    cli.fail(f"--shape={','.join(FLAGS.shape)}: give three integers z,y,x, e.g. --shape=48,256,256.")

  def write():
    start = time.time()
    csv_path = write_cohort(FLAGS.out, seed=FLAGS.seed, num_patients=FLAGS.patients,
                            num_timepoints=FLAGS.timepoints, fmt=FLAGS.format,
                            overwrite=FLAGS.overwrite, shape=shape, noise_sd=FLAGS.noise_sd)
    cli.echo(f"wrote {FLAGS.patients * FLAGS.timepoints} scans and {csv_path} in "
             f"{time.time() - start:.1f} s\n")

  cli.run(argv, write, required=("out",))


def console_main() -> None:
  """The `scoat-phantom` console command."""
  define_flags()
  cli.run_command(main)


if __name__ == "__main__":
  console_main()
