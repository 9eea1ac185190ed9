"""The ``predict``, ``crossval`` and ``best`` verbs of the command line: which trained model they run and how, and what
they print."""

from __future__ import annotations

import argparse
import os
from typing import Any

from decathlete.cli_options import add_json, add_set, workers


def _add_model_options(p: argparse.ArgumentParser, default_folds: str, folds_help: str,
                       several_configurations: bool = False) -> None:
    """Which trained model to run and how: shared by `predict` (one or more configurations) and `crossval` (one)."""
    if several_configurations:
        p.add_argument("-c", "--configuration", nargs="+", default=["3d_fullres"], metavar="CONFIG",
                       help="configuration (default 3d_fullres); several (-c 2d 3d_fullres) average their "
                            "probabilities per case, with the ensemble's postprocessing when `decathlete best` "
                            "chose one")
    else:
        p.add_argument("-c", "--configuration", default="3d_fullres", help="configuration (default 3d_fullres)")
    p.add_argument("-f", "--folds", nargs="+", default=[default_folds], help=folds_help)
    p.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file name in each fold folder")
    p.add_argument("--recipe", help="recipe folder to use when several were trained")
    p.add_argument("--no-tta", action="store_true", help="switch off mirroring test-time augmentation")
    add_set(p, "inference.tile_weighting=constant; only inference.* settings of the model's recipe")
    p.add_argument("--no-whole-volume", action="store_true",
                   help="always tile (nnU-Net's way), even an image only a little larger than the patch")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--overwrite", action="store_true", help="predict cases whose output already exists again")


def _folds(args: argparse.Namespace) -> str | list[int | str]:
    from decathlete.data.folds import parse_folds

    return parse_folds(args.folds)


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="segment every image of a folder with a trained model",
                       description="Segment every case in IN (one file per case, or nnU-Net _0000 channel files) "
                                   "and write OUT/<case><ending> with exactly the input's geometry. OUT must not be "
                                   "IN or inside it; inputs are never touched; finished cases are skipped, so an "
                                   "interrupted run resumes.")
    p.add_argument("-i", "--input", required=True, metavar="IN", help="folder of images")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="folder for the label maps")
    p.add_argument("-m", "--model", required=True, metavar="WORKDIR",
                   help="work folder (or WORKDIR/models/<config>/<recipe>) holding the trained folds")
    _add_model_options(p, default_folds="every", folds_help="folds to ensemble: numbers and/or 'all' (the model "
                       "trained on every case, fold_all); default 'every': every cross-validation fold whose training "
                       "finished, as nnU-Net's default 0-4 (unfinished ones are left out and reported; fold_all only "
                       "when named); with several configurations, the folds of each", several_configurations=True)
    p.add_argument("--step", type=float, help="sliding-window step as a fraction of the patch (default: the "
                   "recipe's inference.step, 0.5)")
    p.add_argument("--save-probabilities", action="store_true", help="also write OUT/<case>.npz with probabilities")
    p.add_argument("--no-postprocessing", action="store_true",
                   help="ignore the model's postprocessing.json (written by `decathlete crossval`)")
    p.set_defaults(func=_cmd_predict)
    add_json(p, _show_predict)


def _cmd_predict(args: argparse.Namespace) -> dict[str, Any]:
    from decathlete.api import predict

    configurations = args.configuration[0] if len(args.configuration) == 1 else args.configuration
    return predict(args.input, args.output, args.model, configurations, _folds(args), checkpoint=args.checkpoint,
                   recipe=args.recipe, overrides=args.overrides, tta=False if args.no_tta else None, step=args.step,
                   whole_volume=not args.no_whole_volume, postprocess=not args.no_postprocessing,
                   save_probabilities=args.save_probabilities, overwrite=args.overwrite, device=args.device)


def _show_predict(summary: dict[str, Any], args: argparse.Namespace) -> int:
    print(f"predicted {summary['n_done']} of {summary['n_cases']} cases in {summary['seconds']:.1f} s with "
          f"{', '.join(summary['folds'])} of {summary['model']} -> {args.output}")
    if "configurations" in summary:
        print(f"ensemble of {' + '.join(summary['configurations'])} (probabilities averaged); postprocessing: "
              f"{summary['postprocessing_note']}")
    if summary["n_skipped"]:
        print(f"{summary['n_skipped']} cases were already predicted by this model with these settings and were kept "
              "(--overwrite predicts them again)")
    if summary["skipped_folds"]:
        print(f"left out unfinished folds: {', '.join(summary['skipped_folds'])}")
    if summary.get("efficiency"):
        from decathlete.metrics.efficiency import EFFICIENCY_FILE, describe

        print(f"{describe(summary['efficiency'])} -> {os.path.join(args.output, EFFICIENCY_FILE)}")
    return 0


