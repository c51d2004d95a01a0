"""Logits -> labels (scoat_jax.models.outputs): the 0.5 rule, argmax, and a configured threshold."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoat_jax import models
from scoat_jax.configs import default
from scoat_jax.inference.loading import LoadedModel
from scoat_jax.inference.predictor import Predictor
from scoat_jax.models import outputs
from trained_checkpoint import WIDTHS


def test_one_class_threshold_hand_values():
  p = jnp.array([0.2, 0.35, 0.5, 0.51, 0.9]).reshape(1, 1, 5, 1)
  np.testing.assert_array_equal(outputs.labels_from_probabilities(p)[0, 0], [0, 0, 0, 1, 1])
  np.testing.assert_array_equal(outputs.labels_from_probabilities(p, 0.3)[0, 0], [0, 1, 1, 1, 1])


def test_three_class_threshold_hand_values():
  # P(background, GGO, consolidation) per pixel.
  p = jnp.array([[0.4, 0.35, 0.25],    # argmax: background; opacity 0.6 > 0.5: GGO
                 [0.6, 0.1, 0.3],      # argmax: background; opacity 0.4: > 0.3 only, consolidation
                 [0.2, 0.3, 0.5],      # consolidation either way
                 [0.9, 0.05, 0.05]]).reshape(1, 1, 4, 3)
  np.testing.assert_array_equal(outputs.labels_from_probabilities(p)[0, 0], [0, 0, 2, 0])
  np.testing.assert_array_equal(outputs.labels_from_probabilities(p, 0.5)[0, 0], [1, 0, 2, 0])
  np.testing.assert_array_equal(outputs.labels_from_probabilities(p, 0.3)[0, 0], [1, 2, 2, 0])


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, "high", float("nan")])
def test_bad_thresholds_are_refused(bad):
  with pytest.raises(ValueError, match="config.predict_threshold"):
    outputs.check_threshold(bad)
  assert outputs.check_threshold(None) is None and outputs.check_threshold("0.25") == 0.25


def test_predictor_uses_the_models_threshold(tmp_path):
  config = default.get_config()
  config.data.image_size, config.model.widths = 32, WIDTHS
  model = models.create_model(config)
  variables = jax.device_get(model.init(jax.random.key(0), np.zeros((1, 32, 32, 1), np.float32),
                                        train=False))
  image = np.random.default_rng(0).integers(0, 255, (32, 32)).astype(np.uint8)
  _, prob = next(Predictor([LoadedModel(tmp_path, config, model, variables, {})])
                 .predict_slices([image], source="uint8"))
  t = float(np.median(prob))        # half the pixels on each side: a threshold that matters
  config.predict_threshold = t
  labels, prob_t = next(Predictor([LoadedModel(tmp_path, config, model, variables, {})])
                        .predict_slices([image], source="uint8"))
  np.testing.assert_array_equal(prob_t, prob)
  np.testing.assert_array_equal(labels, (prob > t).astype(np.uint8))
  assert 0 < labels.sum() < labels.size
