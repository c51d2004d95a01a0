"""The learning rate follows the paper's recipe at chosen epochs."""
import numpy as np
import pytest

from scoat_jax.training.schedule import paper_schedule

SPE = 7  # steps per epoch


@pytest.mark.parametrize("epoch,expected", [
    (0, 1e-2), (9, 1e-2),            # first phase: 0.01 ...
    (10, 1e-3), (19, 1e-3),          # x0.1 after 10 epochs
    (20, 1e-4), (29, 1e-4),          # x0.01 after 20
    (30, 1e-3), (39, 1e-3),          # warm restart at 0.001
    (40, 1e-4), (49, 1e-4),          # x0.1 again, 10 epochs after the restart
])
def test_paper_schedule_at_epoch_boundaries(epoch, expected):
  schedule = paper_schedule(steps_per_epoch=SPE, restart_epoch=30)
  for step in (epoch * SPE, epoch * SPE + SPE - 1):  # first and last step of the epoch
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-6)


def test_no_restart_keeps_decaying():
  schedule = paper_schedule(steps_per_epoch=SPE, restart_epoch=None)
  np.testing.assert_allclose(float(schedule(35 * SPE)), 1e-5, rtol=1e-5)


def test_bad_arguments():
  with pytest.raises(ValueError, match="steps_per_epoch"):
    paper_schedule(steps_per_epoch=0)
  with pytest.raises(ValueError, match="decay_every_epochs"):
    paper_schedule(steps_per_epoch=3, decay_every_epochs=0)
