"""Matching the grey levels of unlabelled 8-bit scans to the labelled slices' (histogram matching).

8-bit slices carry no Hounsfield units: each source exported them through its own
window. COVID-SemiSeg's labelled slices (MedSeg) use a narrow lung window, soft
tissue white and lung mid-grey; 1049 of its 1600 unlabelled slices (the
coronacases scans) use a wide one, lung nearly black and bone visible, with a
mean grey level of about 58 against the labelled 137. A teacher trained on the
labelled slices meets those scans as a new domain, and a student trained on
them learns two.

`record_luts` gives every unlabelled scan one monotone look-up table (256 -> 256
grey levels) that maps the scan's pooled histogram onto a reference histogram,
by quantiles: level v goes to the reference level whose cumulative share
equals v's (taken at the middle of v's own bin, and interpolated between the
reference's levels). The table is per scan, not per slice, so a slice full
of opacity and one of clear lung of the same scan keep their difference.
The reference is the pooled histogram of the labelled slices a model trains
on (`fold_reference`: one fold's training cases only, so a validation slice
informs nothing, not even the grey-level mapping).

Used by `config.unlabelled.match_intensity` (the student's unlabelled slots)
and `python -m scoat_jax.pseudo_label --match_intensity` (what the teacher
sees), so teacher and student see the same matched slices.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from scoat_jax.datasets import base

LEVELS = 256


class IntensityMatchError(ValueError):
  """Grey-level matching asked of data it does not apply to; the message says why."""


def histogram(ds: base.SliceDataset, records: Iterable[int]) -> np.ndarray:
  """(256,) float64: pooled grey-level counts of the records' images (8-bit datasets)."""
  if ds.intensity != "uint8":
    raise IntensityMatchError(f"{ds.name} holds {ds.intensity} slices; grey-level matching is "
                              "for 8-bit slices (HU are already on one scale)")
  counts = np.zeros(LEVELS, np.float64)
  for r in records:
    counts += np.bincount(np.asarray(ds.source[int(r)]["image"], np.uint8).ravel(),
                          minlength=LEVELS)
  return counts


def lut(source_hist: np.ndarray, reference_hist: np.ndarray) -> np.ndarray:
  """(256,) uint8: the monotone table that maps `source_hist` onto `reference_hist`.

  Level v of the source, at cumulative share c(v) (the middle of its bin),
  goes to the reference level at that share, linearly between the
  reference's occupied levels' middles; levels the source never uses follow
  their neighbours. Identical histograms give the identity on occupied levels.
  """
  src = np.asarray(source_hist, np.float64)
  ref = np.asarray(reference_hist, np.float64)
  if src.shape != (LEVELS,) or ref.shape != (LEVELS,) or src.sum() <= 0 or ref.sum() <= 0:
    raise IntensityMatchError("histograms must be 256 non-negative counts, not all zero")
  c_src = (np.cumsum(src) - src / 2) / src.sum()
  c_ref = (np.cumsum(ref) - ref / 2) / ref.sum()
  occupied = ref > 0
  out = np.interp(c_src, c_ref[occupied], np.arange(LEVELS)[occupied])
  return np.clip(np.rint(out), 0, LEVELS - 1).astype(np.uint8)


def fold_reference(ds: base.SliceDataset, fold, num_folds: int, fold_seed: int,
                   slices: str = "all") -> np.ndarray:
  """Pooled histogram of one fold's training slices of the labelled dataset `ds`.

  The slices are those the fold trains on: its training cases (the split of
  `data/folds.py`, as training draws it) and, of those, the ones the
  `data.slices` filter keeps (`base.keep_slice`).
  """
  return histogram(ds, ds.fold_records(fold, num_folds, fold_seed, slices))


def record_luts(ds: base.SliceDataset, reference_hist: np.ndarray) -> np.ndarray:
  """(num_records, 256) uint8: each record's scan's table onto `reference_hist`, in record order."""
  out = np.empty((ds.num_records, LEVELS), np.uint8)
  for s in ds.scans:
    out[s.start:s.start + s.count] = lut(histogram(ds, range(s.start, s.start + s.count)),
                                         reference_hist)
  return out
