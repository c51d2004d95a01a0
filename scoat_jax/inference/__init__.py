"""Inference: trained models on scans, with nothing from training underneath.

- `loading`: `load_model`, `load_ensemble` from workdirs, step folders, exported
  bundles (`bundle`) or the authors' PyTorch weights.
- `predictor`: `Predictor` (batched, sharded forward passes, each slice prepared
  exactly as in training and mapped back).
- `scan`: one scan through the network, post-processing and quantification.
- `api`: `segment(scan, model)`, the one-call Python API (also `scoat_jax.segment`).
- `segment`: a predict run over inputs: masks, probabilities, reports, tables.
- `postprocessing`: small or extra-pulmonary components removed, the rule chosen
  on cross-validation; `export`: bundles for shipping.
- `quantify`: opacification volume, lung volume, share of lung, lesions.
- `attention`: SAM maps on the slice and as overlays (paper Fig. 5).
- `followup`: one patient's course over time (paper Fig. 6).

The main names are also reachable here (`inference.load_model`),
imported on first use so that `--help` of a command stays fast.
"""
import importlib

_NAMES = {"InferenceError": "loading", "LoadedModel": "loading", "load_ensemble": "loading",
          "load_model": "loading", "load_sources": "loading", "Predictor": "predictor",
          "check_batch_size": "predictor"}


def __getattr__(name):
  if name in _NAMES:
    return getattr(importlib.import_module(f"scoat_jax.inference.{_NAMES[name]}"), name)
  raise AttributeError(f"module 'scoat_jax.inference' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_NAMES))
