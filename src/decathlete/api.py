"""The verbs of the command line as Python functions: ``validate``, ``plan``, ``preprocess``, ``train``,
``search``.

Each verb that reads a raw dataset validates it completely first, so bad input fails before any work, with every
problem listed (``DatasetError``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from decathlete.fingerprint import compute_fingerprint, save_fingerprint
from decathlete.io.datasets import DatasetDescription
from decathlete.io.validation import Problem, check_dataset, validate_dataset
from decathlete.planning.budget import device_description, fit_to_budget, parse_duration
from decathlete.planning.memory import plans_for_cpu, ram_target
from decathlete.planning.plans import Plans
from decathlete.recipes.base import resolve_recipe
from decathlete.recipes.build import with_recipe_regions
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


def plan(dataset: str | Path, workdir: str | Path, gpu_memory_gb: float = 8.0, planner: str | None = None,
         recipe: str = "default", workers: int = 1, progress: bool = True, time_budget: str | float | None = None,
         device: str = "auto", configurations: Sequence[str] | None = None, overrides: Sequence[str] = (),
         ram_gb: float | None = None) -> Plans:
    """Validate, fingerprint and plan; writes ``WORKDIR/fingerprint.json`` and ``WORKDIR/plans.json``.

    Args:
        dataset: raw dataset folder (MSD or nnU-Net v2 layout).
        workdir: output folder (created).
        gpu_memory_gb: GPU memory budget the patch and batch are fitted to, in GiB.
        planner: registered planner name (default: the recipe's).
        recipe: registered recipe name.
        overrides: dotted recipe overrides (``planning.batch_size=1`` ...); the resolved recipe goes into the plans.
        workers: processes for validation and fingerprinting.
        progress: show progress bars.
        time_budget: wall-clock training budget per configuration (``"20m"``, ``"6h"`` or seconds): each
            configuration is narrowed and batched to fit it, by step times measured on ``device``
            (:mod:`decathlete.planning.budget`).
        device: where the budget's step times are measured (``cpu``, ``cuda``, ``auto``). A plan for the CPU
            (``cpu``, or ``auto`` without CUDA when there is a ``time_budget``) is sized to a share of the machine's
            RAM instead of ``gpu_memory_gb`` (:mod:`decathlete.planning.memory`); otherwise the plan is nnU-Net's.
        configurations: keep only these configurations (default: all the planner made).
        ram_gb: the physical RAM a CPU plan is sized to a share of, in GiB (default: this machine's).

    Raises:
        DatasetError: listing every problem of the dataset, before anything is written.
    """
    budget_s = parse_duration(time_budget) if time_budget is not None else None  # a typo fails before the work
    memory = {"memory": ram_target(ram_gb)} if plans_for_cpu(device, budget_s is not None) else {}
    # a bad recipe, override or planner name fails before the long fingerprint step
    chosen = resolve_recipe(recipe, [*overrides, *([f"planner={planner}"] if planner else [])])
    desc = check_dataset(dataset, workers=workers)
    summary = with_recipe_regions(dataset_summary(desc), chosen)
    workdir = Path(workdir)
    fingerprint = compute_fingerprint(desc, workers=workers, progress=progress)
    save_fingerprint(fingerprint, workdir / "fingerprint.json")
    planner = get("planners", chosen.planner)
    if "memory" not in inspect.signature(planner).parameters:
        memory = {}  # a plugin planner without the keyword plans for the GPU, and its plans' memory_target says so
    plans = planner(fingerprint, summary, chosen, gpu_memory_gb=gpu_memory_gb, **memory)
    plans.recipe, plans.recipe_settings = chosen.name, chosen.to_dict()  # whatever the planner wrote
    if configurations:
        missing = [c for c in configurations if c not in plans.configurations]
        if missing:
            raise KeyError(f"the planner made no configuration {missing}; it made {', '.join(plans.configurations)}")
        plans.configurations = {k: v for k, v in plans.configurations.items() if k in configurations}
    if budget_s is not None:
        from decathlete.devices import resolve_device
        from decathlete.train.probe import time_step

        dev = resolve_device(device)
        measure = partial(time_step, recipe=chosen)  # the step the trainer will run, timed on the device
        for name, config in plans.configurations.items():
            print(f"fitting {name} to a {budget_s:.0f} s budget on {device_description(dev)}")
            plans.configurations[name] = fit_to_budget(config, plans, budget_s, dev, measure)
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
        results[name] = preprocess_dataset(desc.training, plans.preprocessing_config(name), out, workers=workers,
                                           progress=progress)
    return results


def train(workdir: str | Path, configuration: str = "3d_fullres", fold: int | str = 0, *,
          callbacks: Sequence[Any] = (), **options: Any) -> list[dict[str, Any]]:
    """Train one fold, or every fold of the splits with ``fold="all"``; returns one summary per fold.

    Keyword arguments are the fields of :class:`decathlete.train.trainer.TrainOptions` (``recipe``, ``overrides``,
    ``epochs``, ``device``, ``resume``, ``seed``, ``model_dir`` ...); ``callbacks`` receive every epoch's report.
    """
    from decathlete.data.splits import fold_count
    from decathlete.train.trainer import TrainOptions
    from decathlete.train.trainer import train as train_fold

    folds = range(fold_count(workdir)) if fold == "all" else [int(fold)]
    return [train_fold(workdir, TrainOptions(configuration=configuration, fold=k, **options), callbacks)
            for k in folds]


def search(workdir: str | Path, space: str | Path, trials: int = 20, trial_budget: str | float = "2m",
           **options: Any) -> dict[str, Any]:
    """Search the recipe's hyperparameters over ``space`` on one fold (`decathlete.search.study`); resumes or joins
    the study when it exists. Keyword arguments are the other fields of
    :class:`decathlete.search.study.SearchOptions` (``configuration``, ``fold``, ``recipe``, ``overrides``,
    ``sampler``, ``startup_trials``, ``pruner``, ``storage``, ``study``, ``metric``, ``seed``, ``device`` ...).

    Returns:
        The summary of ``WORKDIR/search/<study>/search.json``: the best trial and its override file, counts per state.
    """
    from decathlete.search.run import search as run_search
    from decathlete.search.study import SearchOptions

    return run_search(workdir, SearchOptions(space=space, trials=trials, trial_budget=trial_budget, **options))
