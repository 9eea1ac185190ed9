"""Calibrate the planner's CPU memory estimate: peak RSS of real CPU training steps at several patch sizes.

Each point runs in a fresh process (peak RSS, ``ru_maxrss``, is per process and never goes down): import, plan a
fake large-image fingerprint with the patch and batch fixed by recipe overrides, then the very training step the
trainer runs (`decathlete.train.probe.time_step`: augmentation of a random batch, forward, loss, backward, clipping,
optimiser step; 2 steps, so the optimiser's momentum buffers exist, then the validation forwards). Recorded per
point: RSS after the imports, peak RSS, the network's activation elements per sample and its parameter count.

The fit, per spatial dimensionality, by least squares over the points:
``peak_rss = base + bytes_per_parameter * parameters + bytes_per_element * batch * elements``; its constants are
what `decathlete.planning.memory` uses, and each row gets the planner's estimate beside its measurement.
``--rows FILE`` refits and re-estimates the rows of an earlier result without measuring again.

    python benchmarks/cpu_memory_calibration.py --out benchmarks/results/cpu_memory_calibration.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GIB = 1024**3
# (recipe, dims, patch, batch, network planned for this patch or None): two widths (tiny's 8 and nnU-Net's 32 base
# features), sizes a 2-core CPU trains in about a minute per point. Within one width the parameters grow with the
# patch, so the parameter term would hide in the others; the last point of each dimensionality trains the deep, wide
# network planned for a large patch on a small one, which separates it.
POINTS = [
    ("tiny", 3, [64, 64, 64], 2, None), ("tiny", 3, [96, 96, 96], 2, None), ("tiny", 3, [128, 128, 128], 2, None),
    ("default", 3, [48, 48, 48], 2, None), ("default", 3, [64, 64, 64], 2, None), ("default", 3, [80, 80, 80], 2, None),
    ("default", 3, [64, 64, 64], 2, [160, 160, 160]),
    ("tiny", 2, [256, 256], 4, None), ("tiny", 2, [512, 512], 4, None),
    ("default", 2, [192, 192], 4, None), ("default", 2, [320, 320], 4, None),
    ("default", 2, [256, 256], 4, [512, 512]),
]
FINGERPRINT_SHAPE = (256, 512, 512)  # larger than every patch, so the fixed patch is never clipped
DATASET = {"name": "calibration", "channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2},
           "label_values": [0, 1, 2]}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure_point(recipe_name: str, dims: int, patch: list[int], batch: int, network_patch: list[int] | None) -> dict:
    """One point, in this process: RSS after imports, peak RSS after two training steps, and the network's size."""
    from dataclasses import replace

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from decathlete.planning import rules
    from decathlete.recipes.base import resolve_recipe
    from decathlete.registry import get
    from decathlete.train.probe import time_step
    from test_planning import fake_fingerprint

    rss_import = _rss()
    recipe = resolve_recipe(recipe_name, [f"planning.patch_size_{dims}d={json.dumps(network_patch or patch)}",
                                          f"planning.batch_size={batch}"])
    plans = rules.plan_nnunet(fake_fingerprint(FINGERPRINT_SHAPE, (1.0, 1.0, 1.0), n_cases=4), DATASET, recipe)
    plans.configurations = {k: v for k, v in plans.configurations.items() if k in ("2d", "3d_fullres")}
    config = replace(plans.configurations["3d_fullres" if dims == 3 else "2d"], patch_size=list(patch))
    kwargs = config.network.kwargs
    elements = get("nets", config.network.name).feature_map_elements(config.patch_size, 1, 3, **kwargs)
    start = time.perf_counter()
    timing = time_step(config, plans, torch.device("cpu"), recipe, steps=1, warmup=1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"recipe": recipe_name, "dims": dims, "patch": config.patch_size, "batch": config.batch_size,
            "network_planned_for": network_patch or patch,
            "elements_per_sample": int(elements), "parameters": int(config.parameters),
            "rss_import_gb": round(rss_import / GIB, 4), "peak_rss_gb": round(peak / GIB, 4),
            "step_seconds": round(timing["step_seconds"], 2), "seconds": round(time.perf_counter() - start, 1),
            "estimate_gb": None}


def fit(rows: list[dict]) -> dict:
    """Least-squares ``peak = base + a * parameters + b * batch * elements`` (bytes) over ``rows``."""
    x = np.array([[1.0, r["parameters"], r["batch"] * r["elements_per_sample"]] for r in rows])
    y = np.array([r["peak_rss_gb"] * GIB for r in rows])
    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    predicted = x @ coef
    return {"base_gb": round(coef[0] / GIB, 4), "bytes_per_parameter": round(coef[1], 2),
            "bytes_per_element": round(coef[2], 3),
            "max_relative_error": round(float(np.max(np.abs(predicted - y) / y)), 4)}


def run_points(points: list[tuple]) -> list[dict]:
    rows = []
    for point in points:
        out = subprocess.run([sys.executable, __file__, "--point", json.dumps(point)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def add_estimates(rows: list[dict]) -> None:
    """The planner's CPU estimate for each measured point (after the constants are in `planning.memory`)."""
    from decathlete.planning.memory import cpu_ram_gb

    for r in rows:
        r["estimate_gb"] = round(cpu_ram_gb(r["parameters"], r["elements_per_sample"], r["batch"], r["dims"]), 4)
        r["estimate_over_measured"] = round(r["estimate_gb"] / r["peak_rss_gb"], 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--point", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="write the rows and the fits as JSON")
    parser.add_argument("--rows", type=Path, help="an earlier result whose rows to refit instead of measuring")
    args = parser.parse_args()
    if args.point:
        print(json.dumps(measure_point(*json.loads(args.point))))
        return
    import torch

    rows = json.loads(args.rows.read_text())["rows"] if args.rows else run_points(POINTS)
    fits = {f"{d}d": fit([r for r in rows if r["dims"] == d]) for d in (2, 3)}
    add_estimates(rows)
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                          "torch_threads": torch.get_num_threads()},
              "fits": fits, "rows": rows}
    print(json.dumps(fits, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
