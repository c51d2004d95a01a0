"""K-fold cross-validation split by case (patient), never by slice.

SCOAT-Net is evaluated with 5-fold cross-validation split by patient
(docs/design.md, "Training recipe"): every slice of a patient lands in the
same fold, so no validation patient was seen during training. The split is a
pure function of the set of case ids and the seed, so every host and every
resumed run agrees on it without communicating.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class FoldError(ValueError):
  """A bad fold request (fold index, number of folds, or too few cases)."""


def split_cases(case_ids: Iterable[str], fold: int, num_folds: int,
                seed: int) -> tuple[list[str], list[str]]:
  """Splits case ids into the training and validation cases of one fold.

  The unique ids are sorted (so the input order and the number of slices per
  case do not matter), permuted with `np.random.default_rng(seed)`, and cut
  into `num_folds` near-equal parts with `np.array_split`; part `fold` is the
  validation set. Over `fold = 0..num_folds-1` every case is validated exactly
  once.

  Args:
    case_ids: one id per case or per slice (duplicates are collapsed, so a
      per-slice list keeps every case's slices together).
    fold: which part is validation, in [0, num_folds).
    num_folds: number of parts, at least 2.
    seed: seed of the permutation.

  Returns:
    (train_ids, val_ids): sorted lists of case ids, disjoint, whose union is
    the set of input ids.

  Raises:
    FoldError: num_folds < 2, fold out of range, or fewer cases than folds.
  """
  if isinstance(case_ids, (str, bytes)):
    raise FoldError(f"case_ids must be a sequence of ids, not the single string {case_ids!r}; "
                    "pass a list such as [case_id, ...]")
  ids = sorted({str(c) for c in case_ids})
  if int(num_folds) != num_folds or num_folds < 2:
    raise FoldError(f"num_folds={num_folds!r} must be an integer >= 2; set data.num_folds to 2 or more")
  if int(fold) != fold or not 0 <= fold < num_folds:
    raise FoldError(f"fold={fold!r} is out of range for num_folds={num_folds}; "
                    f"set data.fold to an integer in [0, {num_folds - 1}]")
  if len(ids) < num_folds:
    raise FoldError(f"{len(ids)} distinct cases cannot be split into num_folds={num_folds} folds; "
                    f"lower data.num_folds to at most {len(ids)} or add cases")
  order = np.random.default_rng(seed).permutation(len(ids))
  parts = np.array_split(order, int(num_folds))
  val = {ids[i] for i in parts[int(fold)]}
  train_ids = [c for c in ids if c not in val]
  val_ids = [c for c in ids if c in val]
  return train_ids, val_ids
