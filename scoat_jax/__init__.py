"""scoat_jax: SCOAT-Net and its study in JAX/Flax.

Layers, bottom to top (each imports only from those below it or beside it as stated):

- `common`: file writing, command-line plumbing, devices and runtime set-up;
- `models` (the networks), `data` (CT I/O, intensity, slice preprocessing, readers and
  writers, folds, lung mask, phantom), `datasets` (TFDS builders), `checkpoints`,
  `evaluation` (metrics, validation, cross-validation reports), `configs`;
- `training` and `inference`, which never import each other;
- the commands `main`, `predict`, `followup` and `report` (`python -m scoat_jax.<name>`).
"""
