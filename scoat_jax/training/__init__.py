"""Training: the input pipeline, losses, schedule and the data-parallel, resumable loop.

Stands on `models`, `data`, `datasets`, `evaluation` and `checkpoints`; inference
never imports it.
"""
