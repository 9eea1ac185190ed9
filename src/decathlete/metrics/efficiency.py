"""The record of what a prediction run cost, ``OUT/efficiency.json`` (written by `decathlete.infer.efficiency`):
summaries over cases, merging with an earlier run into the same folder, and the one-line description. Torch-free, so
``evaluate`` can merge the record into its summary.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from decathlete.io.atomic import write_json_atomic

EFFICIENCY_FILE = "efficiency.json"
PHASES = ("preprocess", "network", "export")


def summarise(cases: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Means (and medians of the totals) over the cases, and the largest peak memory."""
    if not cases:
        return {"n_cases": 0}
    rows = list(cases.values())
    mean = {f"mean_{k}": round(statistics.fmean(r[k] for r in rows), 4)
            for k in ("seconds", *(f"{p}_seconds" for p in PHASES), "patches")}
    flops = [r["flops"] for r in rows]
    return {"n_cases": len(rows), **mean, "median_seconds": round(statistics.median(r["seconds"] for r in rows), 4),
            "max_peak_memory_mib": max(r["peak_memory_mib"] for r in rows),
            "mean_flops": None if None in flops else statistics.fmean(flops)}


def write_efficiency(output_dir: str | Path, run: Mapping[str, Any], cases: Mapping[str, Mapping[str, Any]]) -> dict:
    """Write (atomically) ``output_dir/efficiency.json``: the run, every case, the summary. Cases of an earlier run
    into the same folder that this one did not redo are kept (with that run's record under ``earlier_runs``)."""
    path = Path(output_dir) / EFFICIENCY_FILE
    merged, earlier = dict(cases), []
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            kept = {k: v for k, v in old.get("cases", {}).items() if k not in cases}
            if kept:
                merged = {**kept, **cases}
                earlier = [*old.get("earlier_runs", []), {**old.get("run", {}), "cases": sorted(kept)}]
        except (OSError, ValueError, AttributeError):
            pass  # a damaged file from a killed run is replaced
    record = {"run": dict(run), "summary": summarise(merged), "cases": dict(sorted(merged.items())),
              **({"earlier_runs": earlier} if earlier else {})}
    write_json_atomic(path, record)
    return record


def describe(record: Mapping[str, Any]) -> str:
    """One line: seconds per case by phase, peak memory, parameters, FLOPs per patch, patches per case."""
    s, run = record["summary"], record["run"]
    if not s.get("n_cases"):
        return "efficiency: no case predicted"
    memory = "GPU" if str(run.get("device", "")).startswith("cuda") else "RSS"
    gflops = run.get("flops_per_patch")
    return (f"efficiency: {s['n_cases']} case(s), {s['mean_seconds']:.2f} s/case (preprocess "
            f"{s['mean_preprocess_seconds']:.2f}, network {s['mean_network_seconds']:.2f}, export "
            f"{s['mean_export_seconds']:.2f}), peak {memory} {s['max_peak_memory_mib']:.0f} MiB, "
            f"{run['parameters'] / 1e6:.2f} M parameters, "
            f"{'?' if gflops is None else f'{gflops / 1e9:.2f}'} GFLOPs per patch, "
            f"{s['mean_patches']:.0f} patches per case")


def efficiency_of(pred_dir: str | Path, cases: Collection[str]) -> dict[str, Any] | None:
    """The run record of ``pred_dir/efficiency.json`` and its summary over ``cases`` (those it holds), or None."""
    path = Path(pred_dir) / EFFICIENCY_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    chosen = {k: v for k, v in record.get("cases", {}).items() if k in set(cases)}
    return {"run": record.get("run", {}), "summary": summarise(chosen),
            "cases_without_record": sorted(set(cases) - set(chosen))}
