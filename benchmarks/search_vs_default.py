"""Does a hyperparameter search pay for its time? ``decathlete search`` against ``default`` at an equal total CPU
budget, scored on held-out cases that neither the training nor the search's selection saw, through the CLI only.

The dataset's cases are split once (seeded): ``--test`` held-out cases, ``--val`` validation cases on which the search
scores its trials, the rest for training; every work folder gets that split as its ``splits.json`` (one fold).

* **search**: ``plan --time-budget TRIAL`` and ``preprocess``, then ``search`` with ``--trials`` trials of ``TRIAL``
  each over ``--space``. The search is killed with SIGKILL during trial ``--kill-at`` and started again, which resumes
  it; its wall time counts both parts (the killed trial's lost time included).
* **search-best** and **search-baseline**: the best trial's model and the first trial's (the recipe's own values)
  predict the held-out cases as they are (trained for ``TRIAL``).
* **search+retrain**: a fresh plan for ``--retrain`` minutes trains with the best values (``train --set-file``).
* **default**: ``plan --time-budget`` of the search's wall time plus ``--retrain``, trained with the recipe's values:
  the same total budget as search + retrain.

Wall times exclude preprocessing and the held-out prediction, which are the same work in every arm. Run it alone on
the machine: the budgets are wall-clock time.

    .venv/bin/python benchmarks/search_vs_default.py --dataset ../shared/data/Task04_Hippocampus \\
        --space examples/search/default_lr_rotation.json --out benchmarks/results/search_vs_default_task04.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from decathlete.io.atomic import write_json_atomic
from recipe_vs_default import CLI, run  # the same CLI runner (this folder is on the path)


def split(dataset: Path, n_val: int, n_test: int) -> dict[str, list[str]]:
    ids = sorted(Path(e["label"]).name.split(".")[0] for e in json.loads((dataset / "dataset.json").read_text())
                 ["training"])
    order = [ids[i] for i in np.random.default_rng(0).permutation(len(ids))]
    return {"test": sorted(order[:n_test]), "val": sorted(order[n_test:n_test + n_val]),
            "train": sorted(order[n_test + n_val:])}


def prepare(dataset: Path, work: Path, budget: str, cases: dict[str, list[str]], log: Path) -> None:
    run(["plan", str(dataset), "-o", str(work), "--time-budget", budget, "-c", "3d_fullres"], log)
    (work / "splits.json").write_text(json.dumps([{"train": cases["train"], "val": cases["val"]}]))
    run(["preprocess", str(work), "-c", "3d_fullres", "-j", "2"], log)


def held_out(dataset: Path, root: Path, cases: list[str]) -> tuple[Path, Path]:
    images, refs = root / "test_images", root / "test_refs"
    if not images.is_dir():
        images.mkdir(), refs.mkdir()
        for case in cases:
            (images / f"{case}.nii.gz").symlink_to((dataset / "imagesTr" / f"{case}.nii.gz").resolve())
            (refs / f"{case}.nii.gz").symlink_to((dataset / "labelsTr" / f"{case}.nii.gz").resolve())
    return images, refs


def score(model: Path, work: Path, root: Path, tag: str, log: Path, dataset: Path, cases: list[str]) -> dict:
    """Predict the held-out cases with ``model`` (a folder of ``fold_0`` or a work folder) and score them."""
    images, refs = held_out(dataset, root, cases)
    seconds = run(["predict", "-i", str(images), "-o", str(root / f"{tag}_pred"), "-m", str(model), "-c",
                   "3d_fullres", "-f", "0"], log)
    out = root / f"{tag}_summary.json"
    run(["evaluate", str(root / f"{tag}_pred"), str(refs), "--labels", str(work), "-o", str(out)], log)
    summary = json.loads(out.read_text())
    return {"arm": tag, "held_out_dice": {name: round(v["dice"], 4) for name, v in summary["mean"].items()},
            "held_out_mean_dice": round(summary["foreground_mean"]["dice"], 4), "predict_seconds": round(seconds, 1)}


def search_killed_once(work: Path, args: argparse.Namespace, log: Path) -> tuple[float, dict]:
    """The search, killed with SIGKILL during trial ``args.kill_at`` and resumed; (wall seconds, what happened)."""
    command = [*CLI, "search", str(work), "--space", str(args.space), "--trials", str(args.trials), "--trial-budget",
               args.trial_budget, "-c", "3d_fullres", "-f", "0", "--device", "cpu", "--study", "bench"]
    start = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(command)}   (killed during trial {args.kill_at})\n")
        out.flush()
        first = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        target = work / "search" / "bench" / f"trial_{args.kill_at:04d}" / "fold_0" / "training_log.txt"
        while not target.is_file() and first.poll() is None:
            time.sleep(1)
        time.sleep(args.kill_after)
        first.send_signal(signal.SIGKILL)
        first.wait()
    killed_at = time.perf_counter() - start
    resumed = run(["search", *command[len(CLI) + 1:]], log)
    return killed_at + resumed, {"killed_after_s": round(killed_at, 1), "resumed_s": round(resumed, 1),
                                 "killed_during_trial": args.kill_at}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--space", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--trial-budget", default="1m")
    parser.add_argument("--retrain", type=float, default=10.0, help="minutes of the retraining with the best values")
    parser.add_argument("--val", type=int, default=40)
    parser.add_argument("--test", type=int, default=40)
    parser.add_argument("--kill-at", type=int, default=2, help="trial during which the search is killed")
    parser.add_argument("--kill-after", type=float, default=30.0, help="seconds into that trial's training")
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="search_vs_default_"))
    root.mkdir(parents=True, exist_ok=True)
    log = root / "commands.log"
    cases = split(args.dataset, args.val, args.test)
    search_work = root / "search"
    prepare(args.dataset, search_work, args.trial_budget, cases, log)
    search_s, interruption = search_killed_once(search_work, args, log)
    summary = json.loads((search_work / "search" / "bench" / "search.json").read_text())
    trials = (search_work / "search" / "bench" / "trials.csv").read_text()
    best = Path(summary["best"]["folder"])
    arms = [{**score(best, search_work, root, "search-best", log, args.dataset, cases["test"]),
             "trial": summary["best"]["trial"], "validation_dice": summary["best"]["value"],
             "overrides": summary["best"]["overrides"], "total_budget_s": round(search_s, 1)}]
    baseline = search_work / "search" / "bench" / "trial_0000"
    arms.append({**score(baseline, search_work, root, "search-baseline", log, args.dataset, cases["test"]),
                 "trial": 0, "note": "the recipe's own values, trained for one trial budget"})
    retrain = root / "retrain"
    prepare(args.dataset, retrain, f"{args.retrain:g}m", cases, log)
    overrides = search_work / "search" / "bench" / "best_overrides.json"
    retrain_s = run(["train", str(retrain), "-c", "3d_fullres", "-f", "0", "--set-file", str(overrides)], log)
    arms.append({**score(retrain, retrain, root, "search+retrain", log, args.dataset, cases["test"]),
                 "overrides": summary["best"]["overrides"], "retrain_s": round(retrain_s, 1),
                 "total_budget_s": round(search_s + args.retrain * 60, 1)})
    total_min = (search_s + args.retrain * 60) / 60
    default = root / "default"
    prepare(args.dataset, default, f"{total_min:.1f}m", cases, log)
    default_s = run(["train", str(default), "-c", "3d_fullres", "-f", "0"], log)
    arms.append({**score(default, default, root, "default", log, args.dataset, cases["test"]),
                 "train_s": round(default_s, 1), "total_budget_s": round(total_min * 60, 1)})
    record = {"benchmark": "search_vs_default", "dataset": args.dataset.name, "space": json.loads(
        args.space.read_text()), "trials": args.trials, "trial_budget": args.trial_budget, "split": {
        k: len(v) for k, v in cases.items()}, "held_out_cases": cases["test"], "search_wall_s": round(search_s, 1),
        "interruption": interruption, "search_summary": summary, "trials_csv": trials, "arms": arms,
        "command": " ".join(["python", *sys.argv]),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, record)
    for a in arms:
        print(a["arm"], a["held_out_mean_dice"], a["held_out_dice"], a.get("total_budget_s"))


if __name__ == "__main__":
    main()
