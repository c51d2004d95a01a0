"""The paper's learning-rate schedule as one Optax schedule.

SCOAT-Net trains with Adam at 0.01, multiplied by 0.1 every 10 epochs; once
that run has converged it restarts at 0.001 with the same step decay (a warm
restart). Here both phases are stair-cased exponential decays joined at the
restart epoch, so the rate is a pure function of the step and lives inside the
optimizer (resuming needs nothing but the step).
"""
from __future__ import annotations

import optax


def paper_schedule(*, steps_per_epoch: int, learning_rate: float = 0.01,
                   restart_learning_rate: float = 0.001, decay_every_epochs: int = 10,
                   decay_factor: float = 0.1, restart_epoch: int | None = 30) -> optax.Schedule:
  """Builds lr(step) = base * factor ** floor(epochs_into_phase / decay_every).

  Args:
    steps_per_epoch: optimizer steps in one epoch (> 0).
    learning_rate: rate of the first phase.
    restart_learning_rate: rate at the warm restart.
    decay_every_epochs: epochs between two decays.
    decay_factor: multiplier applied at each decay.
    restart_epoch: epoch at which the second phase starts; None or 0 for no
      restart.

  Returns:
    An Optax schedule.
  """
  if steps_per_epoch <= 0:
    raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
  if decay_every_epochs <= 0:
    raise ValueError(f"config.decay_every_epochs must be positive, got {decay_every_epochs}")

  def phase(rate: float) -> optax.Schedule:
    return optax.exponential_decay(
        init_value=rate, transition_steps=decay_every_epochs * steps_per_epoch,
        decay_rate=decay_factor, staircase=True)

  if not restart_epoch:
    return phase(learning_rate)
  return optax.join_schedules(
      [phase(learning_rate), phase(restart_learning_rate)],
      boundaries=[restart_epoch * steps_per_epoch])
