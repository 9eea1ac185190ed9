"""The ``evaluate`` verb of the command line (its options and what it prints)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from decathlete.cli_options import add_json, workers


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score predicted label maps against references",
                       description="Pair PRED and REF files by case id and write summary.json (per case, mean per "
                                   "label, foreground mean), a per-case CSV and a box plot per metric: Dice, IoU, "
                                   "NSD, HD95 (mm, spacing in z, y, x order), sensitivity, precision, counts, "
                                   "volumes. Empty-mask conventions are written into summary.json.")
    p.add_argument("pred", help="folder of predicted label maps")
    p.add_argument("ref", help="folder of reference label maps")
    p.add_argument("--labels", metavar="DATASET",
                   help="dataset folder or dataset.json whose labels (and regions) name what is scored, or a "
                        "WORKDIR (its plans.json: the planned labels or a recipe's regions); default: every "
                        "non-zero value in the references")
    p.add_argument("-o", "--output", metavar="FILE", help="summary.json path (default: PRED/summary.json)")
    p.add_argument("--nsd-tolerance", nargs="+", default=["1"], metavar="[LABEL=]MM",
                   help="NSD tolerance in mm: one for every label and/or LABEL=MM pairs, LABEL a name or value "
                        "(default 1, FLARE's; e.g. --nsd-tolerance Mandible=2 Larynx=3)")
    p.add_argument("--only-predicted", action="store_true",
                   help="score the predicted cases when some references have no prediction (the summary says how "
                        "many were left out)")
    p.add_argument("-j", "--workers", type=workers, default=1, help="processes over cases")
    p.set_defaults(func=run_evaluate)
    add_json(p, show_evaluation)


def run_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from decathlete.api import evaluate

    return evaluate(args.pred, args.ref, args.labels, args.nsd_tolerance, output=args.output, workers=args.workers,
                    only_predicted=args.only_predicted)


def show_evaluation(summary: dict[str, Any], args: argparse.Namespace) -> int:
    if "left_out" in summary:
        left = summary["left_out"]
        print(f"scored {left['n_scored']} of {left['n_reference_cases']} reference cases; {left['n_left_out']} "
              f"without a prediction left out{': ' + ', '.join(left['cases'][:10]) if left['cases'] else ''}"
              f"{' ...' if len(left['cases']) > 10 else ''}")
    for name, values in summary["mean"].items():
        print(f"{name:20s} Dice {values['dice']:.4f}  NSD {values['nsd']:.4f}  HD95 {values['hd95']:.2f} mm")
    if "efficiency" in summary:
        from decathlete.metrics.efficiency import describe

        print(describe(summary["efficiency"]))
    print(f"wrote {args.output or os.path.join(args.pred, 'summary.json')}")
    return 0
