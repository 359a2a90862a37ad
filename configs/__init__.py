"""Experiment configs: one file per experiment, each with its launch command in the docstring."""
