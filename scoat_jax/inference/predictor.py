"""Inference core: trained checkpoints -> labels and probabilities on each slice's own grid.

    models = inference.load_ensemble(["runs/fold0", "runs/fold1"])   # validated
    predictor = inference.Predictor(models, tta=True)
    labels, prob = predictor.predict_volume(ct.hu)               # (z, y, x)

Every slice goes through exactly the preprocessing of training
(`preprocess.prepare_slice`: `intensity.normalize` with the model's HU
window, then the letterbox warp to `config.data.image_size`), then through
one jitted forward pass whose batch is sharded over this process's devices
(`Mesh(devices, ('data',))`, variables replicated). Predictions go back to the
slice's own grid by the inverse of the letterbox warp: nearest neighbour for
labels, linear for probabilities.

Memory is bounded by the batch, not the scan: slices are pulled from an
iterator `batch_size` at a time, and at most two batches are in flight (the
host prepares batch k + 1 and un-warps batch k - 1 while the devices run
batch k). Only the (z, y, x) outputs grow with the scan.

A model trained on 8-bit exports (`LoadedModel.intensity == 'uint8'`) gets
HU slices as such an export would show them: windowed by the window
estimated from its exports (`data.export_window`) and rounded to 0..255,
then normalised as its 8-bit training slices were.

Several checkpoints (a fold ensemble) average their probabilities; they must
share the input size, classes and HU window (folds of one config do). Flip
test-time augmentation averages the prediction of the slice and of its
left-right mirror (mirrored back), the flip used in training augmentation.

Probabilities: one class -> sigmoid of the last head (or the mean of the four
deep-supervision heads when `config.predict_average_heads`); three classes ->
softmax. The returned probability map is P(any opacity): the sigmoid, or
1 - P(background). Labels: p > 0.5 (one class) or the argmax (three), or
P(opacity) > `config.predict_threshold` where a model sets one.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from scoat_jax.common import parallel
from scoat_jax.data import preprocess
from scoat_jax.data.intensity import hu_to_uint8, normalize
from scoat_jax.inference.loading import InferenceError, LoadedModel
from scoat_jax.models import outputs

# Slices per device and forward pass when no batch size is given. On a CPU one
# slice at a time is fastest and lightest (full model, 512 px, 2 cores: 4.7 s
# and 1.5 GB per slice at 1, 5.3 s and 3.6 GB at 4, 5.8 s and 6.8 GB at 8);
# accelerators want bigger batches.
SLICES_PER_DEVICE = {"cpu": 1}
SLICES_PER_ACCELERATOR = 8


# ----------------------------------------------------------------------------- forward pass

@functools.lru_cache(maxsize=16)
def _forward_fn(models: tuple[nn.Module, ...], average_heads: tuple[bool, ...], num_classes: int,
                tta: bool, mesh, threshold: float | None = None) -> Callable:
  """A jitted `(variables tuple, images (B,S,S,1)) -> (labels uint8, P(opacity) float32)`.

  Cached, so every Predictor of the same models, options and devices shares
  one compiled program.
  """
  def probs(variables, images):
    total = 0.0
    for model, v, avg in zip(models, variables, average_heads):
      total = total + outputs.probabilities(model.apply(v, images, train=False),
                                     num_classes=num_classes, average_heads=avg)
      if tta:
        flipped = model.apply(v, images[:, :, ::-1], train=False)
        total = total + outputs.probabilities(flipped, num_classes=num_classes,
                                       average_heads=avg)[:, :, ::-1]
    return total / (len(models) * (2 if tta else 1))

  def forward(variables, images):
    p = probs(variables, images)
    opacity = p[..., 0] if num_classes == 1 else 1.0 - p[..., 0]
    return outputs.labels_from_probabilities(p, threshold), opacity

  data = parallel.data_sharding(mesh)
  return jax.jit(forward, in_shardings=(parallel.replicated(mesh), data),
                 out_shardings=(data, data))


def check_batch_size(batch_size: int | None) -> None:
  """Raises InferenceError unless `batch_size` is None, 0 (automatic) or positive."""
  if batch_size is not None and batch_size < 0:
    raise InferenceError(f"batch_size={batch_size} must be >= 1 (or 0: automatic); "
                         "e.g. --batch_size=8")


# Of the memory a device has free, the share a batch may take (the rest: weights,
# XLA's own buffers, the host's copies of the scan and its outputs).
MEMORY_SHARE = 0.5


def _bytes_per_slice(models: Sequence[LoadedModel]) -> int | None:
  """Memory one slice takes in the forward passes of an ensemble (run one after another);
  None when a network does not state it (`inference_bytes_per_slice`)."""
  sizes = [getattr(m.model, "inference_bytes_per_slice", lambda s: None)(m.image_size)
           for m in models]
  return None if None in sizes else max(sizes)


def _free_bytes(device) -> int | None:
  """Memory `device` can still take: its allocator's limit, or the host's available RAM."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _max_batch_size(models: Sequence[LoadedModel], mesh) -> int | None:
  """The largest batch (a multiple of the device count) that fits in memory, or None if unknown."""
  devices = list(mesh.devices.flat)
  free, per_slice = _free_bytes(devices[0]), _bytes_per_slice(models)
  if free is None or per_slice is None:
    return None
  if devices[0].platform == "cpu":
    free //= len(devices)  # CPU devices share the host's memory
  per_device = max(1, int(MEMORY_SHARE * free // max(1, per_slice)))
  return per_device * len(devices)


class Predictor:
  """Batched, device-sharded inference with one model or an ensemble.

  Args:
    models: from `load_ensemble` (or one `load_model` in a list).
    tta: also predict the left-right mirrored slice and average.
    batch_size: slices per forward pass, rounded up to a multiple of the
      device count; None or 0 picks one per CPU device, 8 per accelerator.
      Memory grows with it, not with the scan.
    devices: devices to shard the batch over (default: this process's).
  """

  def __init__(self, models: Sequence[LoadedModel], *, tta: bool = False,
               batch_size: int | None = None, devices=None):
    if not models:
      raise InferenceError("Predictor needs at least one model")
    check_batch_size(batch_size)
    self.models = list(models)
    self.tta = bool(tta)
    self.mesh = parallel.make_mesh(jax.local_devices() if devices is None else devices)
    n = self.mesh.devices.size
    if not batch_size:
      platform = self.mesh.devices.flat[0].platform
      batch_size = n * SLICES_PER_DEVICE.get(platform, SLICES_PER_ACCELERATOR)
    self.batch_size = -(-int(batch_size) // n) * n
    limit = _max_batch_size(self.models, self.mesh)
    if limit is not None and self.batch_size > limit:
      logging.warning("batch_size=%d would not fit in memory (about %.1f MiB a slice); using "
                      "at most %d, the most that does.", self.batch_size,
                      _bytes_per_slice(self.models) / 2**20, limit)
      self.batch_size = limit
    first = self.models[0]
    self.image_size, self.num_classes, self.hu_window = (
        first.image_size, first.num_classes, first.hu_window)
    self.uint8_mode = first.uint8_normalization
    # A model trained on 8-bit exports reads HU as such an export: windowed, rounded to 0..255.
    self.hu_as_uint8 = first.intensity == "uint8"
    self._variables = jax.device_put(tuple(m.variables for m in self.models),
                                     parallel.replicated(self.mesh))
    self._forward = _forward_fn(tuple(m.model for m in self.models),
                                tuple(m.average_heads for m in self.models),
                                self.num_classes, self.tta, self.mesh, first.threshold)

  def _as_trained(self, image: np.ndarray, source: str) -> tuple[np.ndarray, str]:
    """HU for a model trained on 8-bit exports -> the export its window would give."""
    if source == "hu" and self.hu_as_uint8:
      return hu_to_uint8(image, self.hu_window), "uint8"
    return image, source

  def prepare(self, image: np.ndarray, source: str) -> np.ndarray:
    """One raw slice -> the (S, S) float32 network input, exactly as in training."""
    image = np.asarray(image)
    if image.ndim != 2 or min(image.shape) < 1:
      raise InferenceError(f"a slice must be a 2-D (H, W) array, got shape {image.shape}")
    image, source = self._as_trained(image, source)
    out, _ = preprocess.prepare_slice(
        image, np.zeros(image.shape, np.uint8), source=source, window=self.hu_window,
        size=self.image_size, num_classes=self.num_classes, uint8_mode=self.uint8_mode)
    return out

  def display_image(self, image: np.ndarray, source: str) -> np.ndarray:
    """A raw slice normalised to [0, 1] on its own grid, as the model sees its intensities."""
    image, source = self._as_trained(np.asarray(image), source)
    return normalize(image, source, window=self.hu_window,
                     uint8_mode=self.uint8_mode)

  def batch_for(self, count: int | None) -> int:
    """The batch for a stream of `count` slices: `batch_size`, but no more than the slices
    (rounded up to the device count), so a huge --batch_size costs nothing on a short scan."""
    if not count or count >= self.batch_size:
      return self.batch_size
    n = self.mesh.devices.size
    return -(-int(count) // n) * n

  def predict_slices(self, slices: Iterable[np.ndarray], *, source: str = "hu",
                     count: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Predicts a stream of slices, lazily, in order.

    Args:
      slices: 2-D arrays (H, W), raw intensities (HU, or 0..255 for 'uint8');
        sizes may differ from slice to slice. Consumed batch by batch.
      source: 'hu' or 'uint8' (see `scoat_jax.data.intensity`).
      count: how many slices the stream holds, when known: the batch is then
        no larger than that (`batch_for`).

    Yields:
      (labels (H, W) uint8, P(opacity) (H, W) float32) per slice, on the
      slice's own grid.
    """
    size, b = self.image_size, self.batch_for(count)
    it = iter(slices)
    pending = None
    while True:
      shapes = []
      batch = np.zeros((b, size, size, 1), np.float32)
      for image in it:
        batch[len(shapes), ..., 0] = self.prepare(image, source)
        shapes.append(np.shape(image))
        if len(shapes) == b:
          break
      # Dispatch is asynchronous: the devices run this batch while the host
      # un-warps the previous one and prepares the next.
      current = (shapes, self._forward(self._variables, batch)) if shapes else None
      if pending is not None:
        yield from self._finish(*pending)
      if current is None:
        return
      pending = current

  def _finish(self, shapes, results):
    labels, probs = (np.asarray(r) for r in results)
    for k, shape in enumerate(shapes):
      yield (preprocess.unwarp(labels[k], shape, order=0),
             preprocess.unwarp(probs[k], shape, order=1))

  def predict_volume(self, hu: np.ndarray, *, source: str = "hu", with_probability: bool = False,
                     progress: Callable[[int], None] | None = None,
                     z_range: tuple[int, int] | None = None
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """Predicts the axial slices of a (z, y, x) volume.

    Args:
      hu: (z, y, x) volume (HU for source='hu').
      source: intensity source of the voxels.
      with_probability: also return P(opacity) as float32 (z, y, x).
      progress: called with the number of slices finished after each slice.
      z_range: (z0, z1): only slices z0 <= z < z1 go through the network
        (the others are labelled 0 with probability 0); None: all of them.

    Returns:
      (labels (z, y, x) uint8, probability (z, y, x) float32 or None).
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
      raise InferenceError(f"a volume must be 3-D (z, y, x), got shape {hu.shape}")
    z0, z1 = (0, hu.shape[0]) if z_range is None else (int(z_range[0]), int(z_range[1]))
    if not 0 <= z0 <= z1 <= hu.shape[0]:
      raise InferenceError(f"z_range={z_range} is outside the volume's 0..{hu.shape[0]} slices")
    labels = np.zeros(hu.shape, np.uint8)
    prob = np.zeros(hu.shape, np.float32) if with_probability else None
    stream = self.predict_slices((hu[z] for z in range(z0, z1)), source=source, count=z1 - z0)
    for k, (lab, p) in enumerate(stream):
      labels[z0 + k] = lab
      if prob is not None:
        prob[z0 + k] = p
      if progress is not None:
        progress(k + 1)
    return labels, prob
