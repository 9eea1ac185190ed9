"""Paper recipes against ``default`` at an equal CPU budget: fold-0 held-out Dice on Task04_Hippocampus.

Every recipe (``default`` and each recipe of ``RECIPES``) runs exactly what ``accuracy_at_budget`` runs for
decathlete, with ``--recipe``: ``plan --time-budget B --device D -c 3d_fullres`` (the budget planner measures the
recipe's own training step on this machine), ``preprocess``, ``train -f 0`` on the run's shared split,
``predict -f 0`` of the held-out cases from the raw images with the recipe's own inference settings, and
``evaluate`` (Dice, NSD at 1 mm, HD95; no postprocessing). One record per paper recipe: its mean foreground Dice
against ``default``'s on the same split and budget, with both parameter counts and training iterations per second
in the details. The recipes run one after another with nothing else on the machine: the budget is wall-clock time.
"""

from __future__ import annotations

from typing import Any

from bench_accuracy import _ours, held_out_folders
from common import Record

RECIPES = ("rippel2018", "factorized_iou")
BUDGET_MINUTES = {False: 5.0, True: 0.5}


def _name(recipe: str, minutes: float) -> str:
    return f"recipe_{recipe}_at_{minutes:g}min_dice"


def _describe(recipe: str, side: dict[str, Any]) -> str:
    if "error" in side:
        return f"{recipe} failed: {side['error'][-400:]}"
    return (f"{recipe}: Dice {side['dice']}, {side['parameters']:,} parameters, features {side['features_per_stage']}"
            f", batch {side['batch_size']}, patch {side['patch_size']}, {side['steps']} steps in "
            f"{side['train_loop_seconds']} s ({side['iterations_per_second']} it/s), per class {side['per_class']}")


def run(args: Any) -> list[Record]:
    ws = args.workspace
    minutes = float((getattr(args, "budgets", None) or [BUDGET_MINUTES[bool(args.quick)]])[0])
    if not ws.source.is_dir():
        return [Record(_name(r, minutes), "Dice", None, None, "decathlete default recipe", "higher",
                       note=f"{ws.source} is absent") for r in RECIPES]
    tmp = ws.root / "recipes"
    val = ws.splits[0]["val"]
    images, labels = held_out_folders(ws, tmp)
    runs = {r: _ours(ws, tmp / r, minutes, images, labels, args.device, recipe=r) for r in ("default", *RECIPES)}
    base = runs["default"]
    records = []
    for recipe in RECIPES:
        side = runs[recipe]
        note = (f"fold 0 of {len(ws.case_ids)} cases ({len(val)} held out) of Task04_Hippocampus, {minutes:g} min of "
                f"training on {args.device} each; mean foreground Dice of the held-out cases. "
                + _describe(recipe, side) + "; " + _describe("default", base))
        records.append(Record(_name(recipe, minutes), "Dice", side.get("dice"), base.get("dice"),
                              "decathlete default recipe, same budget and split", "higher",
                              {"recipe": side, "default": base, "validation_cases": val}, note, repeats=1))
    return records
