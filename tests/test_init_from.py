"""`config.init_from` into a model of another class count (`config.init_head`).

A 1-class SCOAT-Net (sigmoid) loads into a 3-class one (softmax): with 'expand'
the 3-class model's P(opacity) = 1 - P(background) equals the 1-class model's
sigmoid on the same input, worked out by hand in `init_from`'s docstring; with
'new' every classifier keeps its fresh weights and everything else is loaded;
'same' refuses, naming the option.
"""
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoat_jax import checkpoints, models
from scoat_jax.common import parallel
from scoat_jax.configs import default
from scoat_jax.training import optimization
from scoat_jax.training.schedule import paper_schedule

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(classes, **fields):
  config = default.get_config()
  config.model.widths = (4, 8, 16, 32, 64)
  config.data.image_size = 32
  config.num_classes = classes
  config.update(fields)
  return config


def _state(config, seed):
  mesh = parallel.make_mesh(jax.devices()[:1])
  tx = optimization.create_optimizer(paper_schedule(steps_per_epoch=10))
  return optimization.create_train_state(config, models.create_model(config), tx,
                                         jax.random.key(seed), mesh)


@pytest.fixture(scope="module")
def one_class():
  state = _state(_config(1), seed=0)
  return {"params": jax.device_get(state.params), "batch_stats": jax.device_get(state.batch_stats)}


def _load(monkeypatch, one_class, head):
  monkeypatch.setattr(optimization.checkpoints, "load_variables", lambda path: (one_class, {}))
  config = _config(3, init_from="/a/one-class/run", init_head=head)
  fresh = _state(config, seed=1)
  return config, fresh, optimization.init_from(fresh, config)


def _logits(config, variables, x):
  out = models.create_model(config).apply(variables, x, train=False)
  return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


def test_expand_gives_the_one_class_models_opacity_probability(monkeypatch, one_class):
  config, _, state = _load(monkeypatch, one_class, "expand")
  x = jax.random.uniform(jax.random.key(2), (2, 32, 32, 1))
  three = _logits(config, {"params": state.params, "batch_stats": state.batch_stats}, x)
  one = _logits(_config(1), one_class, x)
  assert len(three) == len(one) and three[0].shape[-1] == 3
  for z3, z1 in zip(three, one):
    opacity = 1 - np.asarray(jax.nn.softmax(jnp.asarray(z3), axis=-1))[..., 0]
    np.testing.assert_allclose(opacity, np.asarray(jax.nn.sigmoid(z1))[..., 0], atol=1e-5)
    np.testing.assert_allclose(z3[..., 1], z3[..., 2], atol=1e-6)   # the split starts even


def test_new_keeps_fresh_classifiers_and_loads_the_rest(monkeypatch, one_class):
  _, fresh, state = _load(monkeypatch, one_class, "new")
  flat = lambda t: dict(jax.tree_util.tree_flatten_with_path(jax.device_get(t))[0])
  loaded, before, source = flat(state.params), flat(fresh.params), flat(one_class["params"])
  heads = [k for k in loaded if np.shape(loaded[k]) != np.shape(source[k])]
  assert heads and all(np.shape(loaded[k])[-1] == 3 for k in heads)
  for k, value in loaded.items():
    np.testing.assert_array_equal(value, before[k] if k in heads else source[k])


def test_same_refuses_another_class_count_and_names_the_option(monkeypatch, one_class):
  with pytest.raises(checkpoints.CheckpointError, match="init_head=new or expand"):
    _load(monkeypatch, one_class, "same")


def test_a_bad_init_head_is_refused(monkeypatch, one_class):
  with pytest.raises(checkpoints.CheckpointError, match="choose one of same, new, expand"):
    _load(monkeypatch, one_class, "widen")


def test_main_refuses_init_head_without_init_from_and_writes_nothing(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "scoat_jax.main", "--config=scoat_jax/configs/demo.py",
       "--config.batch_size=4", "--config.init_head=expand", f"--workdir={tmp_path / 'run'}"],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert proc.returncode == 2 and len(errors) == 1 and "config.init_from" in errors[0]
  assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
