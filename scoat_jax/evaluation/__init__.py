"""Evaluation: the paper's six metrics, validation over a fold, cross-validation reports."""
