r"""Labels an unlabelled dataset with a teacher: the pseudo-labelling stage of self-training.

    python -m scoat_jax.pseudo_label --teacher=runs/teacher --data=unlabelled_slices \
        --output=runs/round1_soft
    python -m scoat_jax.pseudo_label --teacher=runs/cv/fold0 --teacher=runs/cv2/fold0 \
        --data=unlabelled_volumes --data_dir=DIR --output=soft/ --tta

The teacher is any model `predict` takes (a training workdir, a step folder, a
bundle; several are an ensemble whose probabilities are averaged). Every slice
of the dataset, in dataset order, goes through the teacher exactly as
`predict` sends a slice (same preprocessing, letterbox and threshold-free
P(opacity), back on the slice's own grid), and its probability is written as
`<output>/<name>.png` (`scoat_jax.data.soft_labels`: 0..255, the slice's
size). `soft_labels.json` beside the maps records the teachers (checkpoint,
step, weights hash, fold), the dataset and every slice's mean confidence
|2p - 1| and opacity share. The folder is written under a temporary name and
renamed when complete: an interrupted run leaves nothing, and `--overwrite`
replaces an earlier folder only then.

Training reads the folder through `config.unlabelled.soft_labels` and
refuses one whose teachers were trained on another fold than the run's.
Exit status: 0 done, 2 bad input, 130 interrupted (`scoat_jax.common.cli`).
"""
from __future__ import annotations

import os

from absl import flags

from scoat_jax.common import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_multi_string("teacher", None, "Training workdir, step folder or bundle; repeat "
                            "for an ensemble (probabilities averaged).")
  flags.DEFINE_string("data", None, "The unlabelled dataset: unlabelled_slices or "
                      "unlabelled_volumes (build it with scoat_jax.datasets.build).")
  flags.DEFINE_string("data_dir", "", "Where it is built ('' -> the TFDS default).")
  flags.DEFINE_string("output", None, "Folder of <name>.png maps to write.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --output folder (once the new one is "
                    "complete).")
  flags.DEFINE_bool("tta", False, "Also predict the mirrored slice and average.")
  flags.DEFINE_bool("match_intensity", False, "8-bit slices: map each scan's grey levels onto "
                    "the histogram of the teacher's own training slices first (train the student "
                    "with --config.unlabelled.match_intensity=True).")
  flags.DEFINE_integer("batch_size", 0, "Slices per forward pass (0: one per CPU device, 8 per "
                       "accelerator).")
  flags.DEFINE_string("compilation_cache_dir", "~/.cache/scoat_jax/jax_cache",
                      "JAX compilation cache ('' turns it off).")


def main(argv):
  def run():
    from scoat_jax.inference import pseudo_labels
    manifest = pseudo_labels.label(FLAGS.teacher, FLAGS.data, FLAGS.data_dir, FLAGS.output,
                     overwrite=FLAGS.overwrite, tta=FLAGS.tta, batch_size=FLAGS.batch_size,
                     match_intensity=FLAGS.match_intensity)
    cli.echo(f"{manifest['num_slices']} soft labels of {manifest['dataset']} in "
             f"{os.path.abspath(FLAGS.output)} (teacher fold(s) {manifest['teacher_folds']}, mean "
             f"confidence {manifest['mean_confidence']:.3f}); train with "
             f"--config.unlabelled.soft_labels={FLAGS.output}\n")
  cli.run(argv, run, required=("teacher", "data", "output"),
          compilation_cache_dir=FLAGS.compilation_cache_dir)


def console_main() -> None:
  """The `scoat-pseudo-label` console command."""
  define_flags()
  cli.run_command(main)


if __name__ == "__main__":
  console_main()
