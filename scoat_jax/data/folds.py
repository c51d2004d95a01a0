"""K-fold cross-validation split by case (patient), never by slice; or every case (fold -1).

SCOAT-Net is evaluated with 5-fold cross-validation split by patient
(docs/design.md, "Training recipe"): every slice of a patient lands in the
same fold, so no validation patient was seen during training. The split is a
pure function of the set of case ids and the seed, so every host and every
resumed run agrees on it without communicating.

After cross-validation, the model one ships is trained on every case (nnU-Net's
`fold all`): fold `ALL_FOLDS` (-1, also spelt 'all' on the command line)
trains on all cases and validates on none.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# The fold that trains on every case and validates on none.
ALL_FOLDS = -1


class FoldError(ValueError):
  """A bad fold request (fold index, number of folds, or too few cases)."""


def parse_fold(fold, num_folds: int | None = None) -> int:
  """`config.data.fold` as an integer: 0, 1, ... or ALL_FOLDS for -1 and 'all'.

  The config field takes any literal (`--config.data.fold=all` arrives as the
  string 'all'); this is where every reader of the field turns it into an int.

  Args:
    fold: the configured value.
    num_folds: when given, a fold other than -1 must be in [0, num_folds).

  Raises:
    FoldError: a value that is neither an integer nor 'all', a bad
      num_folds, or a fold out of range (other negative folds included).
  """
  value = None
  if isinstance(fold, str) and fold.strip().lower() == "all":
    value = ALL_FOLDS
  elif isinstance(fold, str) and fold.strip().lstrip("+-").isdigit():
    value = int(fold.strip())
  elif isinstance(fold, (int, float, np.integer, np.floating)) and not isinstance(fold, bool):
    value = int(fold) if float(fold).is_integer() else None
  if value is None:
    raise FoldError(f"data.fold={fold!r} is not a fold; set --config.data.fold to an integer "
                    f"k >= 0 (validate on part k), or to -1 or all (train on every case)")
  if num_folds is None or value == ALL_FOLDS:
    return value
  if int(num_folds) != num_folds or num_folds < 2:
    raise FoldError(f"num_folds={num_folds!r} must be an integer >= 2; set data.num_folds to 2 "
                    "or more")
  if not 0 <= value < num_folds:
    raise FoldError(f"fold={value!r} is out of range for num_folds={num_folds}; "
                    f"set data.fold to an integer in [0, {num_folds - 1}], or to -1 (all) "
                    "to train on every case without validation")
  return value


def split_cases(case_ids: Iterable[str], fold: int | str, num_folds: int,
                seed: int) -> tuple[list[str], list[str]]:
  """Splits case ids into the training and validation cases of one fold.

  The unique ids are sorted (so the input order and the number of slices per
  case do not matter), permuted with `np.random.default_rng(seed)`, and cut
  into `num_folds` near-equal parts with `np.array_split`; part `fold` is the
  validation set. Over `fold = 0..num_folds-1` every case is validated exactly
  once.

  Fold -1 (`ALL_FOLDS`, or 'all') is the final model's: every case trains and
  none validates, so it returns (all ids, []); `num_folds` and `seed` are not
  used then (any value is accepted, so a cross-validation config needs only
  its fold changed).

  Args:
    case_ids: one id per case or per slice (duplicates are collapsed, so a
      per-slice list keeps every case's slices together).
    fold: which part is validation, in [0, num_folds); or -1 / 'all'.
    num_folds: number of parts, at least 2.
    seed: seed of the permutation.

  Returns:
    (train_ids, val_ids): sorted lists of case ids, disjoint, whose union is
    the set of input ids.

  Raises:
    FoldError: num_folds < 2, fold out of range (other negative folds
      included), fewer cases than folds, or no case at all for fold -1.
  """
  if isinstance(case_ids, (str, bytes)):
    raise FoldError(f"case_ids must be a sequence of ids, not the single string {case_ids!r}; "
                    "pass a list such as [case_id, ...]")
  ids = sorted({str(c) for c in case_ids})
  fold = parse_fold(fold, num_folds)
  if fold == ALL_FOLDS:
    if not ids:
      raise FoldError("fold=-1 (all) trains on every case, but there is no case; "
                      "check config.data.name and data_dir")
    return ids, []
  if len(ids) < num_folds:
    raise FoldError(f"{len(ids)} distinct cases cannot be split into num_folds={num_folds} folds; "
                    f"lower data.num_folds to at most {len(ids)} or add cases")
  order = np.random.default_rng(seed).permutation(len(ids))
  parts = np.array_split(order, int(num_folds))
  val = {ids[i] for i in parts[fold]}
  train_ids = [c for c in ids if c not in val]
  val_ids = [c for c in ids if c in val]
  return train_ids, val_ids
