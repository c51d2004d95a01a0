"""Experiment configs (ml_collections). Load one with `--config=<file>`."""
