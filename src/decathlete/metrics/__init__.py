"""Segmentation metrics: overlap (Dice, IoU, ...), surface (NSD, HD95) and their summaries.

Arrays are (z, y, x) and spacings (z, y, x) mm, the array-axis order. Empty-mask conventions (never NaN, no case
dropped from a mean) are in `summary.EMPTY_MASKS`; surface definitions in `decathlete.metrics.surface`.
Folder-level scoring: `decathlete.evaluate.evaluate_folder`.
"""

from __future__ import annotations

from decathlete.metrics.overlap import overlap_metrics
from decathlete.metrics.summary import (
    EMPTY_MASKS,
    METRICS,
    aggregate,
    build_summary,
    case_metrics,
    label_metrics,
    write_summary,
)
from decathlete.metrics.surface import max_distance_mm, surface_metrics

__all__ = [
    "EMPTY_MASKS",
    "METRICS",
    "aggregate",
    "build_summary",
    "case_metrics",
    "label_metrics",
    "max_distance_mm",
    "overlap_metrics",
    "surface_metrics",
    "write_summary",
]
