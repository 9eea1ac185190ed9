"""Voxel-overlap metrics of two binary masks: Dice, IoU, sensitivity, precision, confusion counts and volumes.

Masks are ``(z, y, x)`` arrays and ``spacing`` is ``(z, y, x)`` in mm (array-axis order); only the voxel volume
``prod(spacing)`` enters here.

Zero denominators (never NaN): a ratio whose denominator is 0 is 1 when BOTH masks are empty (perfect agreement on
"nothing there") and 0 when exactly one is. So Dice = IoU = 1 for two empty masks and 0 when one is empty (FLARE);
sensitivity = TP / |ref| is 0 for an empty reference with a non-empty prediction (a false-positive-only case is a
failure, not a vacuous success), and precision = TP / |pred| is 0 for an empty prediction of a non-empty reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _ratio(num: int, den: int, both_empty: bool) -> float:
    if den > 0:
        return num / den
    return 1.0 if both_empty else 0.0


def overlap_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict[str, float | int]:
    """Overlap of a predicted and a reference mask on the same grid.

    Args:
        pred, ref: boolean (or 0/1) arrays of one shape, usually (z, y, x).
        spacing: voxel size in mm, same axis order as the arrays.

    Returns:
        ``dice, iou, sensitivity, precision`` (floats in [0, 1], empty-mask convention in the module docstring),
        ``tp, fp, fn, tn, n_pred, n_ref`` (voxel counts, ints) and ``volume_pred_mm3, volume_ref_mm3``.

    Raises:
        ValueError: the masks differ in shape.
    """
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    tp = int(np.count_nonzero(pred[ref])) if n_pred and n_ref else 0
    fp, fn = n_pred - tp, n_ref - tp
    both_empty = n_pred == 0 and n_ref == 0
    voxel_mm3 = float(np.prod(np.asarray(spacing, dtype=np.float64)))
    return {
        "dice": _ratio(2 * tp, n_pred + n_ref, both_empty),
        "iou": _ratio(tp, tp + fp + fn, both_empty),
        "sensitivity": _ratio(tp, n_ref, both_empty),
        "precision": _ratio(tp, n_pred, both_empty),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": int(pred.size) - tp - fp - fn,
        "n_pred": n_pred,
        "n_ref": n_ref,
        "volume_pred_mm3": n_pred * voxel_mm3,
        "volume_ref_mm3": n_ref * voxel_mm3,
    }
