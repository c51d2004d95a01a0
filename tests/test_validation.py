"""Validation's per-case scores: the paper's six metrics and, for 3-class models, DSC per class."""
import numpy as np
import pytest

from scoat_jax.evaluation import validation


def _batches(pred_by_case, truth_by_case):
  """One batch per case: 'image' carries the prediction, which the fake predict_fn returns."""
  for k, (pred, truth) in enumerate(zip(pred_by_case, truth_by_case)):
    n = len(pred)
    yield {"image": np.asarray(pred), "mask": np.asarray(truth), "case": np.full(n, k),
           "slice_index": np.arange(n), "valid": np.ones(n, bool)}


def test_three_class_cases_get_dsc_per_class_and_undefined_ones_stay_out():
  truth_a = np.zeros((2, 4, 4), np.int32)
  truth_a[0, :2, :2] = 1                     # 4 GGO pixels
  truth_a[1, :1, :2] = 2                     # 2 consolidation pixels
  pred_a = np.zeros_like(truth_a)
  pred_a[0, :2, :1] = 1                      # 2 GGO pixels, both right: DSC 2*2/(2+4)
  pred_a[1, :1, :2] = 2                      # consolidation exact: DSC 1
  pred_a[1, 3, 3] = 1                        # a stray GGO pixel: GGO DSC 2*2/(3+4)
  truth_b = np.zeros((1, 4, 4), np.int32)
  truth_b[0, 2:, 2:] = 1
  pred_b = truth_b.copy()                    # no consolidation anywhere: undefined
  aggregate, per_case, _ = validation.evaluate(
      lambda variables, images: images, None, _batches([pred_a, pred_b], [truth_a, truth_b]),
      ["a", "b"], num_classes=3)
  a, b = per_case
  assert a["dsc_ggo"] == pytest.approx(4 / 7)
  assert a["dsc_consolidation"] == pytest.approx(1.0)
  # Any opacity: 5 predicted, 6 true, 4 shared -> 8 / 11.
  assert a["dsc"] == pytest.approx(8 / 11)
  assert b["dsc_ggo"] == pytest.approx(1.0) and b["dsc_consolidation"] is None
  assert aggregate["val_dsc_ggo"] == pytest.approx((4 / 7 + 1) / 2)
  assert aggregate["val_dsc_consolidation"] == pytest.approx(1.0)   # case a only
  assert aggregate["val_cases"] == 2


def test_one_class_cases_have_the_six_metrics_only():
  truth = np.zeros((1, 4, 4), np.int32)
  truth[0, :2, :2] = 1
  aggregate, [case], _ = validation.evaluate(lambda v, x: x, None, _batches([truth], [truth]),
                                             ["a"])
  assert set(case) == {"case_id", *validation.METRIC_NAMES}
  assert case["dsc"] == 1.0 and "val_dsc_ggo" not in aggregate
