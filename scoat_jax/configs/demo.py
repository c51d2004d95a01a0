"""The embedded default: SCOAT-Net on the synthetic CT phantom, CPU-sized.

No download: the `ct_phantom` dataset is generated on first use. Sized to
finish within 10 minutes on a 2-core CPU and to reach a validation DSC of at
least 0.8 there: rows half as wide as the paper's (16..256 channels), 96x96
slices, batch 2 (at 96 px the most slices per second on that CPU, see
BUILD.md), 750 steps on the training slices that show opacity (validation
scores every slice of the held-out patients), validation every second epoch.
Architecture, loss and optimizer are the paper's, and so is the schedule's
shape: Adam at 0.01, then a warm restart at 0.001 (here after one epoch of six).
"""
from scoat_jax.configs import default


def get_config():
  c = default.get_config()
  c.widths = (16, 32, 64, 128, 256)
  c.data.name = "ct_phantom"
  c.data.image_size = 96
  c.data.num_folds = 4
  c.data.worker_count = 0
  c.data.slices = "opacity"          # train on slices that show opacity (validate on all)
  c.batch_size = 2
  c.eval_batch_size = 16
  c.num_epochs = 6
  c.steps_per_epoch = 125
  c.restart_epoch = 1                # lr 0.01 for one epoch, then restart at 0.001
  c.decay_every_epochs = 6           # (no further decay within the six epochs).
  c.eval_every_epochs = 2            # a validation pass costs a third of an epoch here.
  c.log_every_steps = 25
  return c
