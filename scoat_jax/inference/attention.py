"""Spatial attention maps of SCOAT-Net (paper Fig. 5), on the slice and as PNG overlays.

Each SAM is a one-channel gate a in (0, 1) that re-weights the up-sampled
deeper feature, `u + a * u`. The model sows every gate as
`intermediates/sam_{i}_{j}/attention` (see `scoat_jax.models.layers`) and
names the ones it exports in `attention_maps`: the paper shows those feeding
x_1_1, x_2_2 and x_1_3. Row i of the grid works at
1/2^i of the model's input size, so a map is up-sampled to the input size
(each map pixel covers a 2^i x 2^i block: grid-mode linear zoom) and then
taken back through the inverse letterbox onto the slice's own grid, where it
is overlaid (matplotlib, jet colour map).
"""
from __future__ import annotations

import functools
import pathlib

import flax.linen as nn
import jax
import matplotlib

matplotlib.use("Agg")  # files only; no display needed (servers, CI)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from scoat_jax.common import fileio  # noqa: E402
from scoat_jax.data import preprocess  # noqa: E402
from scoat_jax.inference.predictor import Predictor  # noqa: E402


def _title(name: str) -> str:
  """'sam_1_1' -> 'SAM x_1_1' (the node the gate feeds)."""
  return "SAM x_" + name[len("sam_"):] if name.startswith("sam_") else name


@functools.lru_cache(maxsize=4)
def _sam_fn(model: nn.Module):
  names = tuple(type(model).attention_maps)
  def attend(variables, images):
    _, state = model.apply(variables, images, train=False, mutable=["intermediates"])
    # sow() stores a tuple of the values sown under a name; each gate sows once.
    # A name is the '/'-separated path of the module that sowed it.
    def sown(name):
      tree = state["intermediates"]
      for part in name.split("/"):
        tree = tree[part]
      return tree["attention"][0][..., 0]
    return {name: sown(name) for name in names}
  return jax.jit(attend)


def sam_maps(model: nn.Module, variables, images) -> dict[str, np.ndarray]:
  """The attention maps a model exports (`attention_maps`) for a batch, on its grid.

  Args:
    model: a network with `attention_maps` (SCOAT-Net: the three SAM maps of Fig. 5).
    variables: its {'params', 'batch_stats'}.
    images: (B, S, S, 1) network inputs.

  Returns:
    {'sam_1_1': (B, S/2, S/2), 'sam_2_2': (B, S/4, S/4), 'sam_1_3': (B, S/2, S/2)},
    float32 in (0, 1).
  """
  maps = jax.device_get(_sam_fn(model)(variables, images))
  return {k: np.asarray(v, np.float32) for k, v in maps.items()}


def to_slice(attention_map: np.ndarray, size: int, shape: tuple[int, int]) -> np.ndarray:
  """One (h, w) map on the model grid -> (H, W) on the slice's grid, values kept in [0, 1].

  Args:
    attention_map: (h, w) with size / h an integer (a power of two).
    size: the model's input side S.
    shape: the slice's (H, W).
  """
  full = ndimage.zoom(np.asarray(attention_map, np.float32), size / attention_map.shape[0],
                      order=1, mode="nearest", grid_mode=True)
  return np.clip(preprocess.unwarp(full.astype(np.float32), shape, order=1), 0.0, 1.0)


def slice_attention(predictor: Predictor, image: np.ndarray, *,
                    source: str = "hu") -> dict[str, np.ndarray]:
  """SAM maps of the predictor's first model for one raw slice, on the slice's grid.

  Args:
    predictor: a `Predictor` (an ensemble shows its first member).
    image: (H, W) raw slice (HU or 0..255).
    source: 'hu' or 'uint8'.

  Returns:
    {name: (H, W) float32 in [0, 1]} for the model's `attention_maps`.
  """
  model = predictor.models[0]
  x = predictor.prepare(image, source)[None, :, :, None]
  maps = sam_maps(model.model, model.variables, x)
  return {k: to_slice(v[0], predictor.image_size, np.shape(image)) for k, v in maps.items()}


def save_overlay(path: str | pathlib.Path, image: np.ndarray, maps: dict[str, np.ndarray],
                 mask: np.ndarray | None = None, *, title: str = "") -> pathlib.Path:
  """Writes a PNG: the slice with the predicted outline, then each map over the slice.

  Args:
    path: output .png (written to a temporary name, then renamed).
    image: (H, W) slice normalised to [0, 1].
    maps: {name: (H, W) map in [0, 1]}, e.g. from `slice_attention`.
    mask: (H, W) predicted labels to outline on the first panel.
    title: figure title.

  Returns:
    The written path.
  """
  path = pathlib.Path(path)
  names = list(maps)
  h, w = np.shape(image)
  panel = 3.0
  fig, axes = plt.subplots(1, len(names) + 1, squeeze=False, layout="constrained",
                           figsize=(panel * (len(names) + 1) * w / max(h, w) + 1.0,
                                    panel * h / max(h, w) + 0.5))
  axes = axes[0]
  axes[0].imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
  if mask is not None and np.any(mask):
    axes[0].contour(np.asarray(mask) > 0, levels=[0.5], colors="red", linewidths=0.8)
  axes[0].set_title("slice + prediction", fontsize=9)
  for ax, name in zip(axes[1:], names):
    ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    im = ax.imshow(maps[name], cmap="jet", vmin=0, vmax=1, alpha=0.45, interpolation="bilinear")
    # The gates share one colour scale; the range says how much a map varies.
    ax.set_title(f"{_title(name)}  [{maps[name].min():.2f}, {maps[name].max():.2f}]",
                 fontsize=9)
  for ax in axes:
    ax.set_axis_off()
  if names:
    fig.colorbar(im, ax=list(axes), shrink=0.9, label="attention")
  if title:
    fig.suptitle(title, fontsize=10)
  try:
    fileio.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
  finally:
    plt.close(fig)
  return path
