r"""Segments CT scans (or 2-D slices) with trained models and quantifies the opacification.

    python -m scoat_jax.predict --checkpoint=runs/demo --input=scan.nii.gz --output=out/
    python -m scoat_jax.predict --checkpoint=model/ --input=dicom_series_dir --output=out/ \
        --output_format=both --tta --save_probabilities
    python -m scoat_jax.predict --checkpoint=scoat.pth --config=scoat_jax/configs/default.py \
        --input=scan.nii.gz --output=out/

What it reads and writes: `scoat_jax.inference.segment`. Exit status:
`scoat_jax.common.cli` (0 done, 2 bad input, 130 interrupted).
"""
from absl import flags
from ml_collections import config_flags

from scoat_jax.common import cli
from scoat_jax.inference import segment

FLAGS = flags.FLAGS


def define_segment_flags() -> None:
  """The flags of every command that segments scans (predict, followup)."""
  # Registered as the main program's own flags (absl names it by sys.argv[0]),
  # so that `--help` of whichever command runs lists them.
  import sys
  main = dict(module_name=sys.argv[0])
  flags.DEFINE_bool("tta", False, "Flip test-time augmentation (twice the compute).", **main)
  flags.DEFINE_bool("overwrite", False, "Allow an output folder holding earlier results (only "
                    "this run's files are replaced).", **main)
  flags.DEFINE_integer("batch_size", 0, "Slices per forward pass; memory grows with it. 0: one "
                       "per CPU device (fastest there), 8 per GPU/TPU.", **main)
  flags.DEFINE_string("compilation_cache_dir", "~/.cache/scoat_jax/jax_cache",
                      "JAX compilation cache ('' turns it off).", **main)
  flags.DEFINE_bool("no_postprocessing", False, "Ignore the bundle's post-processing rule.",
                    **main)
  flags.DEFINE_bool("skip_outside_lung", True, "No network pass on slices beyond the lungs' "
                    "extent along z (+-5 mm with the lung rule, +-30 mm without); their mask is "
                    "empty.", **main)
  flags.DEFINE_bool("lung_rule", True, "CT volumes: keep only opacity within 5 mm of the lung "
                    "mask (a scan without lung is not quantified); --nolung_rule counts every "
                    "voxel the network marks.", **main)
  flags.DEFINE_bool("key_images", True, "Write <name>_report.png and .pdf (key images).", **main)


def define_flags() -> None:
  flags.DEFINE_multi_string("checkpoint", None, "Training workdir (its best step), a step "
                            "folder, a bundle from scoat_jax.export, or the authors' PyTorch "
                            "weights (.pth/.npz, with --config); repeat to average an ensemble.")
  config_flags.DEFINE_config_file("config", None, "Config for PyTorch weights (input size, HU "
                                  "window), e.g. scoat_jax/configs/default.py.")
  flags.DEFINE_enum("output_format", "nifti", list(segment.OUTPUT_FORMATS), "Masks as NIfTI, "
                    "DICOM SEG (DICOM input) or both.")
  flags.DEFINE_string("lung_mask", None, "External lung mask for POI: a file (one scan) or a "
                      "folder of <name>[_lung].nii.gz; must match the scan's grid.")
  flags.DEFINE_string("input", None, "CT file, DICOM series folder, folder of scans, or folder "
                      "of 2-D .png/.jpg slices.")
  flags.DEFINE_string("output", None, "Results folder (created if missing).")
  flags.DEFINE_bool("save_probabilities", False, "Also write P(opacity) maps.")
  flags.DEFINE_bool("save_attention", False, "Write attention overlays (SCOAT-Net: the SAMs of "
                    "x_1_1, x_2_2, x_1_3; any network with attention maps).")
  flags.DEFINE_list("attention_slices", [], "z indices for --save_attention (default: the slice "
                    "with the most predicted opacity).")
  flags.DEFINE_string("series_id", None, "The DICOM series (SeriesInstanceUID) to read from a "
                      "folder holding several.")
  define_segment_flags()


def main(argv):
  cli.run(argv, lambda: segment.run(
      FLAGS.checkpoint, FLAGS.input, FLAGS.output, tta=FLAGS.tta,
      save_probabilities=FLAGS.save_probabilities, save_attention=FLAGS.save_attention,
      attention_slices=segment.parse_slices(FLAGS.attention_slices), overwrite=FLAGS.overwrite,
      batch_size=FLAGS.batch_size, series_id=FLAGS.series_id, output_format=FLAGS.output_format,
      key_images=FLAGS.key_images, postprocess=not FLAGS.no_postprocessing,
      skip_outside_lung=FLAGS.skip_outside_lung, lung_rule=FLAGS.lung_rule,
      lung_mask=FLAGS.lung_mask, config=FLAGS.config),
      required=("checkpoint", "input", "output"), compilation_cache_dir=FLAGS.compilation_cache_dir)


def console_main() -> None:
  """The `scoat-predict` console command."""
  define_flags()
  cli.run_command(main)


if __name__ == "__main__":
  console_main()
