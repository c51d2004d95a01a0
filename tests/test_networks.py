"""Every registered network: shapes over sizes and heads, bad sizes, bfloat16, configs, overfitting.

Each network's own file tests its parameter count against its reference and
its wiring (test_models.py, test_models_unet.py, test_models_resnet.py,
test_models_unet_pp_att.py); this file holds what all of them must do alike.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scoat_jax import models
from scoat_jax.configs import default
from scoat_jax.data.phantom import anatomy
from scoat_jax.training import losses

TINY = (4, 8, 16, 32, 64)
NAMES = models.available_models()
# Output stride 8: their logits are a 1/8-resolution map, up-sampled. At 32 px (a 4x4 map) the
# best such map cannot halve the phantom loss; at 64 px it can.
COARSE = {"fcn", "pspnet", "deeplabv3"}
TABLES = {
    "table2": {"scoat_net", "fcn", "unet", "unet_pp", "pspnet", "deeplabv3", "attention_unet"},
    "table3": {"unet_pp", "unet_pp_att_v1", "unet_pp_att_v2", "unet_pp_att_v3", "scoat_net"},
}


def _build(name, **kwargs):
  return models.get_model(name, widths=TINY, **kwargs)


def _init_shapes(model, size, channels=1):
  x = jnp.zeros((2, size, size, channels))
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)


def test_the_registry_holds_every_network_of_tables_ii_and_iii():
  assert set(NAMES) == set().union(*TABLES.values())
  for name in NAMES:
    assert models.model_class(name).__doc__, name


@pytest.mark.parametrize("name", NAMES)
def test_output_shapes_over_sizes_and_heads(name):
  heads = models.has_heads(name)
  for size in (32, 64):
    model = _build(name, num_classes=3, **({"deep_supervision": True} if heads else {}))
    x = jnp.zeros((2, size, size, 1))
    variables = _init_shapes(model, size)
    out = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
    outs = out if heads else [out]
    assert len(outs) == (4 if heads else 1)
    for o in outs:
      assert o.shape == (2, size, size, 3) and o.dtype == jnp.float32
  # A rectangular slice works too (height and width are separate).
  model = _build(name)
  x = jnp.zeros((1, 32, 64, 1))
  out = jax.eval_shape(functools.partial(model.apply, train=False),
                       jax.eval_shape(functools.partial(model.init, train=False),
                                      jax.random.key(0), x), x)
  assert out.shape == (1, 32, 64, 1)


@pytest.mark.parametrize("name", NAMES)
def test_a_size_the_network_cannot_take_is_a_clear_error(name):
  model = _build(name)
  multiple = models.model_class(name).input_multiple
  bad = 2 * multiple + multiple // 2
  with pytest.raises(ValueError, match=f"divisible by {multiple}.*{bad}x{bad}"):
    _init_shapes(model, bad)
  with pytest.raises(ValueError, match="NHWC"):
    jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                   jnp.zeros((32, 32, 1)))


def _init(model, x, seed=0):
  """He-normal kernels, zero biases, unit BN scales and variances, from the variables' shapes.

  Building them with `model.init` compiles the initialisers' random-number
  kernels (tens of seconds per network on 2 cores); these tests need typical
  weights, not the networks' exact initialisation (which the per-network
  files test).
  """
  rng = np.random.default_rng(seed)
  def fill(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(0, np.sqrt(2 / fan_in), leaf.shape), leaf.dtype)
    if name in ("scale", "var"):
      return jnp.ones(leaf.shape, leaf.dtype)
    if name in ("bias", "mean"):
      return jnp.zeros(leaf.shape, leaf.dtype)
    return jnp.asarray(rng.normal(0, 0.1, leaf.shape), leaf.dtype)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_logits_are_close_and_attention_maps_are_sown(name):
  """One compiled program: float32 logits with the sown maps, and the bfloat16 logits."""
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 1))
  model, bf16 = _build(name), _build(name, dtype=jnp.bfloat16)
  variables = _init(model, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables["params"]))

  @jax.jit
  def both(v, x):
    ref, state = model.apply(v, x, train=False, mutable=["intermediates"])
    return ref, bf16.apply(v, x, train=False), state.get("intermediates", {})

  ref, low, sown = both(variables, x)
  assert low.dtype == jnp.float32
  # bfloat16 keeps 8 significant bits: through these random-weight networks the logits
  # differ from float32 by 1-3% (relative L2), 7% for V1, whose (1 + M) * T products
  # compound the rounding at every attended node.
  rel = float(jnp.linalg.norm(low - ref) / jnp.linalg.norm(ref))
  assert rel < 0.1, rel
  names = models.model_class(name).attention_maps
  for path in names:
    tree = sown
    for part in path.split("/"):
      tree = tree[part]
    (a,) = tree["attention"]
    assert a.ndim == 4 and a.shape[0] == 2 and a.shape[-1] == 1, (path, a.shape)
    assert 32 % a.shape[1] == 0 and float(a.min()) >= 0 and float(a.max()) <= 1
  if not names:
    assert not jax.tree_util.tree_leaves(sown)


@pytest.mark.parametrize("name", NAMES)
def test_the_config_builds_each_network_with_its_options(name):
  config = default.get_config(name)
  config.model.widths = TINY
  assert config.model_name == name
  model = models.create_model(config)
  assert isinstance(model, models.model_class(name))
  assert tuple(model.widths) == TINY
  if models.has_heads(name):
    assert models.deep_supervision_mode(config) == "mean" and model.deep_supervision
  else:
    assert models.deep_supervision_mode(config) == "none"
    config.deep_supervision = "mean"
    with pytest.raises(models.ModelConfigError, match="has one head"):
      models.create_model(config)
  # Widths left at None: the network's own (paper) widths.
  full = models.create_model(default.get_config(name))
  assert full.widths == models.model_class(name).widths


@functools.lru_cache(maxsize=2)
def _phantom_batch(size=32):
  """Two phantom slices with opacity, windowed to [0, 1] (the network input), and their masks."""
  scan = anatomy.generate_scan(0, 3, 1, shape=(12, size, size))  # the largest lesions
  z = np.argsort([-(s > 0).sum() for s in scan.label])[:2]
  x = np.clip((scan.hu[z].astype(np.float32) + 1250.0) / 1500.0, 0, 1)[..., None]
  y = (scan.label[z] > 0).astype(np.float32)[..., None]
  assert y.sum() > 10, "the phantom slices must show opacity"
  return jnp.asarray(x), jnp.asarray(y)


@pytest.mark.parametrize("name", NAMES)
def test_each_network_overfits_one_tiny_phantom_batch(name):
  x, y = _phantom_batch(64 if name in COARSE else 32)
  # Twice the tiny widths: at 4 channels the one-head U-Nets need ~120 steps to halve the loss.
  model = models.get_model(name, widths=tuple(2 * w for w in TINY))
  variables = _init(model, x)
  params, batch_stats = variables["params"], variables["batch_stats"]
  loss_fn = losses.get_loss("bce_dice", alpha=0.5)
  tx = optax.adam(1e-2)  # the paper's learning rate

  @jax.jit
  def step(params, batch_stats, opt_state, rng):
    def objective(p):
      logits, new = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"], rngs={"dropout": rng})
      return loss_fn(logits, y), new["batch_stats"]
    (loss, batch_stats), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  opt_state = tx.init(params)
  history = []
  for k in range(60):
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state,
                                                jax.random.key(k))
    history.append(float(loss))
  assert np.all(np.isfinite(history))
  assert history[-1] < 0.5 * history[0], (history[0], history[-1])
