"""``decathlete <verb>``: the command line (see ../shared/docs/cli-contract.md and the README).

Every verb is a thin wrapper over a function of :mod:`decathlete.api`, so the same work is callable from Python. A
verb's ``func`` does the work and returns its result; its ``show`` prints a short human summary of it and returns the
exit status. With ``--json`` the result is printed as JSON on stdout instead, and everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from decathlete import __version__, registry
from decathlete.cli_options import add_json, add_set, workers
from decathlete.errors import CasesFailed, ImageReadError
from decathlete.infer.command import add_best, add_crossval, add_predict
from decathlete.io.validation import DatasetError
from decathlete.metrics.command import add_evaluate
from decathlete.search.command import add_search


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a raw dataset; lists every problem with its case id and a fix",
                       description="Check a raw dataset (MSD or nnU-Net v2 layout) without writing anything. "
                                   "Exit status 1 when any problem is found.")
    p.add_argument("dataset", help="dataset folder containing dataset.json")
    p.add_argument("-j", "--workers", type=workers, default=min(4, os.cpu_count() or 1),
                   help="processes for reading voxel data (default: up to 4)")
    p.set_defaults(func=_cmd_validate)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="validate, fingerprint and plan a dataset",
                       description="Validate the dataset, extract its fingerprint and write WORKDIR/fingerprint.json "
                                   "and WORKDIR/plans.json (configurations 2d, 3d_fullres and, for large images, "
                                   "3d_lowres with the 3d_cascade_fullres stage built on it; all sizes in (z, y, x) "
                                   "order).")
    p.add_argument("dataset", help="dataset folder containing dataset.json")
    p.add_argument("-o", "--output", required=True, metavar="WORKDIR", help="work folder to write the plans into")
    p.add_argument("--gpu-memory", type=float, default=8.0, metavar="GiB",
                   help="GPU memory budget the patch and batch size are fitted to (default 8; a plan for the CPU is "
                        "fitted to half of this machine's RAM instead)")
    p.add_argument("--planner", help="registered planner (default: the recipe's; see `decathlete list planners`)")
    p.add_argument("--recipe", default="default", help="registered recipe (see `decathlete list recipes`)")
    add_set(p, "planning.batch_size=1 or planning.target_spacing=[2.5,0.8,0.8]")
    p.add_argument("-j", "--workers", type=workers, default=min(4, os.cpu_count() or 1),
                   help="processes for validation and fingerprinting")
    p.add_argument("--time-budget", metavar="DURATION",
                   help="training wall-clock budget per configuration (e.g. 20m, 6h): the network is narrowed and "
                        "batched until it fits, by step times measured on --device")
    p.add_argument("--device", default="auto",
                   help="where --time-budget measures step times: cpu, cuda, auto; cpu (or auto without CUDA, with a "
                        "--time-budget) also sizes patch and batch to this machine's RAM instead of --gpu-memory")
    p.add_argument("-c", "--configurations", nargs="+", metavar="CONFIG",
                   help="keep only these configurations (e.g. 3d_fullres; saves probing time with a budget)")
    p.set_defaults(func=_cmd_plan)
    add_json(p, _show_plan)


def _add_preprocess(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess", help="crop, resample and normalise every case for the planned configurations",
                       description="Crop to the nonzero region, normalise and resample every training case of the "
                                   "dataset recorded in WORKDIR/plans.json into WORKDIR/preprocessed/<config>/. "
                                   "Finished cases are skipped, so an interrupted run resumes.")
    p.add_argument("workdir", help="work folder written by `decathlete plan`")
    p.add_argument("-c", "--configurations", nargs="+", metavar="CONFIG",
                   help="configurations to preprocess (default: all in plans.json)")
    p.add_argument("-j", "--workers", type=workers, default=min(4, os.cpu_count() or 1),
                   help="parallel cases (peak memory grows with one case per worker)")
    p.set_defaults(func=_cmd_preprocess)
    add_json(p, _show_preprocess)


_FOLDS_HELP = ("fold number(s) (default 0); 'all': one model trained on every case (nnU-Net's fold_all); 'every': "
               "each cross-validation fold in turn")


def _add_patches(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("patches", help="pre-extract a fold's training and validation patches into HDF5 files",
                       description="Draw N training patches (training crop size, the fold's training cases) and N "
                                   "validation patches (patch size, its validation cases) with the recipe's sampler "
                                   "into WORKDIR/patches/<data_identifier>/fold_<k>/{train,val}.h5 (the "
                                   "configuration's preprocessed folder name, e.g. 3d_fullres; van den Hork 2019); "
                                   "train on them with `decathlete train WORKDIR --set sampler=patch_set`. An "
                                   "interrupted run resumes; finished files are skipped.")
    p.add_argument("workdir", help="work folder written by `decathlete plan` and `decathlete preprocess`")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="configuration in plans.json")
    p.add_argument("-f", "--fold", nargs="+", default=["0"], metavar="FOLD", help=_FOLDS_HELP)
    p.add_argument("--train", type=int, required=True, metavar="N", help="training patches (>= 1)")
    p.add_argument("--val", type=int, required=True, metavar="N", help="validation patches (>= 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    p.set_defaults(func=_cmd_patches)
    add_json(p, _show_patches)


def _cmd_patches(args: argparse.Namespace) -> list[dict[str, Any]]:
    from decathlete.api import patches

    return patches(args.workdir, args.configuration, args.fold, n_train=args.train, n_val=args.val, seed=args.seed)


def _show_patches(summaries: list[dict[str, Any]], args: argparse.Namespace) -> int:
    for summary in summaries:
        for kind in ("train", "val"):
            s = summary[kind]
            print(f"{Path(summary['folder']).name} {kind:5s} {s['n']} patches from {s['cases_drawn']}/{s['n_cases']} "
                  "cases, "
                  f"{100 * s['forced_fraction']:.0f}% forced foreground, {s['bytes'] / 1e6:.1f} MB, "
                  f"{s['seconds']:.1f} s ({s['status']}): {s['path']}")
    return 0


def _add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="show registered recipes, networks, layers, losses, planners, samplers ...",
                       description="Show what is registered, including components of plugins loaded with --plugin.")
    p.add_argument("kind", nargs="?", choices=registry.KINDS, help="what to list (default: everything)")
    p.add_argument("--pattern", default="*", help="shell-style wildcard on names")
    p.set_defaults(func=_cmd_list)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a fold (or several) of a planned, preprocessed configuration",
                       description="Train WORKDIR's configuration on one cross-validation fold (or, with -f all, "
                                   "on every case, as nnU-Net's fold 'all') into "
                                   "WORKDIR/models/<config>/<recipe>/fold_<k>/ (checkpoints, training_log.txt, "
                                   "progress.png, plans/recipe/run settings). Under torchrun, every process trains "
                                   "its share of the batch (DDP) and rank 0 writes.")
    p.add_argument("workdir", help="work folder written by `decathlete plan` and `decathlete preprocess`")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="configuration in plans.json")
    p.add_argument("-f", "--fold", nargs="+", default=["0"], metavar="FOLD", help=_FOLDS_HELP)
    p.add_argument("--recipe", help="registered recipe (default: the one the plans were made with)")
    add_set(p, "optimizer.lr=3e-4 or augment.p_elastic=0.2")
    p.add_argument("-o", "--output", metavar="DIR",
                   help="folder for fold_<k>/ (default WORKDIR/models/<config>/<recipe>); one per run of a recipe")
    p.add_argument("--epochs", type=int, help="epochs (default: the recipe's)")
    p.add_argument("--iterations-per-epoch", type=int, help="optimiser steps per epoch (default: the recipe's)")
    p.add_argument("--val-iterations", type=int, default=50,
                   help="validation batches per epoch (default 50; with a time budget at most this many, fewer "
                        "where they would take over 10%% of the budget)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--resume", action="store_true",
                   help="continue from checkpoint_latest (also extends a finished run to a larger --epochs)")
    p.add_argument("--seed", type=int, default=0, help="seed of initial weights, sampling and augmentation")
    p.add_argument("-j", "--workers", type=int, default=None,
                   help="background data-loading processes (0: in the training process; default: 0 on CPU, up to 8 "
                        "feeding a GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (pays off on long GPU runs)")
    p.add_argument("--time-budget", metavar="DURATION",
                   help="wall-clock cap (e.g. 20m): the schedule anneals over it and training stops in time for a "
                        "final validation and checkpoint (default: the plan's budget, if it was planned with one)")
    p.set_defaults(func=_cmd_train)
    add_json(p, lambda summaries, args: 0)  # the training log ends with each fold's summary line


def _cmd_train(args: argparse.Namespace) -> list[dict[str, Any]]:
    from decathlete.api import train

    return train(args.workdir, args.configuration, args.fold, recipe=args.recipe, overrides=args.overrides,
                 epochs=args.epochs, iterations_per_epoch=args.iterations_per_epoch,
                 val_iterations=args.val_iterations, device=args.device, resume=args.resume, seed=args.seed,
                 num_workers=args.workers, compile=args.compile, time_budget=args.time_budget, model_dir=args.output)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the pipeline end to end on a built-in synthetic dataset (or --data)",
                       description="Generate a synthetic dataset (30 cases, 10 with --quick; or use --data "
                                   "DATASET), validate it, plan 3d_fullres with the default recipe (nnU-Net's "
                                   "U-Net) for a training budget of 4 minutes (1 minute with --quick): real training "
                                   "steps are timed on --device and the network's width, batch and schedule "
                                   "narrowed until the run fits; then preprocess, train fold 0 until the budget is "
                                   "spent, predict fold 0's held-out cases, evaluate them, print Dice/NSD/HD95 and "
                                   "write report.html.")
    p.add_argument("--data", metavar="DATASET", help="a real dataset instead of the built-in synthetic one")
    p.add_argument("-o", "--output", default="demo_work", metavar="WORKDIR", help="work folder (default demo_work)")
    p.add_argument("--quick", action="store_true", help="a small variant for smoke tests")
    p.add_argument("-j", "--workers", type=workers, default=min(2, os.cpu_count() or 1), help="parallel processes")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from decathlete.api import demo

    demo(args.output, data=args.data, quick=args.quick, workers=args.workers, device=args.device)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from decathlete.api import validate

    problems = validate(args.dataset, workers=args.workers)
    if problems:
        print(f"{len(problems)} problem(s) in {args.dataset}:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"{args.dataset}: no problems found")
    return 0


def _cmd_plan(args: argparse.Namespace) -> dict[str, Any]:
    from decathlete.api import plan

    return plan(args.dataset, args.output, gpu_memory_gb=args.gpu_memory, planner=args.planner, recipe=args.recipe,
                workers=args.workers, time_budget=args.time_budget, device=args.device,
                configurations=args.configurations, overrides=args.overrides).to_dict()


def _show_plan(result: dict[str, Any], args: argparse.Namespace) -> int:
    from decathlete.planning.plans import Plans

    plans = Plans.from_dict(result)
    if plans.transpose_forward != [0, 1, 2]:
        print(f"array axes transposed to {tuple(plans.transpose_forward)} (the coarsest first); the shapes and "
              "spacings below are in that order")
    for name, c in plans.configurations.items():
        print(f"{name:11s} spacing {_fmt(c.spacing)}  patch {_fmt(c.patch_size)}  batch {c.batch_size}  "
              f"stages {c.n_stages}  strides {_fmt(c.strides[1:])}  "
              f"~{c.memory_estimate_gb:.2g} GiB {plans.memory_target.label}  "
              f"{c.parameters / 1e6:.2g} M params")
        if c.training:
            t = c.training
            print(f"{'':11s} budget {t['budget_seconds']:.0f} s: {t['iterations']} iterations x {t['step_seconds']} s"
                  f" (measured), {t['val_iterations']} validation batches/epoch, predicted "
                  f"{t['predicted_seconds']:.0f} s of training")
    if plans.budget_choice:
        name = plans.budget_choice["configuration"]
        print(f"for this budget train {name} (`decathlete train {args.output} -c {name}`): "
              f"{plans.budget_choice['why']}")
    print(f"wrote {os.path.join(args.output, 'plans.json')}")
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> dict[str, Any]:
    from decathlete.api import preprocess

    return preprocess(args.workdir, args.configurations, workers=args.workers)


def _show_preprocess(results: dict[str, Any], args: argparse.Namespace) -> int:
    for name, r in results.items():
        kept = f", {r['n_skipped']} already done" if r["n_skipped"] else ""
        print(f"{name}: {r['n_done']} of {r['n_cases']} cases preprocessed{kept} in {r['seconds']:.1f} s "
              f"-> {r['folder']}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    for kind in [args.kind] if args.kind else registry.KINDS:
        print(f"{kind}: {', '.join(registry.names(kind, args.pattern)) or '(none)'}")
    return 0


def _fmt(values: Sequence) -> str:
    """``20x64x64``; spacings with four significant digits (``2.977x1.2x1.2``); lists of lists space-separated."""
    if values and isinstance(values[0], list):
        return " ".join(_fmt(v) for v in values)
    return "x".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in values)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every verb."""
    parser = argparse.ArgumentParser(prog="decathlete", description="Self-configuring 3D medical image "
                                     "segmentation. Shapes and spacings are in array order (z, y, x).")
    parser.add_argument("--version", action="version", version=f"decathlete {__version__}")
    parser.add_argument("--plugin", action="append", default=[], metavar="PKG",
                        help="import PKG first so that its registered components are available (repeatable)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for add in (_add_validate, _add_plan, _add_preprocess, _add_patches, _add_train, add_predict, add_crossval,
                add_best, _add_demo, _add_list):
        add(sub)
    add_evaluate(sub)
    add_search(sub)
    return parser


def _run(args: argparse.Namespace) -> int:
    """Do the verb's work and show its result: to people, or with ``--json`` as JSON on stdout."""
    show = getattr(args, "show", None)
    if show is None:
        return args.func(args)
    if not args.json:
        return show(args.func(args), args)
    with contextlib.redirect_stdout(sys.stderr):  # logs and the human summary; stdout holds only the JSON
        result = args.func(args)
        status = show(result, args)
    print(json.dumps(result, default=str))
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``decathlete`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        for package in args.plugin:
            registry.load_plugin(package)
    except ImportError as err:  # load_plugin names the package and asks whether it is installed
        print(f"decathlete: error: {err}", file=sys.stderr)
        return 1
    try:
        return _run(args)
    except (DatasetError, CasesFailed) as err:  # their messages are lists, one problem or case per line
        print(f"decathlete {args.verb}: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, KeyError, ValueError, ImageReadError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err  # str(KeyError) adds quotes
        print(f"decathlete {args.verb}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
