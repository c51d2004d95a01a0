"""scoat_jax: SCOAT-Net and its study in JAX/Flax.

Layers, bottom to top (each imports only from those below it or beside it as stated):

- `common`: file writing, command-line plumbing, devices and runtime set-up;
- `models` (the networks), `data` (CT I/O, intensity, slice preprocessing, readers and
  writers, folds, lung mask, phantom), `datasets` (TFDS builders), `checkpoints`,
  `evaluation` (metrics, validation, cross-validation reports), `configs`;
- `training` and `inference`, which never import each other;
- the commands `main`, `predict`, `followup`, `report`, `sweep`, `export` and `evaluate`
  (`python -m scoat_jax.<name>`).

`scoat_jax.segment(scan, model)` is the one-call Python API (`inference.api`),
imported on first use.
"""


def __getattr__(name):
  if name in ("segment", "load"):
    from scoat_jax.inference import api
    return getattr(api, name)
  raise AttributeError(f"module 'scoat_jax' has no attribute {name!r}")
