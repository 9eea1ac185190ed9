"""Hyperparameter search over any recipe (``decathlete search``): spaces, samplers, the study and its outputs."""
