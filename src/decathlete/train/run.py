"""A training run's records: its resolved settings and recipe, its changing state, and the files of its fold folder.

The fold folder holds everything needed to rebuild and reproduce the model: ``plans.json``, ``recipe.json`` (the
resolved recipe, read back by predict, crossval and ``--resume``), ``run.json`` (settings, command, versions,
plugins) and the checkpoints, each written atomically and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from decathlete import __version__, registry
from decathlete.io import checkpoint as ckpt
from decathlete.io.atomic import is_temporary_of, write_json_atomic
from decathlete.planning.plans import Configuration, Plans
from decathlete.recipes.base import RECIPE_FILE, Recipe
from decathlete.train.progress import plot_confusion, plot_progress


@dataclass
class RunSettings:
    """The resolved settings of one training run (JSON, saved with the model; --resume refuses other ones)."""

    configuration: str
    fold: int | str  # a cross-validation fold, or "all" (decathlete.data.folds)
    recipe: dict[str, Any]
    seed: int = 0
    val_iterations: int = 50
    num_workers: int = 2
    device: str = "cpu"
    compile: bool = False
    checkpoint_every: int = 1
    time_budget: float | None = None

    @property
    def epochs(self) -> int:
        return int(self.recipe["epochs"])

    @property
    def iterations_per_epoch(self) -> int:
        return int(self.recipe["iterations_per_epoch"])


@dataclass
class TrainState:
    """What changes during training (saved in every checkpoint)."""

    epoch: int = 0
    step: int = 0
    ema_dice: float | None = None
    best_ema: float = -1.0
    seconds: float = 0.0
    schedule_anchor: list[float] | None = None  # (step, progress) where an extended run's schedule continues
    history: dict[str, list] = field(default_factory=lambda: {
        "train_loss": [], "val_loss": [], "pseudo_dice": [], "ema_dice": [], "lr": [], "epoch_seconds": [],
        "pseudo_dice_per_class": []})


def model_folder(workdir: str | Path, configuration: str, recipe: str, fold: int | str) -> Path:
    """``WORKDIR/models/<configuration>/<recipe>/fold_<k>`` (``fold_all`` for fold ``"all"``)."""
    return Path(workdir) / "models" / configuration / recipe / f"fold_{fold}"


def write_run_files(out: Path, plans: Plans, config: Configuration, settings: RunSettings,
                    split: dict[str, list[str]] | None = None) -> None:
    """Everything needed to rebuild and reproduce the model, next to its checkpoints (``split``: the fold's
    training and validation cases, recorded in ``run.json``)."""
    out.mkdir(parents=True, exist_ok=True)
    plans.save(out / "plans.json")
    write_json_atomic(out / RECIPE_FILE, settings.recipe)
    write_json_atomic(out / "run.json", {
        "settings": asdict(settings), "configuration": asdict(config), "command": sys.argv,
        "versions": {"decathlete": __version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "plugins": registry.loaded_plugins(), "split": _split_record(settings.fold, split)})
    for stale in out.glob(".tmp-*"):  # what writes cut short by a kill left behind
        if is_temporary_of(stale):
            stale.unlink(missing_ok=True)


def _split_record(fold: int | str, split: dict[str, list[str]] | None) -> dict[str, Any] | None:
    if split is None:
        return None
    rule = ("fold 'all' (nnU-Net's): every case of the splits, both trained on and validated on; no held-out case"
            if fold == "all" else f"cross-validation fold {fold} of the splits: validated on its held-out cases")
    return {"rule": rule, "train": list(split["train"]), "val": list(split["val"])}


def save(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
         settings: RunSettings) -> None:
    ckpt.save_checkpoint(path, {"model": ckpt.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                                "state": asdict(state), "settings": asdict(settings), "version": __version__})


def save_epoch(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
               settings: RunSettings, final: bool = False) -> None:
    """The checkpoints of an epoch's end: best (by EMA pseudo-Dice), latest, and the progress plot."""
    if state.ema_dice is not None and state.ema_dice > state.best_ema:
        state.best_ema = state.ema_dice
        save(out / ckpt.BEST, model, optimizer, state, settings)
    if state.epoch % settings.checkpoint_every == 0 or state.epoch == settings.epochs or final:
        save(out / ckpt.LATEST, model, optimizer, state, settings)
    plot_progress(state.history, out / "progress.png")
    if state.history.get("confusion"):
        plot_confusion(state.history["confusion"][-1], out / "confusion_matrix.png", state.epoch - 1)


def _comparable(recipe: dict[str, Any]) -> dict[str, Any]:
    """A saved recipe with the fields of this version (a run saved before a field existed has its default)."""
    return {k: v for k, v in Recipe.from_dict(recipe).to_dict().items() if k != "epochs"}


def restore(out: Path, settings: RunSettings, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer) -> tuple[TrainState, int]:
    """Load the latest checkpoint; the recipe apart from its length must match (a longer run extends it).

    Returns:
        The saved state and the total of steps the saved run's schedule ran over.
    """
    if not (out / ckpt.LATEST).is_file():
        raise FileNotFoundError(f"--resume: {out} holds no run to resume (no {ckpt.LATEST}: its training never "
                                "finished an epoch there); train without --resume to start it")
    saved = ckpt.load_checkpoint(out / ckpt.LATEST)
    old, new = _comparable(saved["settings"]["recipe"]), _comparable(settings.recipe)
    if old != new or saved["settings"]["seed"] != settings.seed:
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise ValueError(f"--resume: the recipe or seed differs from the run in {out} (recipe fields: "
                         f"{', '.join(changed) or 'none'}; seed {saved['settings']['seed']} vs {settings.seed}); "
                         f"resume with the same settings, or start over: delete {out}, or train into another folder "
                         "with -o DIR")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    old_recipe = saved["settings"]["recipe"]
    return TrainState(**saved["state"]), int(old_recipe["epochs"]) * int(old_recipe["iterations_per_epoch"])
