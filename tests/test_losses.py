"""Tests for scoat_jax.losses against plain NumPy (float64) formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoat_jax.training import losses

EPS = 1e-6
BINARY = ("mae", "bce", "dice", "iou", "focal", "bce_dice")


# --- Independent float64 references, written from the spec's formulas. ---

def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def ref_binary(name, x, y, **kw):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  p = np_sigmoid(x)
  # log p and log(1 - p) via logaddexp so that |x| = 40 does not round to log(0).
  log_p, log_1mp = -np.logaddexp(0.0, -x), -np.logaddexp(0.0, x)
  bce = -np.mean(y * log_p + (1 - y) * log_1mp)
  sp, sy, spy = p.sum(axis=(1, 2)), y.sum(axis=(1, 2)), (p * y).sum(axis=(1, 2))
  dice = 1 - np.mean((2 * spy + EPS) / (sp + sy + EPS))
  if name == "mae":
    return np.mean(np.abs(p - y))
  if name == "bce":
    return bce
  if name == "dice":
    return dice
  if name == "iou":
    return 1 - np.mean((spy + EPS) / (sp + sy - spy + EPS))
  if name == "focal":
    gamma, alpha = kw.get("gamma", 2.0), kw.get("alpha", 0.25)
    p_t = np.where(y == 1, p, 1 - p)
    alpha_t = np.where(y == 1, alpha, 1 - alpha)
    log_p_t = np.where(y == 1, log_p, log_1mp)
    return np.mean(-alpha_t * (1 - p_t) ** gamma * log_p_t)
  if name == "bce_dice":
    return kw.get("alpha", 0.5) * bce + dice
  raise AssertionError(name)


def ref_ce_dice(x, y, alpha=1.0):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  p = e / e.sum(axis=-1, keepdims=True)
  c = x.shape[-1]
  onehot = (y[..., None] == np.arange(c)).astype(np.float64)
  ce = -np.mean(np.log(np.sum(p * onehot, axis=-1)))
  ratios = []
  for b in range(x.shape[0]):
    for k in range(1, c):
      pk, yk = p[b, ..., k], onehot[b, ..., k]
      ratios.append((2 * (pk * yk).sum() + EPS) / (pk.sum() + yk.sum() + EPS))
  return alpha * ce + 1 - np.mean(ratios)


def random_binary(seed, shape=(3, 8, 8)):
  rng = np.random.default_rng(seed)
  x = (2.0 * rng.standard_normal(shape)).astype(np.float32)
  y = (rng.random(shape) < 0.3).astype(np.float32)
  return x, y


def assert_finite_grad(fn, x, y):
  g = jax.grad(lambda z: fn(z, y))(jnp.asarray(x))
  assert g.shape == np.shape(x)
  assert np.all(np.isfinite(np.asarray(g, np.float32)))


# --- Values against the NumPy references. ---

@pytest.mark.parametrize("name", BINARY)
@pytest.mark.parametrize("logit_channel,target_channel", [(True, False), (False, False),
                                                          (True, True), (False, True)])
def test_binary_losses_match_numpy(name, logit_channel, target_channel):
  x, y = random_binary(0)
  want = ref_binary(name, x, y)
  xx = x[..., None] if logit_channel else x
  yy = y[..., None] if target_channel else y
  got = losses.get_loss(name)(jnp.asarray(xx), jnp.asarray(yy))
  assert got.shape == () and got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", BINARY)
def test_binary_losses_jit_matches_eager(name):
  x, y = random_binary(1)
  fn = losses.get_loss(name)
  np.testing.assert_allclose(float(jax.jit(fn)(x, y)), float(fn(x, y)), rtol=1e-6)


def test_bce_gradient_is_sigmoid_minus_target():
  x, y = random_binary(2)
  g = jax.grad(losses.bce)(jnp.asarray(x), jnp.asarray(y))
  np.testing.assert_allclose(np.asarray(g), (np_sigmoid(x.astype(np.float64)) - y) / x.size,
                             rtol=1e-5, atol=1e-9)


def test_loss_options_are_bound():
  x, y = random_binary(3)
  np.testing.assert_allclose(float(losses.get_loss("bce_dice", alpha=0.3)(x, y)),
                             ref_binary("bce_dice", x, y, alpha=0.3), rtol=1e-5)
  np.testing.assert_allclose(float(losses.get_loss("focal", gamma=1.5, alpha=0.6)(x, y)),
                             ref_binary("focal", x, y, gamma=1.5, alpha=0.6), rtol=1e-5)
  # Focal with gamma 0 and alpha 1/2 is half the BCE: an identity, not a formula copy.
  np.testing.assert_allclose(float(losses.focal(x, y, gamma=0.0, alpha=0.5)),
                             0.5 * ref_binary("bce", x, y), rtol=1e-5)


@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("target_channel", [False, True])
def test_ce_dice_matches_numpy(num_classes, target_channel):
  rng = np.random.default_rng(4)
  x = (2.0 * rng.standard_normal((3, 8, 8, num_classes))).astype(np.float32)
  y = rng.integers(0, num_classes, (3, 8, 8)).astype(np.int32)
  y[0] = 0  # an image without foreground: its Dice ratios are eps / (sum p + eps)
  want = ref_ce_dice(x, y)
  got = losses.get_loss("ce_dice")(x, y[..., None] if target_channel else y)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  np.testing.assert_allclose(float(losses.get_loss("ce_dice", alpha=0.25)(x, y)),
                             ref_ce_dice(x, y, alpha=0.25), rtol=1e-5)
  np.testing.assert_allclose(float(jax.jit(losses.ce_dice)(x, y)), want, rtol=1e-5)


# --- Extremes: perfect predictions, empty targets, saturated logits. ---

@pytest.mark.parametrize("name", BINARY)
def test_perfect_prediction_gives_zero_loss_and_finite_grad(name):
  _, y = random_binary(5)
  y[1] = 0  # one image with an empty target
  x = np.where(y == 1, 40.0, -40.0).astype(np.float32)
  fn = losses.get_loss(name)
  assert abs(float(fn(x, y))) < 1e-5
  assert_finite_grad(fn, x, y)


@pytest.mark.parametrize("name", BINARY)
@pytest.mark.parametrize("kind", ["random", "all_negative", "near_empty", "all_positive", "huge"])
def test_empty_target_gives_finite_loss_and_grad(name, kind):
  x, _ = random_binary(6)
  x = {"random": x, "all_negative": np.full_like(x, -40.0),
       "all_positive": np.full_like(x, 40.0), "huge": 1e4 * np.sign(x),
       # sum(p) = 64 sigmoid(-16) ~ 7e-6 per image, comparable to eps: checks eps's value.
       "near_empty": np.full_like(x, -16.0)}[kind]
  y = np.zeros_like(x)
  fn = losses.get_loss(name)
  value = float(fn(x, y))
  assert np.isfinite(value)
  if kind == "all_negative":
    assert abs(value) < 1e-5  # predicting nothing for an empty target is perfect
  if kind in ("random", "all_positive", "near_empty"):
    np.testing.assert_allclose(value, ref_binary(name, x, y), rtol=1e-5)
  assert_finite_grad(fn, x, y)


def test_focal_gradient_finite_at_exact_saturation_for_small_gamma():
  # sigmoid(-200) is exactly 0 in float32; q ** 0.5 would have an infinite slope there.
  _, y = random_binary(10)
  x = np.where(y == 1, 200.0, -200.0).astype(np.float32)
  assert_finite_grad(lambda a, b: losses.focal(a, b, gamma=0.5), x, y)


def test_ce_dice_perfect_and_empty():
  rng = np.random.default_rng(7)
  y = rng.integers(0, 3, (3, 8, 8)).astype(np.int32)
  y[1] = 0
  x = 40.0 * np.eye(3, dtype=np.float32)[y]
  assert abs(float(losses.ce_dice(x, y))) < 1e-5
  assert_finite_grad(losses.ce_dice, x, y)
  huge = (1e4 * rng.standard_normal((3, 8, 8, 3))).astype(np.float32)
  assert np.isfinite(float(losses.ce_dice(huge, np.zeros_like(y))))
  assert_finite_grad(losses.ce_dice, huge, np.zeros_like(y))


@pytest.mark.parametrize("name", BINARY + ("ce_dice",))
def test_bfloat16_logits_give_float32_loss(name):
  x, y = random_binary(8)
  if name == "ce_dice":
    x = np.stack([x, -x, 0.5 * x], axis=-1)
    y = (y * 2).astype(np.int32)
  xb = jnp.asarray(x, jnp.bfloat16)
  fn = losses.get_loss(name)
  got = fn(xb, y)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), float(fn(xb.astype(jnp.float32), y)), rtol=1e-6)
  g = jax.grad(lambda z: fn(z, y))(xb)
  assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


# --- Shapes, names and options. ---

@pytest.mark.parametrize("x_shape,y_shape", [
    ((2, 8, 8, 3), (2, 8, 8)),     # multi-class logits to a binary loss
    ((2, 8, 8), (2, 8, 4)),        # spatial mismatch
    ((2, 8, 8, 1), (1, 8, 8)),     # batch mismatch
    ((8, 8), (8, 8)),              # no batch axis
    ((2, 8, 8, 1), (2, 8, 8, 2)),  # target with channels
])
def test_binary_shape_errors(x_shape, y_shape):
  with pytest.raises(ValueError, match="bce"):
    losses.bce(jnp.zeros(x_shape), jnp.zeros(y_shape))


def test_ce_dice_errors():
  with pytest.raises(ValueError, match="C >= 2"):
    losses.ce_dice(jnp.zeros((2, 8, 8, 1)), jnp.zeros((2, 8, 8), jnp.int32))
  with pytest.raises(ValueError, match="integer"):
    losses.ce_dice(jnp.zeros((2, 8, 8, 3)), jnp.zeros((2, 8, 8)))
  with pytest.raises(ValueError, match="target shape"):
    losses.ce_dice(jnp.zeros((2, 8, 8, 3)), jnp.zeros((2, 8, 7), jnp.int32))


def test_get_loss_errors():
  with pytest.raises(ValueError, match="bce_dice.*ce_dice"):
    losses.get_loss("dice_bce")
  with pytest.raises(ValueError, match="option"):
    losses.get_loss("dice", alpha=0.5)
  with pytest.raises(ValueError, match="alpha"):
    losses.focal(jnp.zeros((1, 2, 2)), jnp.zeros((1, 2, 2)), alpha=1.5)


# --- Deep supervision. ---

def test_deep_supervision_modes():
  rng = np.random.default_rng(9)
  heads = [(2.0 * rng.standard_normal((3, 8, 8, 1))).astype(np.float32) for _ in range(4)]
  y = (rng.random((3, 8, 8)) < 0.4).astype(np.float32)
  fn = losses.get_loss("bce_dice")
  per_head = [ref_binary("bce_dice", h[..., 0], y) for h in heads]
  np.testing.assert_allclose(float(losses.deep_supervision_loss(fn, heads, y, "mean")),
                             np.mean(per_head), rtol=1e-5)
  np.testing.assert_allclose(float(losses.deep_supervision_loss(fn, tuple(heads), y, mode="last")),
                             per_head[-1], rtol=1e-5)
  np.testing.assert_allclose(float(losses.deep_supervision_loss(fn, heads[1], y, "none")),
                             per_head[1], rtol=1e-5)
  # Bound the way the trainer binds it, and differentiated through every head.
  bound = jax.jit(lambda hs, t: losses.deep_supervision_loss(fn, hs, t, mode="mean"))
  np.testing.assert_allclose(float(bound(heads, y)), np.mean(per_head), rtol=1e-5)
  grads = jax.grad(lambda hs: losses.deep_supervision_loss(fn, hs, y, "mean"))(heads)
  assert all(np.abs(np.asarray(g)).sum() > 0 for g in grads)
  grads = jax.grad(lambda hs: losses.deep_supervision_loss(fn, hs, y, "last"))(heads)
  assert all(np.abs(np.asarray(g)).sum() == 0 for g in grads[:-1])


def test_deep_supervision_errors():
  y = np.zeros((2, 8, 8), np.float32)
  head = np.zeros((2, 8, 8, 1), np.float32)
  with pytest.raises(ValueError, match="expects a list"):
    losses.deep_supervision_loss(losses.bce, head, y, "mean")
  with pytest.raises(ValueError, match="expects one logits array"):
    losses.deep_supervision_loss(losses.bce, [head, head], y, "none")
  with pytest.raises(ValueError, match="empty"):
    losses.deep_supervision_loss(losses.bce, [], y, "last")
  with pytest.raises(ValueError, match="different shapes"):
    losses.deep_supervision_loss(losses.bce, [head, head[:1]], y, "mean")
  with pytest.raises(ValueError, match="mode"):
    losses.deep_supervision_loss(losses.bce, head, y, "sum")
