"""The embedded default: SCOAT-Net on the synthetic CT phantom, CPU-sized.

No download: the `ct_phantom` dataset is generated on first use. Sized to
finish within 10 minutes on a 2-core CPU and to reach a validation DSC of at
least 0.8 there: rows a quarter as wide as the paper's (8..128 channels),
128x128 slices, batch 2, 750 steps on the training slices that show opacity
(validation scores every slice of the held-out patients), validation every
third epoch. At 128 px a small lesion covers 1.8 times the pixels it covers at
96 px, and this net trains faster than a half-width one at 96 px
(benchmarks/README.md).
Architecture, loss and optimizer are the paper's, and so is the schedule's
shape: Adam at 0.01, a warm restart at 0.001 (here after one epoch of six),
then a step decay (x0.1 after three epochs of the restart).
"""
from scoat_jax.configs import default


def get_config(arg=None):
  """`arg` as for `default.py` (another network or loss), e.g. `demo.py:unet`."""
  c = default.get_config(arg)
  c.model.widths = (8, 16, 32, 64, 128)
  c.data.name = "ct_phantom"
  c.data.image_size = 128
  c.data.num_folds = 4
  c.data.worker_count = 0
  c.data.slices = "opacity"          # train on slices that show opacity (validate on all)
  c.batch_size = 2
  c.eval_batch_size = 16
  c.num_epochs = 6
  c.steps_per_epoch = 125
  c.restart_epoch = 1                # lr 0.01 for one epoch, then restart at 0.001,
  c.decay_every_epochs = 3           # x0.1 for the last two epochs.
  c.eval_every_epochs = 3            # a validation pass costs about half an epoch here.
  c.log_every_steps = 25
  return c
