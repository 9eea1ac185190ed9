"""A paper recipe against ``default`` on the same dataset, split, CPU budget and scoring, through the CLI only.

Each arm runs ``decathlete plan --time-budget B -c CONFIG`` (its own workdir; splits are the same, checked),
``preprocess``, ``train -f 0``, ``predict`` of fold 0's held-out cases and ``evaluate --labels WORKDIR`` (per region
when the plan has regions), and keeps what the prediction cost (``efficiency.json``: seconds per case by phase, peak
memory, FLOPs). CONFIG is ``3d_fullres`` for ``default`` and ``--configuration`` for the paper recipe.
``default`` gets the paper recipe's regions through ``--set regions=...`` so that both arms train and are scored on
the same outputs. Run it alone on the machine: the budget is wall-clock time.

    .venv/bin/python benchmarks/recipe_vs_default.py --dataset ../shared/data/Task101_BraTS2015_FLAIR_T1c \
        --recipe segresnet_vae --budget 10m --out benchmarks/results/segresnet_vae_task101.json
    .venv/bin/python benchmarks/recipe_vs_default.py --dataset ../shared/data/Task106_OpenKBP_HeadNeckCT \
        --recipe flare21_2d --configuration 2d --budget 10m --out benchmarks/results/flare21_2d_task106.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from decathlete.api import resolve_recipe
from decathlete.io.atomic import write_json_atomic

CLI = [sys.executable, "-m", "decathlete.cli"]


def run(args: list[str], log: Path) -> float:
    """Run one CLI command, its output appended to ``log``; the wall-clock seconds it took."""
    start = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ decathlete {' '.join(args)}\n")
        out.flush()
        subprocess.run([*CLI, *args], check=True, stdout=out, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def arm(dataset: Path, recipe: str, overrides: list[str], budget: str, root: Path, log: Path, tag: str,
        configuration: str = "3d_fullres") -> dict:
    """Plan, preprocess, train fold 0, predict its held-out cases and score them; the arm's record."""
    work = root / tag
    sets = [a for o in overrides for a in ("--set", o)]
    seconds = {"plan": run(["plan", str(dataset), "-o", str(work), "--recipe", recipe, "--time-budget", budget,
                            "-c", configuration, *sets], log)}
    seconds["preprocess"] = run(["preprocess", str(work), "-c", configuration, "-j", "2"], log)
    seconds["train"] = run(["train", str(work), "-c", configuration, "-f", "0", "--json"], log)
    held_out = json.loads((work / "splits.json").read_text())[0]["val"]
    images, refs = root / f"{tag}_images", root / f"{tag}_refs"
    images.mkdir(), refs.mkdir()
    for case in held_out:
        (images / f"{case}.nii.gz").symlink_to((dataset / "imagesTr" / f"{case}.nii.gz").resolve())
        (refs / f"{case}.nii.gz").symlink_to((dataset / "labelsTr" / f"{case}.nii.gz").resolve())
    seconds["predict"] = run(["predict", "-i", str(images), "-o", str(root / f"{tag}_pred"), "-m", str(work),
                              "-c", configuration, "-f", "0"], log)
    summary_path = root / f"{tag}_summary.json"
    run(["evaluate", str(root / f"{tag}_pred"), str(refs), "--labels", str(work), "-o", str(summary_path)], log)
    summary = json.loads(summary_path.read_text())
    plans = json.loads((work / "plans.json").read_text())["configurations"][configuration]
    # train --json: the folds' summaries, one JSON line among the logs
    done = [json.loads(line)[0] for line in log.read_text().splitlines() if line.startswith('[{"folder"')][-1]
    return {"arm": tag, "recipe": recipe, "configuration": configuration, "overrides": overrides,
            "held_out": held_out, "spacing": plans["spacing"],
            "network": plans["network"]["name"], "parameters": plans["parameters"],
            "patch_size": plans["patch_size"], "batch_size": plans["batch_size"],
            "base_features": plans["features_per_stage"][0], "step_seconds": plans["training"]["step_seconds"],
            "planned_iterations": plans["training"]["iterations"],
            "train_run": {k: done.get(k) for k in ("steps", "epochs", "seconds", "stopped_by_time_budget")},
            "per_region": {name: {k: round(v[k], 4) for k in ("dice", "hd95", "nsd")}
                           for name, v in summary["mean"].items() if name != "foreground_mean"},
            "efficiency": summary.get("efficiency"), "per_case": summary.get("per_case"),
            "seconds": {k: round(v, 1) for k, v in seconds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--budget", default="10m")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--recipe-set", action="append", default=[], metavar="PATH=VALUE",
                        help="an override of the paper recipe's arm (recorded with it)")
    parser.add_argument("--tag", help="name of the paper recipe's arm (default: the recipe's name)")
    parser.add_argument("--configuration", default="3d_fullres", help="the paper recipe's configuration")
    parser.add_argument("--skip-default", action="store_true", help="run the paper recipe's arm only")
    parser.add_argument("--merge", action="store_true", help="add the arms to those already in --out")
    args = parser.parse_args()
    regions = resolve_recipe(args.recipe, args.recipe_set).to_dict()["regions"]
    baseline = [] if regions is None else [f"regions={json.dumps(regions)}"]
    root = args.workdir or Path(tempfile.mkdtemp(prefix="recipe_vs_default_"))
    root.mkdir(parents=True, exist_ok=True)
    log = root / "commands.log"
    arms = [arm(args.dataset, args.recipe, args.recipe_set, args.budget, root, log, args.tag or args.recipe,
                args.configuration)]
    if not args.skip_default:
        arms.append(arm(args.dataset, "default", baseline, args.budget, root, log, "default"))
    for a in arms:
        a["command"] = " ".join(["python", *sys.argv])
    previous = json.loads(args.out.read_text())["arms"] if args.merge and args.out.is_file() else []
    arms = [a for a in previous if a["arm"] not in {b["arm"] for b in arms}] + arms
    if len({tuple(a["held_out"]) for a in arms}) > 1:
        raise RuntimeError(f"the arms were split differently: {[a['held_out'] for a in arms]}")
    record = {"benchmark": "recipe_vs_default", "dataset": args.dataset.name, "budget": args.budget,
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
              "arms": arms}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, record)
    for a in arms:
        print(a["arm"], a["parameters"], a["step_seconds"], a["per_region"])


if __name__ == "__main__":
    main()
