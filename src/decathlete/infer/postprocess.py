"""Postprocessing: keep the largest connected component, for all foreground and per class, where it helps.

Chosen on cross-validation predictions as nnU-Net does, with a stricter rule: a step is kept only if it raises the
mean Dice over the classes and lowers none (nnU-Net v2 compares the foreground mean for the all-foreground step and
the one class for a per-class step). Steps, in order:

1. ``foreground``: the largest 26-connected component of all foreground (``label > 0``) is kept, the rest set to 0;
2. per class (or region), on top of what was kept: the largest component of that class is kept, the rest set to 0.

Components come from connected-components-3d (``cc3d.largest_k``), a C++ library that is ~10x faster than
``scipy.ndimage.label`` + ``bincount`` on 3D volumes; the decision is recorded with the Dice figures that justified
it in ``postprocessing.json``, which ``predict`` applies.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cc3d
import numpy as np

from decathlete.io.atomic import write_json_atomic
from decathlete.io.images import read_label

FILENAME = "postprocessing.json"
CONNECTIVITY = 26
_TOLERANCE = 1e-9


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (the mask itself when empty)."""
    if not mask.any():
        return mask
    return cc3d.largest_k(np.ascontiguousarray(mask, dtype=np.uint8), k=1, connectivity=CONNECTIVITY) > 0


def keep_largest(seg: np.ndarray, values: Sequence[int] | None) -> np.ndarray:
    """``seg`` with every voxel of ``values`` (None: all foreground) outside their largest component set to 0."""
    mask = seg > 0 if values is None else np.isin(seg, values)
    removed = mask & ~largest_component(mask)
    if not removed.any():
        return seg
    out = seg.copy()
    out[removed] = 0
    return out


def apply_postprocessing(seg: np.ndarray, spec: Mapping[str, Any] | None) -> np.ndarray:
    """Apply a ``postprocessing.json`` document (None or nothing chosen: ``seg`` unchanged)."""
    if not spec:
        return seg
    if spec.get("foreground"):
        seg = keep_largest(seg, None)
    for values in spec.get("per_class", {}).values():
        seg = keep_largest(seg, list(values))
    return seg


def load_postprocessing(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / FILENAME
    return json.loads(path.read_text()) if path.is_file() else None


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice with the FLARE convention for empty masks (both empty: 1; exactly one: 0), as `metrics` uses."""
    total = int(pred.sum()) + int(ref.sum())
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(pred & ref)) / total


def _case_dice(pred: np.ndarray, ref: np.ndarray, labels: Mapping[str, tuple[int, ...]],
               ignore_label: int | None = None) -> np.ndarray:
    """Dice per class; voxels the reference marks with ``ignore_label`` (not annotated) count nowhere."""
    if ignore_label is not None:
        annotated = ref != ignore_label
        pred, ref = pred[annotated], ref[annotated]
    return np.array([_dice(np.isin(pred, v), np.isin(ref, v)) for v in labels.values()])


def _better(trial: np.ndarray, base: np.ndarray, only: int | None = None) -> bool:
    """Raises the mean over the classes (or class index ``only``) and lowers no class."""
    if np.any(trial < base - _TOLERANCE):
        return False
    if only is not None:
        return bool(trial[only] > base[only] + _TOLERANCE)
    return bool(trial.mean() > base.mean() + _TOLERANCE)


def choose_postprocessing(pairs: Sequence[tuple[str | Path, str | Path]], labels: Mapping[str, Sequence[int] | int],
                          ignore_label: int | None = None) -> dict[str, Any]:
    """Decide the steps on ``(prediction, reference)`` files of the cross-validation (module docstring).

    One case in memory at a time: every candidate (none, foreground, each class on top of either) is scored per case
    in one pass, the decision is taken on the means, and a second pass scores the chosen combination.

    Args:
        pairs: prediction and reference label-map files, one pair per validation case.
        labels: name -> label value(s) (a region: their union).
        ignore_label: the dataset's ignore label: reference voxels holding it are scored nowhere.

    Returns:
        The ``postprocessing.json`` document: the chosen steps and the mean Dice per class before and after.
    """
    if not pairs:
        raise ValueError("no cross-validation predictions to choose postprocessing on")
    labels = {n: tuple(int(v) for v in ([vals] if isinstance(vals, int) else vals)) for n, vals in labels.items()}
    names = list(labels)
    scores: dict[str, list[np.ndarray]] = {}
    for pred_path, ref_path in pairs:
        pred, ref = read_label(pred_path)[0], read_label(ref_path)[0]
        for base_name, base in (("none", pred), ("foreground", keep_largest(pred, None))):
            scores.setdefault(base_name, []).append(_case_dice(base, ref, labels, ignore_label))
            for name, values in labels.items():
                kept = keep_largest(base, values)
                scores.setdefault(f"{base_name}+{name}", []).append(_case_dice(kept, ref, labels, ignore_label))
    mean = {k: np.mean(v, axis=0) for k, v in scores.items()}
    foreground = _better(mean["foreground"], mean["none"])
    base = "foreground" if foreground else "none"
    per_class = {n: list(labels[n]) for i, n in enumerate(names) if _better(mean[f"{base}+{n}"], mean[base], only=i)}
    spec = {"foreground": foreground, "per_class": per_class}
    after = np.mean([_case_dice(apply_postprocessing(read_label(p)[0], spec), read_label(r)[0], labels, ignore_label)
                     for p, r in pairs], axis=0) if per_class else mean[base]
    as_dict = lambda a: {n: round(float(x), 6) for n, x in zip(names, a)}  # noqa: E731
    return {**spec, "connectivity": CONNECTIVITY, "n_cases": len(pairs), "mean_dice_before": as_dict(mean["none"]),
            "mean_dice_after": as_dict(after),
            "candidates": {k: as_dict(v) for k, v in mean.items()},
            "rule": "a step is kept when it raises the mean Dice over the classes (a per-class step: that class) and "
                    "lowers no class; per-class steps are judged on top of the foreground step when it was kept"}


def reported_only(spec: Mapping[str, Any], why: str) -> dict[str, Any]:
    """``spec`` with no step applied (a recipe that forbids postprocessing): the candidates stay, for the record."""
    return {**spec, "foreground": False, "per_class": {}, "mean_dice_after": spec["mean_dice_before"], "rule": why}


def save_postprocessing(spec: Mapping[str, Any], folder: str | Path) -> Path:
    path = Path(folder) / FILENAME
    write_json_atomic(path, dict(spec))
    return path
