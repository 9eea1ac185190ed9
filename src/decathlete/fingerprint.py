"""Dataset fingerprint: what the planner needs to know about the data, extracted once into ``fingerprint.json``.

Per case: spacing and shape (z, y, x), shape after cropping to the nonzero region, the fraction of voxels that crop
kept, and voxel counts per label. Per channel: foreground intensity statistics (mean, std, median, min, max, 0.5 and
99.5 percentiles) from voxels sampled inside the label foreground, as nnU-Net v2 does, pooled over the dataset; CT
normalisation clips to those percentiles.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from decathlete.io.datasets import Case, DatasetDescription
from decathlete.io.images import read_image, read_label
from decathlete.planning.plans import write_json_atomic
from decathlete.preprocess.cropping import crop_to_nonzero

# Foreground voxels sampled per channel over the dataset, the same number from every case drawn with replacement
# (nnU-Net v2's rule), so a case with a small foreground weighs as much as one with a large foreground in the CT
# clip range and statistics. nnU-Net draws 1e8 in all; 1e7 (40 MB per channel instead of 400 MB, and a tenth of the
# percentile sort) puts the 0.5/99.5 percentiles within ~2e-5 in rank of the 1e8 ones: a deliberate difference.
TOTAL_INTENSITY_SAMPLES = 10_000_000
MIN_SAMPLES_PER_CASE = 10_000


def _case_seed(case_id: str) -> int:
    return zlib.crc32(case_id.encode())


def fingerprint_case(case: Case, samples_per_case: int) -> dict[str, Any]:
    """Fingerprint one labelled case; returns JSON-safe stats plus ``samples`` (C, N) float32 for pooling."""
    data, geometry = read_image(case.images)
    seg, _ = read_label(case.label)
    values, counts = np.unique(seg, return_counts=True)
    cropped, cropped_seg, _, _ = crop_to_nonzero(data, seg)
    foreground = cropped_seg > 0
    rng = np.random.default_rng(_case_seed(case.id))
    samples, per_channel = [], []
    for channel in cropped:
        voxels = channel[foreground].astype(np.float64)
        drawn = rng.choice(voxels, samples_per_case, replace=True) if voxels.size else voxels
        samples.append(drawn.astype(np.float32))
        per_channel.append(intensity_stats(voxels))
    return {
        "id": case.id,
        "spacing": [float(s) for s in geometry.spacing],
        "shape": [int(s) for s in geometry.shape],
        "shape_after_crop": [int(s) for s in cropped.shape[1:]],
        "crop_fraction": float(np.prod(cropped.shape[1:]) / np.prod(geometry.shape)),
        "class_voxels": {str(int(v)): int(c) for v, c in zip(values, counts)},
        "intensity": per_channel,
        "samples": samples,
    }


def intensity_stats(values: np.ndarray) -> dict[str, float]:
    """Mean, std, median, min, max and the 0.5/99.5 percentiles of ``values`` (zeros when empty)."""
    if values.size == 0:
        return dict.fromkeys(("mean", "std", "median", "min", "max", "percentile_00_5", "percentile_99_5"), 0.0)
    values = values.astype(np.float64, copy=False)
    p005, median, p995 = np.percentile(values, [0.5, 50.0, 99.5])
    return {"mean": float(values.mean()), "std": float(values.std()), "median": float(median),
            "min": float(values.min()), "max": float(values.max()),
            "percentile_00_5": float(p005), "percentile_99_5": float(p995)}


def compute_fingerprint(dataset: DatasetDescription, workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Fingerprint every training case of ``dataset`` (in parallel over ``workers`` processes)."""
    cases: Sequence[Case] = dataset.training
    per_case_samples = max(MIN_SAMPLES_PER_CASE, TOTAL_INTENSITY_SAMPLES // max(len(cases), 1))
    results = _map(fingerprint_case, cases, per_case_samples, workers, progress)
    n_channels = len(dataset.channel_names)
    pooled = [np.concatenate([r["samples"][c] for r in results]) for c in range(n_channels)]
    for r in results:
        del r["samples"]
    spacings = np.array([r["spacing"] for r in results])
    cropped = np.array([r["shape_after_crop"] for r in results])
    return {
        "dataset": dataset.name,
        "n_cases": len(results),
        "channel_names": list(dataset.channel_names),
        "label_values": list(dataset.label_values),
        "median_spacing": np.median(spacings, 0).tolist(),
        "median_shape_after_crop": np.median(cropped, 0).tolist(),
        "median_crop_fraction": float(np.median([r["crop_fraction"] for r in results])),
        "foreground_intensity": [{"channel": c, "name": dataset.channel_names[c], "n_samples": int(pooled[c].size),
                                  **intensity_stats(pooled[c])} for c in range(n_channels)],
        "cases": results,
    }


def _map(fn: Any, cases: Sequence[Case], samples: int, workers: int, progress: bool) -> list[dict[str, Any]]:
    bar = tqdm(total=len(cases), desc="fingerprint", unit="case", disable=not progress)
    try:
        if workers <= 1:
            out = []
            for case in cases:
                out.append(fn(case, samples))
                bar.update()
            return out
        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(fn, case, samples) for case in cases]
            for future in futures:
                future.add_done_callback(lambda _: bar.update())
            return [f.result() for f in futures]
    finally:
        bar.close()


def save_fingerprint(fingerprint: dict[str, Any], path: str | Path) -> None:
    """Write ``fingerprint.json`` atomically."""
    write_json_atomic(path, fingerprint)
