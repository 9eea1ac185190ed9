"""The verbs of the command line as Python functions: ``validate``, ``plan``, ``preprocess``.

Each verb that reads a raw dataset validates it completely first, so bad input fails before any work, with every
problem listed (``DatasetError``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from decathlete.fingerprint import compute_fingerprint, save_fingerprint
from decathlete.io.datasets import DatasetDescription
from decathlete.io.validation import Problem, check_dataset, validate_dataset
from decathlete.planning.budget import device_description, fit_to_budget, parse_duration
from decathlete.planning.plans import Plans
from decathlete.recipes.default import get_recipe
from decathlete.registry import get

DATASET_SUMMARY_KEYS = ("name", "root", "layout", "channel_names", "labels", "regions", "regions_class_order",
                        "file_ending", "splits")


def validate(dataset: str | Path, workers: int = 1) -> list[Problem]:
    """Every problem of a raw dataset (empty when it is fine); writes nothing."""
    return validate_dataset(dataset, workers=workers)


def dataset_summary(desc: DatasetDescription) -> dict[str, Any]:
    """The dataset part of plans.json: what later stages need to find and interpret the raw data."""
    full = desc.to_dict()
    return {**{k: full[k] for k in DATASET_SUMMARY_KEYS}, "n_training": len(desc.training), "n_test": len(desc.test),
            "label_values": list(desc.label_values)}


def plan(dataset: str | Path, workdir: str | Path, gpu_memory_gb: float = 8.0, planner: str = "nnunet",
         recipe: str = "default", workers: int = 1, progress: bool = True, time_budget: str | float | None = None,
         device: str = "auto", configurations: Sequence[str] | None = None) -> Plans:
    """Validate, fingerprint and plan; writes ``WORKDIR/fingerprint.json`` and ``WORKDIR/plans.json``.

    Args:
        dataset: raw dataset folder (MSD or nnU-Net v2 layout).
        workdir: output folder (created).
        gpu_memory_gb: memory budget the patch and batch are fitted to, in GiB.
        planner: registered planner name.
        recipe: registered recipe name.
        workers: processes for validation and fingerprinting.
        progress: show progress bars.
        time_budget: wall-clock training budget per configuration (``"20m"``, ``"6h"`` or seconds): each
            configuration is narrowed and batched to fit it, by step times measured on ``device``
            (:mod:`decathlete.planning.budget`).
        device: where the budget's step times are measured (``cpu``, ``cuda``, ``auto``).
        configurations: keep only these configurations (default: all the planner made).

    Raises:
        DatasetError: listing every problem of the dataset, before anything is written.
    """
    budget_s = parse_duration(time_budget) if time_budget is not None else None  # a typo fails before the work
    desc = check_dataset(dataset, workers=workers)
    workdir = Path(workdir)
    get("planners", planner)  # fail on a bad name before the long fingerprint step
    chosen = get_recipe(recipe)
    fingerprint = compute_fingerprint(desc, workers=workers, progress=progress)
    save_fingerprint(fingerprint, workdir / "fingerprint.json")
    plans = get("planners", planner)(fingerprint, dataset_summary(desc), chosen, gpu_memory_gb=gpu_memory_gb)
    if configurations:
        missing = [c for c in configurations if c not in plans.configurations]
        if missing:
            raise KeyError(f"the planner made no configuration {missing}; it made {', '.join(plans.configurations)}")
        plans.configurations = {k: v for k, v in plans.configurations.items() if k in configurations}
    if budget_s is not None:
        from decathlete.train.trainer import resolve_device

        dev = resolve_device(device)
        for name, config in plans.configurations.items():
            print(f"fitting {name} to a {budget_s:.0f} s budget on {device_description(dev)}")
            plans.configurations[name] = fit_to_budget(config, plans, budget_s, dev)
    plans.save(workdir / "plans.json")
    return plans


def preprocess(workdir: str | Path, configurations: Sequence[str] | None = None, workers: int = 1,
               progress: bool = True) -> dict[str, Any]:
    """Crop, resample and normalise every training case for each configuration of ``WORKDIR/plans.json``.

    Writes ``WORKDIR/preprocessed/<configuration>/``; cases already complete are skipped, so an interrupted run
    resumes where it stopped.

    Returns:
        Per configuration, the summary of :func:`decathlete.preprocess.pipeline.preprocess_dataset`.
    """
    from decathlete.preprocess.pipeline import preprocess_dataset

    workdir = Path(workdir)
    plans = Plans.load(workdir / "plans.json")
    names = list(configurations) if configurations else list(plans.configurations)
    chosen = {name: plans.configuration(name) for name in names}  # unknown names fail here, before any work
    desc = check_dataset(plans.dataset["root"], workers=workers)
    results = {}
    for name, config in chosen.items():
        out = workdir / "preprocessed" / config.data_identifier
        config_dict = json.loads(json.dumps(config.__dict__, default=lambda o: o.__dict__))
        results[name] = preprocess_dataset(desc.training, config_dict, out, workers=workers, progress=progress)
    return results


def train(workdir: str | Path, configuration: str = "3d_fullres", fold: int | str = 0, **kwargs: Any
          ) -> list[dict[str, Any]]:
    """Train one fold, or every fold of the splits with ``fold="all"``; returns one summary per fold.

    Keyword arguments are those of :func:`decathlete.train.trainer.train` (``epochs``, ``iterations_per_epoch``,
    ``device``, ``resume``, ``seed``, ``num_workers``, ...).
    """
    from decathlete.train.trainer import fold_count
    from decathlete.train.trainer import train as train_fold

    folds = range(fold_count(workdir)) if fold == "all" else [int(fold)]
    return [train_fold(workdir, configuration, k, **kwargs) for k in folds]
