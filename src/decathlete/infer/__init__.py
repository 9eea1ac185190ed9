"""Inference: sliding window with Gaussian weights, mirroring TTA, fold ensembles, inverse preprocessing.

`Predictor` and `predict_folder` are imported lazily: they need the training modules, which in turn use the
sliding window for validation, so an eager import here would be circular.
"""

from __future__ import annotations

from typing import Any

from decathlete.infer.cases import discover_cases
from decathlete.infer.sliding_window import gaussian_importance, sliding_window_predict, tile_starts
from decathlete.infer.tta import flip_combinations, mirrored_forward

__all__ = [
    "Predictor",
    "discover_cases",
    "flip_combinations",
    "gaussian_importance",
    "mirrored_forward",
    "predict_folder",
    "sliding_window_predict",
    "tile_starts",
]


def __getattr__(name: str) -> Any:
    if name in ("Predictor", "predict_folder", "invert_preprocessing"):
        from decathlete.infer import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'decathlete.infer' has no attribute {name!r}")