def add_crossval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("crossval", help="score every trained fold on its validation cases; choose postprocessing",
                       description="Each trained fold predicts its held-out cases from the raw images (as `predict` "
                                   "would), the predictions are scored per fold and together, and the largest-"
                                   "connected-component postprocessing is chosen on them where it raises the mean "
                                   "Dice without lowering any class. Writes fold_<k>/validation/, crossval/ and "
                                   "postprocessing.json (applied by `predict`) under "
                                   "WORKDIR/models/<config>/<recipe>/.")
    p.add_argument("workdir", help="work folder with trained folds")
    _add_model_options(p, default_folds="every", folds_help="cross-validation folds (default 'every': every "
                       "trained one; 'all' is refused: fold_all holds no case out)")
    p.add_argument("-j", "--workers", type=workers, default=1, help="processes for scoring")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write fold_<k>/validation/<case>.npz with the probabilities, which `decathlete best` "
                        "needs to score ensembles of configurations")
    p.set_defaults(func=_cmd_crossval)
    add_json(p, _show_crossval)


def _cmd_crossval(args: argparse.Namespace) -> dict[str, Any]:
    from decathlete.api import crossval

    return crossval(args.workdir, args.configuration, _folds(args), recipe=args.recipe, checkpoint=args.checkpoint,
                    overrides=args.overrides, tta=False if args.no_tta else None,
                    whole_volume=not args.no_whole_volume, workers=args.workers, overwrite=args.overwrite,
                    device=args.device, save_probabilities=args.save_probabilities)


def _show_crossval(result: dict[str, Any], args: argparse.Namespace) -> int:
    print(f"{result['n_cases']} validation cases of folds {', '.join(map(str, result['folds']))}:")
    for name, values in result["mean"].items():
        print(f"{name:>16s}  Dice {values['dice']:.4f}  NSD {values['nsd']:.4f}  HD95 {values['hd95']:.2f} mm")
    pp = result["postprocessing"]
    print(f"postprocessing: foreground LCC {pp['foreground']}, per class {list(pp['per_class']) or 'none'} "
          f"(mean Dice {pp['mean_dice_before']} -> {pp['mean_dice_after']})")
    print(f"wrote {result['folder']}/crossval/summary.json and postprocessing.json"
          + (" (and the validation probabilities)" if result.get("probabilities_saved") else ""))
    for stage, folder in result.get("next_stages", {}).items():
        print(f"wrote {stage}'s inputs (these predictions on its grid) to {folder}")
    return 0


def add_best(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("best", help="choose the best cross-validated configuration or ensemble of two",
                       description="Compare every cross-validated configuration of WORKDIR and every pair of them "
                                   "(their validation probabilities averaged; needs `crossval --save-probabilities`) "
                                   "by the mean foreground Dice of the cross-validation before postprocessing, on the "
                                   "same cases; choose postprocessing for the winner and write WORKDIR/best.json "
                                   "with the `decathlete predict` command that uses it.")
    p.add_argument("workdir", help="work folder whose configurations were cross-validated (`decathlete crossval`)")
    p.add_argument("-c", "--configurations", nargs="+", metavar="CONFIG",
                   help="compare only these configurations and their pairs (default: every cross-validated one)")
    p.add_argument("--recipe", help="recipe folder of every configuration (default: the plans' recipe, or the only "
                                    "one cross-validated)")
    p.add_argument("-j", "--workers", type=workers, default=1, help="processes for scoring")
    p.set_defaults(func=_cmd_best)
    add_json(p, _show_best)


def _cmd_best(args: argparse.Namespace) -> dict[str, Any]:
    from decathlete.api import best

    return best(args.workdir, args.configurations, args.recipe, workers=args.workers)


def _show_best(result: dict[str, Any], args: argparse.Namespace) -> int:
    width = max(len("candidate"), *(len(c["name"]) for c in result["candidates"]))
    print(f"{'candidate':{width}s} {'fg Dice':>8s} {'after pp':>8s}  Dice per label ({result['n_cases']} cases)")
    for c in result["candidates"]:
        post = c["postprocessed_foreground_dice"]
        mark = " <- chosen" if c["name"] == result["chosen"]["name"] else ""
        print(f"{c['name']:{width}s} {c['foreground_dice']:8.4f} {'-' if post is None else f'{post:.4f}':>8s}  "
              + ", ".join(f"{k} {v:.4f}" for k, v in c["dice"].items()) + mark)
    for s in result["skipped"]:
        print(f"skipped {s['name']}: {s['reason']}; {s['fix']}")
    pp = result["chosen"]["postprocessing"]
    print(f"chosen: {result['chosen']['name']}; postprocessing: "
          + (f"foreground LCC {pp['foreground']}, per class {list(pp['per_class']) or 'none'} ({pp['file']})"
             if pp["file"] else "none"))
    print(f"predict with: {result['command']}")
    print(f"wrote {os.path.join(args.workdir, 'best.json')}")
    return 0
