"""``decathlete demo``: the pipeline end to end on the built-in synthetic dataset (or on ``--data DATASET``).

The stages that exist so far run: generate data → validate → plan → preprocess. Training, prediction and
evaluation join as they land (see the issues), each through :mod:`decathlete.api`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from decathlete import api
from decathlete.synthetic import make_synthetic_dataset


def run_demo(workdir: str | Path = "demo_work", data: str | Path | None = None, quick: bool = False,
             workers: int = 2) -> dict[str, Any]:
    """Run the pipeline; returns a dict of what each stage produced and how long it took (seconds)."""
    workdir = Path(workdir)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if data is None:
        data = make_synthetic_dataset(workdir / "raw", n_cases=8 if quick else 24)
        print(f"synthetic dataset written to {data}")
    timings["data"] = time.perf_counter() - start
    problems = api.validate(data, workers=workers)
    if problems:
        raise SystemExit("\n".join(str(p) for p in problems))
    timings["validate"] = time.perf_counter() - start - sum(timings.values())
    plans = api.plan(data, workdir, workers=workers)
    timings["plan"] = time.perf_counter() - start - sum(timings.values())
    configs = ["3d_fullres"] if quick else None
    summary = api.preprocess(workdir, configs, workers=workers)
    timings["preprocess"] = time.perf_counter() - start - sum(timings.values())
    for name, c in plans.configurations.items():
        print(f"{name:11s} spacing {c.spacing}  patch {c.patch_size}  batch {c.batch_size}  "
              f"parameters {c.parameters / 1e6:.2f} M")
    print("seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    return {"workdir": str(workdir), "plans": plans, "preprocess": summary, "timings": timings}
