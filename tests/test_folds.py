"""K-fold split by case: disjoint, complete, deterministic, never splitting a case; fold -1."""
import numpy as np
import pytest

from scoat_jax.data import folds


def _cases(n):
  return [f"P{i:03d}" for i in range(n)]


@pytest.mark.parametrize("n,k", [(5, 5), (13, 5), (7, 2), (50, 5)])
def test_each_case_validated_exactly_once(n, k):
  cases = _cases(n)
  seen = []
  for fold in range(k):
    train, val = folds.split_cases(cases, fold, k, seed=3)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(cases)
    # array_split sizes: differ by at most one.
    assert len(val) in (n // k, -(-n // k))
    seen += val
  assert sorted(seen) == sorted(cases)


def test_deterministic_and_seed_dependent():
  cases = _cases(40)
  a = folds.split_cases(cases, 1, 5, seed=0)
  assert a == folds.split_cases(list(reversed(cases)), 1, 5, seed=0)   # input order irrelevant
  assert a == folds.split_cases(cases, 1, 5, seed=0)
  assert a != folds.split_cases(cases, 1, 5, seed=1)


def test_matches_numpy_reference():
  cases = ["c", "a", "b", "e", "d", "f", "g"]
  ids = sorted(cases)
  perm = np.random.default_rng(11).permutation(len(ids))
  expected_val = sorted(ids[i] for i in np.array_split(perm, 3)[2])
  train, val = folds.split_cases(cases, 2, 3, seed=11)
  assert val == expected_val
  assert train == sorted(set(ids) - set(expected_val))


def test_slices_of_a_case_never_split():
  # One id per slice: 6 patients with 1..6 slices each.
  slice_cases = [f"P{p}" for p in range(6) for _ in range(p + 1)]
  for fold in range(3):
    train, val = folds.split_cases(slice_cases, fold, 3, seed=0)
    train_slices = [c for c in slice_cases if c in train]
    val_slices = [c for c in slice_cases if c in val]
    assert len(train_slices) + len(val_slices) == len(slice_cases)
    assert not set(train_slices) & set(val_slices)
    assert len(set(train) | set(val)) == 6


@pytest.mark.parametrize("fold,k,n,match", [
    (5, 5, 10, "fold=5 is out of range"),
    (-2, 5, 10, r"fold=-2 is out of range for num_folds=5; set data.fold to an integer in "
                r"\[0, 4\], or to -1 \(all\)"),
    (1.5, 5, 10, "data.fold=1.5 is not a fold"),
    ("last", 5, 10, "data.fold='last' is not a fold; set --config.data.fold to an integer"),
    (True, 5, 10, "data.fold=True is not a fold"),
    (0, 1, 10, "num_folds=1 must be an integer >= 2"),
    (0, 5, 4, "4 distinct cases cannot be split into num_folds=5"),
])
def test_errors(fold, k, n, match):
  with pytest.raises(folds.FoldError, match=match):
    folds.split_cases(_cases(n), fold, k, seed=0)


def test_duplicates_count_once():
  with pytest.raises(folds.FoldError, match="3 distinct cases"):
    folds.split_cases(["a", "a", "b", "c", "c", "c"], 0, 4, seed=0)
  with pytest.raises(folds.FoldError, match="single string"):
    folds.split_cases("abc", 0, 2, seed=0)


@pytest.mark.parametrize("fold", [-1, "all", "ALL", " all ", "-1", np.int64(-1), -1.0])
def test_fold_minus_one_trains_on_every_case_and_validates_none(fold):
  cases = ["P2", "P0", "P1", "P1", "P3"]   # unsorted, one case twice (two slices)
  assert folds.split_cases(cases, fold, 5, seed=0) == (["P0", "P1", "P2", "P3"], [])
  # num_folds and seed are not used: fewer cases than folds, or one fold, is fine.
  assert folds.split_cases(cases, fold, 1, seed=7) == (["P0", "P1", "P2", "P3"], [])
  assert folds.parse_fold(fold) == folds.ALL_FOLDS == -1


def test_fold_minus_one_is_the_union_of_every_fold():
  cases = _cases(11)
  train_all, _ = folds.split_cases(cases, -1, 4, seed=2)
  union = set()
  for fold in range(4):
    train, val = folds.split_cases(cases, fold, 4, seed=2)
    union |= set(train) | set(val)
  assert train_all == sorted(union) == sorted(cases)


def test_fold_minus_one_needs_a_case():
  with pytest.raises(folds.FoldError, match="there is no case"):
    folds.split_cases([], -1, 5, seed=0)


@pytest.mark.parametrize("value,want", [(0, 0), (3, 3), ("2", 2), (2.0, 2), (np.int32(1), 1)])
def test_parse_fold_integers(value, want):
  assert folds.parse_fold(value) == want and type(folds.parse_fold(value)) is int


def test_parse_fold_checks_the_range_given_num_folds():
  assert folds.parse_fold("all", 5) == -1 and folds.parse_fold(4, 5) == 4
  assert folds.parse_fold(7) == 7                          # no num_folds: no range check
  with pytest.raises(folds.FoldError, match=r"fold=5 is out of range for num_folds=5"):
    folds.parse_fold(5, 5)
  with pytest.raises(folds.FoldError, match=r"fold=-3 is out of range .* or to -1 \(all\)"):
    folds.parse_fold("-3", 5)
