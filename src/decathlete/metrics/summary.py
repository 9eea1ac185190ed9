"""Per-case metrics for labels and regions, means over cases, and the ``summary.json`` / CSV / box-plot outputs.

A label is one value; a region (nnU-Net, e.g. BraTS whole tumour ``[1, 2, 3]``) is a list of values whose union is
the mask. Means are plain means over ALL cases: the metrics never return NaN (empty-mask conventions in
``EMPTY_MASKS``), and a non-finite value raises instead of being dropped. ``foreground_mean`` is the mean over
labels of the per-label means.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from decathlete.io.atomic import write_atomic, write_json_atomic
from decathlete.metrics.overlap import overlap_metrics
from decathlete.metrics.surface import surface_metrics

METRICS = (
    "dice", "iou", "nsd", "hd95", "sensitivity", "precision", "tp", "fp", "fn", "tn",
    "n_pred", "n_ref", "volume_pred_mm3", "volume_ref_mm3",
)  # fmt: skip
DEFAULT_NSD_TOLERANCE_MM = 1.0
ANY_LABEL = "*"  # key of the tolerance of every label a tolerance dict does not name
EMPTY_MASKS = (
    "FLARE convention, never NaN, no case dropped from a mean. Both prediction and reference empty: dice = iou = "
    "nsd = sensitivity = precision = 1, hd95 = 0. Exactly one empty: dice = iou = nsd = 0, hd95 = diagonal of the "
    "image's physical extent (norm(shape * spacing) mm, the largest possible distance). Generally a ratio with a "
    "zero denominator is 1 when both masks are empty and 0 otherwise (sensitivity = 0 for an empty reference with "
    "a non-empty prediction; precision = 0 for an empty prediction of a non-empty reference)."
)
NSD_DEFINITION = (
    "DeepMind surface-distance / MONAI compute_surface_dice(use_subvoxels=True): area-weighted surfels at voxel "
    "corners; distance <= tolerance counts as within"
)
HD95_DEFINITION = (
    "MONAI compute_hausdorff_distance(percentile=95): max of the two directed 95th percentiles (linear "
    "interpolation) of distances between surface voxel centres (mask XOR 6-connected erosion), in mm"
)

LabelSpec = Mapping[str, int | Sequence[int]]


def normalize_labels(labels: LabelSpec) -> dict[str, tuple[int, ...]]:
    """``{name: value or [values]}`` -> ``{name: (values,)}``; raises ValueError for empty or non-integer values."""
    out: dict[str, tuple[int, ...]] = {}
    for name, value in labels.items():
        values = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
        if not values or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in values):
            raise ValueError(f"label {name!r}: expected an integer or a non-empty list of integers, got {value!r}")
        out[str(name)] = tuple(int(v) for v in values)
    return out


def resolve_tolerances(names: Sequence[str], nsd_tolerance_mm: Mapping[str, float] | float) -> dict[str, float]:
    """NSD tolerance (mm) per label name: one number for all, or a dict (missing names get the ``"*"`` entry, else
    1 mm, FLARE's default).

    Raises:
        ValueError: a dict names an unknown label (a typo would otherwise silently fall back to the default),
            or a tolerance is negative or not finite.
    """
    if isinstance(nsd_tolerance_mm, Mapping):
        if unknown := sorted(set(nsd_tolerance_mm) - set(names) - {ANY_LABEL}):
            raise ValueError(f"NSD tolerances given for unknown labels {unknown}; labels are {list(names)}")
        default = nsd_tolerance_mm.get(ANY_LABEL, DEFAULT_NSD_TOLERANCE_MM)
        tol = {n: float(nsd_tolerance_mm.get(n, default)) for n in names}
    else:
        tol = {n: float(nsd_tolerance_mm) for n in names}
    if bad := {n: t for n, t in tol.items() if not (math.isfinite(t) and t >= 0)}:
        raise ValueError(f"NSD tolerances must be finite and >= 0 mm, got {bad}")
    return tol


def label_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM
) -> dict[str, float | int]:
    """All of `METRICS` for one binary (z, y, x) prediction/reference pair; `spacing` is (z, y, x) mm."""
    result: dict[str, float | int] = dict(overlap_metrics(pred, ref, spacing))
    result.update(surface_metrics(pred, ref, spacing, tolerance_mm))
    return {k: result[k] for k in METRICS}


def both_empty_metrics(n_voxels: int) -> dict[str, float | int]:
    """`label_metrics` of two empty masks of `n_voxels` voxels, without building them."""
    empty = np.zeros((1, 1, 1), dtype=bool)
    result = label_metrics(empty, empty, (1.0, 1.0, 1.0))
    result["tn"] = int(n_voxels)
    return result


def case_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    labels: LabelSpec,
    nsd_tolerance_mm: Mapping[str, float] | float = DEFAULT_NSD_TOLERANCE_MM,
    ignore_label: int | None = None,
) -> dict[str, dict[str, float | int]]:
    """Metrics of every label or region of one case.

    Args:
        pred, ref: integer label maps (z, y, x) on the same grid.
        spacing: voxel size (z, y, x) in mm, array-axis order.
        labels: name -> value or list of values (region = union of the values).
        nsd_tolerance_mm: NSD tolerance in mm, for all labels or per label name.
        ignore_label: reference value of unannotated voxels (nnU-Net v2's ignore label), or None. Those voxels
            count nowhere, as in nnU-Net's ``compute_metrics``: the prediction there is dropped from both masks
            (so also from the surfaces of NSD and HD95) and from ``tn``.

    Returns:
        ``{name: {metric: value}}`` in the order of `labels`.
    """
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    spec = normalize_labels(labels)
    tol = resolve_tolerances(list(spec), nsd_tolerance_mm)
    valid = None if ignore_label is None else ref != ignore_label
    n_ignored = 0 if valid is None else int(valid.size - np.count_nonzero(valid))
    out = {}
    for name, values in spec.items():
        p = pred == values[0] if len(values) == 1 else np.isin(pred, values)
        r = ref == values[0] if len(values) == 1 else np.isin(ref, values)
        if n_ignored:
            p &= valid
            r &= valid
        out[name] = label_metrics(p, r, spacing, tol[name])
        out[name]["tn"] = int(out[name]["tn"]) - n_ignored
    return out


def aggregate(per_case: Sequence[Mapping[str, Any]]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """``(mean, foreground_mean)`` of `per_case` entries ``{"case": id, "metrics": {label: {metric: value}}}``.

    Raises:
        ValueError: no cases, cases with different labels, or a non-finite value (never dropped silently).
    """
    if not per_case:
        raise ValueError("no cases to aggregate")
    names = list(per_case[0]["metrics"])
    mean: dict[str, dict[str, float]] = {}
    for name in names:
        mean[name] = {}
        for metric in METRICS:
            values = []
            for case in per_case:
                if name not in case["metrics"]:
                    raise ValueError(f"case {case['case']!r} has no metrics for label {name!r}")
                v = float(case["metrics"][name][metric])
                if not math.isfinite(v):
                    raise ValueError(f"case {case['case']!r}, label {name!r}: {metric} = {v}")
                values.append(v)
            mean[name][metric] = float(np.mean(values))
    foreground = {m: float(np.mean([mean[n][m] for n in names])) for m in METRICS} if names else {}
    return mean, foreground


def build_summary(
    per_case: Sequence[Mapping[str, Any]], labels: LabelSpec, tolerances: Mapping[str, float]
) -> dict[str, Any]:
    """The ``summary.json`` document (format in docs/cli-contract.md) from per-case metrics."""
    mean, foreground = aggregate(per_case)
    spec = normalize_labels(labels)
    return {
        "per_case": [dict(c) for c in per_case],
        "mean": mean,
        "foreground_mean": foreground,
        "labels": {n: v[0] if len(v) == 1 else list(v) for n, v in spec.items()},
        "conventions": {
            "nsd_tolerance_mm": dict(tolerances),
            "empty_masks": EMPTY_MASKS,
            "spacing_order": "z, y, x",
            "nsd": NSD_DEFINITION,
            "hd95": HD95_DEFINITION,
            "mean": "per label: mean over all cases; foreground_mean: mean over labels of the per-label means",
        },
    }


def _csv_text(summary: Mapping[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", "label", *METRICS])
    for case in summary["per_case"]:
        for name, m in case["metrics"].items():
            writer.writerow([case["case"], name, *(m[k] for k in METRICS)])
    return buf.getvalue()


_UNITS = {"hd95": "mm", "volume_pred_mm3": "mm^3", "volume_ref_mm3": "mm^3"} | {
    k: "voxels" for k in ("tp", "fp", "fn", "tn", "n_pred", "n_ref")
}


def _boxplot(summary: Mapping[str, Any], metric: str, path: Path) -> None:
    # Figure without pyplot: no global backend switch, no figure manager that would keep figures alive.
    from matplotlib.figure import Figure

    names = list(summary["mean"])
    data = [[c["metrics"][n][metric] for c in summary["per_case"]] for n in names]
    longest = max(map(len, names))
    rotate = longest * len(names) > 36  # names would overlap side by side
    fig = Figure(figsize=(max(4.0, 0.6 * len(names) + 2.0), 3.5))
    # Fixed margins: a layout engine (constrained/tight) doubles the time of these small plots.
    fig.subplots_adjust(left=0.16, right=0.97, top=0.9, bottom=min(0.5, 0.1 + 0.016 * longest) if rotate else 0.14)
    ax = fig.add_subplot()
    ax.boxplot(data)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=30 if rotate else 0, ha="right" if rotate else "center")
    ax.set_ylabel(f"{metric} ({_UNITS[metric]})" if metric in _UNITS else metric)
    ax.set_title(f"{metric} over {len(summary['per_case'])} cases")
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))


def write_summary(summary: Mapping[str, Any], output: str | Path, plots: bool = True) -> list[Path]:
    """Write `summary` to `output` (JSON), ``<output stem>.csv`` and ``boxplot_<metric>.png`` beside it, atomically.

    Returns:
        The paths written.
    """
    output = Path(output)
    write_json_atomic(output, summary)
    csv_path = output.with_suffix(".csv")
    text = _csv_text(summary)
    write_atomic(csv_path, lambda tmp: tmp.write_text(text))
    written = [output, csv_path]
    if plots and summary["mean"]:
        for metric in METRICS:
            path = output.parent / f"boxplot_{metric}.png"
            _boxplot(summary, metric, path)
            written.append(path)
    return written
