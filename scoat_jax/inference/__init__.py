"""Inference: trained models on scans, with nothing from training underneath.

- `predictor`: `load_model`, `load_ensemble`, `Predictor` (batched, sharded
  forward passes, each slice prepared exactly as in training and mapped back).
- `segment`: a predict run over inputs: masks, probabilities, reports.
- `quantify`: opacification volume, lung volume, share of lung, lesions.
- `attention`: SAM maps on the slice and as overlays (paper Fig. 5).
- `followup`: one patient's course over time (paper Fig. 6).

The names of `predictor` are also reachable here (`inference.load_model`),
imported on first use so that `--help` of a command stays fast.
"""
import importlib

_PREDICTOR_NAMES = ("InferenceError", "LoadedModel", "Predictor", "check_batch_size",
                    "load_ensemble", "load_model")


def __getattr__(name):
  if name in _PREDICTOR_NAMES:
    return getattr(importlib.import_module("scoat_jax.inference.predictor"), name)
  raise AttributeError(f"module 'scoat_jax.inference' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_PREDICTOR_NAMES))
