"""The embedded default: SCOAT-Net on the synthetic CT phantom, CPU-sized.

No download: the `ct_phantom` dataset is generated on first use. Sized to
finish within 10 minutes on a 2-core CPU (narrower rows and 128x128 slices;
the architecture and recipe are the paper's otherwise) and to reach a
validation DSC of at least 0.8 there.
"""
from scoat_jax.configs import default


def get_config():
  c = default.get_config()
  c.widths = (16, 32, 64, 128, 256)
  c.data.name = "ct_phantom"
  c.data.image_size = 128
  c.data.num_folds = 4
  c.data.worker_count = 0
  c.data.slices = "lung"
  c.batch_size = 8
  c.eval_batch_size = 16
  c.num_epochs = 6
  c.steps_per_epoch = 60
  c.decay_every_epochs = 3
  c.restart_epoch = 0
  c.log_every_steps = 20
  return c
