"""Whole-volume vs tiled inference on held-out cases: Dice and seconds per case of the same trained model.

Usage (after ``decathlete plan/preprocess/train`` of a dataset into WORK)::

    python benchmarks/whole_volume_inference.py WORK DATASET [-f 0] [--cases 40] [--repeats 3] [--no-tta]

Cases are the fold's validation split (``WORK/splits.json``), images and labels read from DATASET in place. The two
settings of `decathlete.infer.Predictor` (``whole_volume`` off and on) alternate case by case and repeat by repeat in
one process; the figure is the median over repeats of the summed ``predict_case`` seconds (raw NIfTI to label map on
the input grid, model already loaded) divided by the number of cases. Dice is the mean over foreground labels and
cases (`decathlete.metrics.summary.case_metrics`). Prints one JSON object. This is how the default of
``whole_volume`` was chosen (see the ``sliding_window`` module docstring); it is not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from decathlete.infer.predictor import Predictor
from decathlete.io.images import read_label
from decathlete.metrics.summary import case_metrics


def _cases(work: Path, dataset: Path, fold: int, limit: int) -> list[tuple[str, Path, Path]]:
    splits = json.loads((work / "splits.json").read_text())
    names = sorted(splits[fold]["val"])[:limit]
    return [(n, dataset / "imagesTr" / f"{n}.nii.gz", dataset / "labelsTr" / f"{n}.nii.gz") for n in names]


def _dice(pred: np.ndarray, ref: np.ndarray, labels: dict[str, int], spacing: tuple[float, ...]) -> float:
    return float(np.mean([m["dice"] for m in case_metrics(pred, ref, spacing, labels).values()]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("work")
    parser.add_argument("dataset")
    parser.add_argument("-f", "--fold", type=int, default=0)
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-tta", action="store_true")
    args = parser.parse_args()
    work, dataset = Path(args.work), Path(args.dataset)
    cases = _cases(work, dataset, args.fold, args.cases)
    predictors = {mode: Predictor(work, folds=[args.fold], device="cpu", tta=not args.no_tta, whole_volume=mode)
                  for mode in (False, True)}  # fmt: skip
    labels = {name: int(value) for name, value in predictors[False].plans.dataset["labels"].items() if int(value)}
    seconds: dict[bool, list[float]] = {False: [], True: []}
    dice: dict[bool, list[float]] = {False: [], True: []}
    for repeat in range(args.repeats):
        totals = {False: 0.0, True: 0.0}
        for index, (name, image, label) in enumerate(cases):
            order = (False, True) if (index + repeat) % 2 == 0 else (True, False)
            for mode in order:
                start = time.perf_counter()
                pred, _ = predictors[mode].predict_case(image, case_id=name)
                totals[mode] += time.perf_counter() - start
                if repeat == 0:
                    ref, geometry = read_label(label)
                    dice[mode].append(_dice(pred, ref, labels, geometry.spacing))
        for mode in totals:
            seconds[mode].append(totals[mode] / len(cases))
    result = {
        mode_name: {"seconds_per_case": round(statistics.median(seconds[mode]), 4),
                    "all_seconds_per_case": [round(s, 4) for s in seconds[mode]],
                    "mean_dice": round(float(np.mean(dice[mode])), 4)}
        for mode_name, mode in (("tiled", False), ("whole_volume", True))
    }  # fmt: skip
    delta = result["whole_volume"]["mean_dice"] - result["tiled"]["mean_dice"]
    result.update(cases=len(cases), repeats=args.repeats, tta=not args.no_tta, dice_delta=round(delta, 4),
                  patch_size=predictors[False].config.patch_size, divisor=predictors[False].divisor)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
