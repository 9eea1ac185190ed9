"""The ``search`` verb of the command line (its options and what it prints)."""

from __future__ import annotations

import argparse
from typing import Any

from decathlete.cli_options import add_json, add_set


def add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="search a recipe's hyperparameters on one fold (Optuna; resumable, shareable)",
                       description="Train one trial per drawn point of SPACE for the same wall-clock budget, each "
                                   "in WORKDIR/search/<study>/trial_<n>/, score it on the fold's validation cases "
                                   "(predicted from the raw images), and keep the study in an Optuna storage "
                                   "(default: SQLite file WORKDIR/search/search.db) that a rerun resumes and other "
                                   "processes or machines join. Writes best_overrides.json (for train --set-file), "
                                   "trials.csv, history.png, importance.png, report.html and search.json.")
    p.add_argument("workdir", help="work folder written by `decathlete plan` and `decathlete preprocess`")
    p.add_argument("--space", required=True, metavar="SPACE.json",
                   help="JSON object of dotted recipe fields and ranges (examples/search/)")
    p.add_argument("--trials", type=int, default=20, help="finished trials the study should hold (default 20)")
    p.add_argument("--trial-budget", default="2m", metavar="DURATION",
                   help="wall-clock training time of every trial (default 2m); scoring comes on top")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="configuration in plans.json")
    p.add_argument("-f", "--fold", type=_one_fold, default=0,
                   help="the cross-validation fold whose validation cases score the trials (one number)")
    p.add_argument("--recipe", help="registered recipe (default: the one the plans were made with)")
    add_set(p, "loss.name=topk_ce; every trial gets them before the space's values")
    p.add_argument("--sampler", default="tpe", help="tpe (default), random or random-around-best")
    p.add_argument("--startup-trials", type=int, metavar="N",
                   help="TPE's random trials before it models the results (default: a third of --trials, 1-10)")
    p.add_argument("--pruner", default="median", choices=("median", "none"),
                   help="stop a trial whose epoch pseudo-Dice trails the median of earlier trials (default median)")
    p.add_argument("--storage", metavar="URL",
                   help="Optuna storage URL shared by every worker (default sqlite:///WORKDIR/search/search.db)")
    p.add_argument("--study", help="study name (default <recipe>-<configuration>-fold<k>)")
    p.add_argument("--metric", default="dice", choices=("dice", "iou"), help="validation metric (default dice)")
    p.add_argument("--no-tta", action="store_true", help="score without mirroring (default: the recipe's setting)")
    p.add_argument("--no-baseline", action="store_true",
                   help="do not start with a trial at the recipe's own values")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler and of every trial's training")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--val-iterations", type=int, default=50,
                   help="validation batches per training epoch (the pseudo-Dice the pruner sees; default 50)")
    p.add_argument("-j", "--workers", type=int, default=1, help="processes for scoring")
    p.set_defaults(func=run_search)
    add_json(p, show_search)


def _one_fold(value: str) -> int:
    from decathlete.data.folds import single_fold

    try:
        return single_fold(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"search scores trials on one fold's held-out cases: {err}") from None


def run_search(args: argparse.Namespace) -> dict[str, Any]:
    from decathlete.api import search

    return search(args.workdir, space=args.space, trials=args.trials, trial_budget=args.trial_budget,
                  configuration=args.configuration, fold=args.fold, recipe=args.recipe, overrides=args.overrides,
                  sampler=args.sampler, startup_trials=args.startup_trials, pruner=args.pruner, storage=args.storage,
                  study=args.study, metric=args.metric, tta=False if args.no_tta else None,
                  baseline=not args.no_baseline, seed=args.seed, device=args.device, workers=args.workers,
                  val_iterations=args.val_iterations)


def show_search(summary: dict[str, Any], args: argparse.Namespace) -> int:
    print(f"trials: {', '.join(f'{n} {k.lower()}' for k, n in summary['counts'].items())}")
    finished = sum(summary["counts"].get(state, 0) for state in ("COMPLETE", "PRUNED"))
    if finished < args.trials:
        print(f"{finished} of {args.trials} trials finished; {summary['running_elsewhere']} still run in other "
              "workers: run this command again to wait for them, or to take their place if they are gone")
    best = summary["best"]
    if best is None:
        print("no trial finished")
        return 1
    print(f"best: trial {best['trial']}, validation {summary['metric']} {best['value']:.4f}: "
          + ", ".join(f"{k}={v}" for k, v in best["overrides"].items()))
    print(f"wrote {summary['files']['best_overrides']}, trials.csv, report.html; train with it:\n  {best['command']}")
    return 0
