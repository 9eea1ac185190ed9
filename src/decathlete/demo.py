"""``decathlete demo``: the whole pipeline end to end on the built-in synthetic dataset (or on ``--data DATASET``).

generate data → validate → plan 3d_fullres with the ``default`` recipe for a training budget (``FULL_BUDGET``, 4
minutes; ``QUICK_BUDGET``, 1 minute, with ``quick``), which times real training steps on the device and narrows the
network's width, batch and schedule until the run fits (`decathlete.planning.budget`) → preprocess → train fold 0
until that budget is spent → predict fold 0's held-out validation cases from their raw files → evaluate → print
Dice/NSD/HD95 and write ``report.html``. Every stage is a call of :mod:`decathlete.api` or of the module behind it,
so the demo is also the shortest tour of the code.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from decathlete import api
from decathlete.devices import resolve_device
from decathlete.io.validation import DatasetError
from decathlete.metrics.efficiency import describe
from decathlete.planning.plans import Plans
from decathlete.synthetic import make_synthetic_dataset

# Training budgets: the planner measures training steps on the device and fits the network to the budget
# (planning/budget.py), the same mechanism as `decathlete plan --time-budget`.
FULL_BUDGET = "4m"
# The budget is a cap that must hold 10 steps and a validation (`decathlete.planning.budget.check_budget_holds`):
# the quick demo's step measured ~0.2 s on a quiet 2-core CPU but 3.6-4.2 s with other work on both cores, where
# 15 s held no 10 steps and a validation (it trained 46 s); 60 s holds up to ~5 s per step.
QUICK_BUDGET = "60s"


def _held_out_links(dataset: Any, case_ids: list[str], workdir: Path) -> tuple[Path, Path]:
    """Folders of symlinks to the held-out cases' raw images and labels (the raw data itself is never touched)."""
    images, labels = workdir / "held_out" / "images", workdir / "held_out" / "labels"
    for folder in (images, labels):
        folder.mkdir(parents=True, exist_ok=True)
    by_id = {c.id: c for c in dataset.training}
    for case_id in case_ids:
        case = by_id[case_id]
        ending = case.label.name[len(case_id):]
        if len(case.images) == 1:
            links = [(case.images[0], images / f"{case_id}{ending}")]
        else:
            links = [(p, images / f"{case_id}_{i:04d}{ending}") for i, p in enumerate(case.images)]
        for source, link in [*links, (case.label, labels / f"{case_id}{ending}")]:
            if not link.exists():
                os.symlink(source, link)
    return images, labels


def run_demo(workdir: str | Path = "demo_work", data: str | Path | None = None, quick: bool = False,
             workers: int = 2, device: str = "auto") -> dict[str, Any]:
    """Run the pipeline; returns the evaluation summary, the report path and the seconds per stage."""
    from decathlete.evaluate import evaluate_folder, labels_from_dataset_json
    from decathlete.infer.predictor import predict_folder
    from decathlete.io.datasets import load_dataset
    from decathlete.report import write_report

    workdir = Path(workdir)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage], clock = now - clock, now

    resolve_device(device)  # a wrong device fails before the dataset is written
    if data is None:
        data = make_synthetic_dataset(workdir / "raw", n_cases=10 if quick else 30)
        print(f"synthetic dataset written to {data}")
    lap("data")
    problems = api.validate(data, workers=workers)
    if problems:
        raise DatasetError(problems, root=data)
    lap("validate")
    resume = any((workdir / "models" / "3d_fullres").glob("*/fold_0/checkpoint_latest.pth"))
    if resume:  # an interrupted demo: keep the plan its checkpoints were made with (a new probe could differ)
        plans = Plans.load(workdir / "plans.json")
    else:
        plans = api.plan(data, workdir, workers=workers, time_budget=QUICK_BUDGET if quick else FULL_BUDGET,
                         device=device, configurations=["3d_fullres"])
    lap("plan")
    api.preprocess(workdir, ["3d_fullres"], workers=workers)
    lap("preprocess")
    [fold] = api.train(workdir, "3d_fullres", 0, device=device, resume=resume)
    lap("train")
    held_out = json.loads((workdir / "splits.json").read_text())[0]["val"]
    images, labels = _held_out_links(load_dataset(data), held_out, workdir)
    predictions = workdir / "predictions"
    predict_folder(images, predictions, workdir, "3d_fullres", [0], device=device, on_conflict="redo")
    lap("predict")
    summary = evaluate_folder(predictions, labels, labels_from_dataset_json(data),
                              output=workdir / "evaluation" / "summary.json")
    lap("evaluate")
    report = write_report(workdir / "report.html", summary, Path(fold["folder"]), images, labels, predictions,
                          plans.configurations["3d_fullres"], timings)
    _print_table(summary, timings, report)
    return {"summary": summary, "report": str(report), "timings": timings}


def _print_table(summary: dict[str, Any], timings: dict[str, float], report: Path) -> None:
    print(f"\nheld-out cases: {len(summary['per_case'])}")
    print(f"{'label':20s} {'Dice':>7s} {'NSD':>7s} {'HD95 mm':>8s}")
    for name, values in summary["mean"].items():
        print(f"{name:20s} {values['dice']:7.4f} {values['nsd']:7.4f} {values['hd95']:8.2f}")
    fg = summary["foreground_mean"]
    print(f"{'foreground mean':20s} {fg['dice']:7.4f} {fg['nsd']:7.4f} {fg['hd95']:8.2f}")
    print("seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    if "efficiency" in summary:
        print(describe(summary["efficiency"]))
    print(f"report: {report}")
