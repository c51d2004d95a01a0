r"""Follow-up of one patient: lung opacification over time (paper Fig. 6).

    python -m scoat_jax.followup --checkpoint=runs/demo --input=patient_scans/ --output=out/
    python -m scoat_jax.followup --checkpoint=runs/demo --dates=scans.csv --output=out/
    python -m scoat_jax.followup --reports=predicted/ [--dates=scans.csv] --output=out/

What it reads and writes: `scoat_jax.inference.followup`. Exit status:
`scoat_jax.common.cli`.
"""
import pathlib

from absl import flags

from scoat_jax import predict
from scoat_jax.common import cli
from scoat_jax.inference import followup

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_multi_string("checkpoint", None, "Model(s) to segment with (see scoat_jax.predict).")
  flags.DEFINE_string("input", None, "Folder of one patient's scans (files or DICOM folders).")
  flags.DEFINE_string("dates", None, "CSV of path,date (YYYYMMDD or YYYY-MM-DD); default: DICOM "
                      "StudyDate.")
  flags.DEFINE_string("reports", None, "Use the *_report.json of an earlier predict run instead "
                      "of segmenting.")
  flags.DEFINE_string("patient", None, "Follow up only this patient's scans (the --dates CSV's "
                      "patient_id, else DICOM PatientID); needed when the scans are of several "
                      "patients, e.g. a cohort's cohort.csv.")
  flags.DEFINE_string("output", None, "Results folder.")
  predict.define_segment_flags()


def main(argv):
  cli.run(argv, lambda: followup.run(
      FLAGS.output, checkpoints=FLAGS.checkpoint or (), input_path=FLAGS.input,
      dates_csv=FLAGS.dates, reports_dir=FLAGS.reports, patient=FLAGS.patient, tta=FLAGS.tta,
      overwrite=FLAGS.overwrite, batch_size=FLAGS.batch_size, key_images=FLAGS.key_images,
      postprocess=not FLAGS.no_postprocessing, skip_outside_lung=FLAGS.skip_outside_lung,
      lung_rule=FLAGS.lung_rule),
      required=("output",), show=pathlib.Path(FLAGS.output or ".") / "followup.md",
      compilation_cache_dir=FLAGS.compilation_cache_dir)


def console_main() -> None:
  """The `scoat-followup` console command."""
  define_flags()
  cli.run_command(main)


if __name__ == "__main__":
  console_main()
