"""Every verb of the command line as a typed Python function: ``validate``, ``plan``, ``preprocess``, ``patches``,
``train``, ``predict``, ``crossval``, ``best``, ``evaluate``, ``search`` and ``demo``. The CLI parses arguments and
calls these, so what a command does, a script can do with the same names and defaults::

    from decathlete import api
    api.plan("Task04_Hippocampus", "work", time_budget="15m")
    api.preprocess("work")
    api.train("work", "3d_fullres", 0)
    api.predict("imagesTs", "predictions", "work")
    api.evaluate("predictions", "labelsTs", labels="work")

Each verb that reads a raw dataset validates it completely first, so bad input fails before any work, with every
problem listed (``DatasetError``). Heavy modules (torch) are imported inside the functions that need them.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from decathlete.fingerprint import compute_fingerprint, save_fingerprint
from decathlete.io.datasets import DatasetDescription
from decathlete.io.validation import Problem, check_dataset, validate_dataset
from decathlete.planning.budget import choose_configuration, device_description, parse_duration
from decathlete.planning.memory import plans_for_cpu, ram_target
from decathlete.planning.plans import Plans
from decathlete.recipes.base import resolve_recipe
from decathlete.recipes.build import with_recipe_regions
from decathlete.registry import get

DATASET_SUMMARY_KEYS = ("name", "root", "layout", "channel_names", "labels", "regions", "regions_class_order",
                        "file_ending", "splits")


def validate(dataset: str | Path, workers: int = 1) -> list[Problem]:
    """Every problem of a raw dataset in the MSD or nnU-Net v2 layout, each naming its case and the fix (empty when
    the dataset is fine); reads the voxel data with ``workers`` processes and writes nothing."""
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
    if not gpu_memory_gb > 0:  # the memory rule would shrink the patch forever
        raise ValueError(f"--gpu-memory must be a positive number of GiB, got {gpu_memory_gb}")
    if budget_s is not None:
        from decathlete.devices import resolve_device

        dev = resolve_device(device)
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
        orphans = [f"{k} needs {v.previous_stage}" for k, v in plans.configurations.items()
                   if v.previous_stage and v.previous_stage not in plans.configurations]
        if orphans:
            raise KeyError(f"a cascade stage needs its previous stage: {'; '.join(orphans)} (keep both)")
    if budget_s is not None:
        from decathlete.planning.threads import fit_with_threads
        from decathlete.train.probe import time_step

        measure = partial(time_step, recipe=chosen)  # the step the trainer will run, timed on the device
        for name, config in plans.configurations.items():
            print(f"fitting {name} to a {budget_s:.0f} s budget on {device_description(dev)}")
            plans.configurations[name] = fit_with_threads(config, plans, budget_s, dev, measure)  # the faster threads
        plans.budget_choice = choose_configuration(plans.configurations)
    plans.save(workdir / "plans.json")
    return plans


def preprocess(workdir: str | Path, configurations: Sequence[str] | None = None, workers: int = 1,
               progress: bool = True) -> dict[str, Any]:
    """Crop, resample and normalise every training case for each configuration of ``WORKDIR/plans.json``.

    Writes ``WORKDIR/preprocessed/<configuration>/``; cases already complete are skipped, so an interrupted run
    resumes where it stopped.

    Returns:
        Per configuration, the summary of :func:`decathlete.preprocess.pipeline.preprocess_dataset` (``n_cases``,
        ``n_done``, ``n_skipped``, ``seconds``, ``case_seconds``) and its ``folder``.
    """
    from decathlete.preprocess.pipeline import preprocess_dataset

    workdir = Path(workdir)
    plans = Plans.load(workdir / "plans.json")
    names = list(configurations) if configurations else list(plans.configurations)
    chosen = {name: plans.configuration(name) for name in names}  # unknown names fail here, before any work
    desc = check_dataset(plans.dataset["root"], workers=workers)
    results: dict[str, Any] = {}
    done: dict[str, str] = {}  # data identifier -> the configuration that made it (the cascade shares 3d_fullres's)
    for name, config in chosen.items():
        out = workdir / "preprocessed" / config.data_identifier
        if config.data_identifier in done:
            results[name] = results[done[config.data_identifier]]
            continue
        results[name] = {**preprocess_dataset(desc.training, plans.preprocessing_config(name), out, workers=workers,
                                              progress=progress), "folder": str(out)}
        done[config.data_identifier] = name
    return results


def patches(workdir: str | Path, configuration: str = "3d_fullres", fold: int | str | Sequence[int | str] = 0, *,
            n_train: int, n_val: int, seed: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """Pre-extract a fold's training and validation patches into HDF5 files (van den Hork 2019), for
    ``train --set sampler=patch_set``. ``fold`` as in :func:`train` (``"every"``: each fold in turn; ``"all"``:
    every case in both files).

    Returns:
        Per fold, the summary of :func:`decathlete.data.patchset.write_patch_set` (``folder``, ``train``, ``val``).
    """
    from decathlete.data.folds import parse_folds
    from decathlete.data.patchset import write_patch_set
    from decathlete.data.splits import expand_folds

    return [write_patch_set(workdir, configuration, k, n_train, n_val, seed=seed, progress=progress)
            for k in expand_folds(workdir, parse_folds(fold))]


def train(workdir: str | Path, configuration: str = "3d_fullres", fold: int | str | Sequence[int | str] = 0, *,
          recipe: str | None = None, overrides: Sequence[str] = (), epochs: int | None = None,
          iterations_per_epoch: int | None = None, val_iterations: int = 50, device: str = "auto",
          resume: bool = False, seed: int = 0, num_workers: int | None = None, compile: bool = False,
          time_budget: str | float | None = None, model_dir: str | Path | None = None, progress: bool = True,
          callbacks: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Train folds of a planned, preprocessed configuration in turn. ``fold``: a fold number, ``"all"`` (nnU-Net's:
    one model trained on every case, ``fold_all``), several of these, or ``"every"`` (each cross-validation fold;
    see `decathlete.data.folds`).

    Writes ``WORKDIR/models/<configuration>/<recipe>/fold_<k>/`` (or ``model_dir/fold_<k>``): checkpoints,
    ``training_log.txt``, ``progress.png`` and the run's plans, recipe and settings.

    Args:
        recipe: registered recipe; None = the one the plans were made with (as resolved there).
        overrides: dotted recipe overrides (``"optimizer.lr=3e-4"``); fields that shape the plan are refused.
        epochs, iterations_per_epoch: the run's length (default: the plan's for a time budget, else the recipe's).
        val_iterations: validation batches per epoch.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        resume: continue the fold folder's run, or extend a finished one to more ``epochs``.
        seed: initial weights, sampling and augmentation.
        num_workers: data-loading processes (None: 0 on a CPU, up to 8 feeding a GPU).
        compile: ``torch.compile`` the network.
        time_budget: wall-clock cap (``"20m"`` or seconds; default: the plan's budget, if it has one).
        model_dir: the folder of ``fold_<k>`` (default ``WORKDIR/models/<configuration>/<recipe>``).
        progress: progress bars.
        callbacks: called with every epoch's :class:`decathlete.train.trainer.EpochReport`; one returning True
            stops the run after that epoch.

    Returns:
        One summary per fold: ``folder``, ``epochs``, ``steps``, ``ema_dice``, ``best_ema_dice``, ``seconds``,
        ``stopped_by_time_budget``, ``stopped_by_callback``.
    """
    from decathlete.data.folds import parse_folds
    from decathlete.data.splits import expand_folds
    from decathlete.train.trainer import TrainOptions
    from decathlete.train.trainer import train as train_fold

    folds = expand_folds(workdir, parse_folds(fold))
    options = dict(recipe=recipe, overrides=overrides, epochs=epochs, iterations_per_epoch=iterations_per_epoch,
                   val_iterations=val_iterations, device=device, resume=resume, seed=seed, num_workers=num_workers,
                   compile=compile, time_budget=time_budget, model_dir=model_dir, progress=progress)
    return [train_fold(workdir, TrainOptions(configuration=configuration, fold=k, **options), callbacks)
            for k in folds]


def predict(input_dir: str | Path, output_dir: str | Path, model: str | Path,
            configuration: str | Sequence[str] = "3d_fullres",
            folds: int | str | Sequence[int | str] | None = None, *, checkpoint: str = "checkpoint_final.pth",
            recipe: str | None = None, overrides: Sequence[str] = (), tta: bool | None = None,
            step: float | None = None, whole_volume: bool = True, postprocess: bool = True,
            save_probabilities: bool = False, overwrite: bool = False, on_conflict: str = "refuse",
            device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Segment every image of ``input_dir`` (one file per case, or nnU-Net ``_0000`` channel files) into
    ``output_dir/<case><ending>`` with exactly the input's geometry; resumable, inputs never touched.

    Args:
        model: work folder, or a ``models/<configuration>/<recipe>`` folder of ``fold_<k>``.
        configuration: a configuration, or several (a work folder's): their probabilities are averaged per case and
            the ensemble's postprocessing applied, when :func:`best` chose one (:mod:`decathlete.infer.ensemble`);
            folds, checkpoint, TTA, step and overrides apply to every one.
        folds: folds to ensemble: fold numbers and/or ``"all"`` (the ``fold_all`` model, trained on every case);
            None or ``"every"`` = every cross-validation fold whose training finished (the others are named in
            ``skipped_folds``).
        checkpoint: checkpoint file name in each fold folder.
        recipe: which recipe's folds, when a work folder holds several.
        overrides: ``inference.*`` overrides of the model's recipe.
        tta, step: mirroring and sliding-window step (None: the recipe's ``inference`` settings).
        whole_volume: one forward pass for an image a little larger than the patch, when cheaper than tiles.
        postprocess: apply the model's ``postprocessing.json`` (chosen by :func:`crossval`).
        save_probabilities: also write ``<case>.npz`` with the class probabilities.
        overwrite: predict cases again whose output exists.
        on_conflict: ``"refuse"`` outputs that another model or other settings wrote (the default), or ``"redo"``
            them.

    Returns:
        ``n_cases``, ``n_done``, ``n_skipped``, ``seconds``, ``model`` (the folder of the fold folders), ``folds``
        (the fold folders used), ``skipped_folds``, ``case_seconds``, ``outputs`` (case id -> file) and
        ``efficiency`` (what ``efficiency.json`` holds). Several configurations add ``configurations``,
        ``members`` (each one's model folder and folds), ``postprocessing`` (the file applied, or None) and
        ``postprocessing_note``; their ``folds`` read ``<config>/fold_<k>``.

    Raises:
        decathlete.errors.CasesFailed: after the other cases are written, naming the cases that failed.
    """
    configurations = [configuration] if isinstance(configuration, str) else list(configuration)
    if not configurations:
        raise ValueError("no configuration given: name one or more (-c 3d_fullres, or -c 2d 3d_fullres)")
    options = dict(overwrite=overwrite, save_probabilities=save_probabilities, progress=progress,
                   on_conflict=on_conflict, checkpoint=checkpoint, device=device, tta=tta, step=step, recipe=recipe,
                   postprocess=postprocess, whole_volume=whole_volume, overrides=overrides)
    if len(configurations) > 1:
        from decathlete.infer.ensemble import predict_ensemble_folder

        return predict_ensemble_folder(input_dir, output_dir, model, configurations, folds, **options)
    from decathlete.infer.predictor import predict_folder

    return predict_folder(input_dir, output_dir, model, configurations[0], folds, **options)


def crossval(workdir: str | Path, configuration: str = "3d_fullres",
             folds: int | str | Sequence[int | str] = "every", *,
             recipe: str | None = None, checkpoint: str = "checkpoint_final.pth", overrides: Sequence[str] = (),
             tta: bool | None = None, step: float | None = None, whole_volume: bool = True, workers: int = 1,
             overwrite: bool = False, device: str = "auto", progress: bool = True,
             save_probabilities: bool = False) -> dict[str, Any]:
    """Every trained fold predicts its held-out cases from the raw images; the predictions are scored per fold and
    together, and the connected-component postprocessing is chosen on them (:mod:`decathlete.crossval`).
    ``save_probabilities`` also writes each validation case's probabilities (``fold_<k>/validation/<case>.npz``),
    which :func:`best` needs to score ensembles of configurations.
    ``folds``: fold numbers, or ``"every"`` (each cross-validation fold, all finished); ``"all"`` is refused, as
    ``fold_all`` holds no case out.

    Returns:
        ``folds``, ``n_cases``, ``mean`` (per label: Dice, NSD, HD95 ...), ``foreground_mean``,
        ``postprocessing`` (what was chosen, mean Dice before and after), ``postprocessed_mean``, ``folder`` and
        ``probabilities_saved`` (every validation case has its ``.npz``).
    """
    from decathlete.crossval import cross_validate

    return cross_validate(workdir, configuration, folds, recipe=recipe, checkpoint=checkpoint, device=device,
                          tta=tta, step=step, workers=workers, overwrite=overwrite, progress=progress,
                          whole_volume=whole_volume, overrides=overrides, save_probabilities=save_probabilities)


def best(workdir: str | Path, configurations: Sequence[str] | None = None, recipe: str | None = None,
         workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Choose among the cross-validated configurations of a work folder and their pairwise ensembles
    (:mod:`decathlete.selection`, nnU-Net v2's ``nnUNetv2_find_best_configuration``): each is scored by the mean
    foreground Dice of its cross-validation predictions before postprocessing, on the same cases; the winner's
    postprocessing is chosen (an ensemble's into ``WORKDIR/ensembles/<A>+<B>/postprocessing.json``).

    Args:
        configurations: only these (default: every one whose ``crossval`` ran).
        recipe: the recipe folder of every configuration (default: the plans' recipe, or the only one
            cross-validated).
        workers: processes for scoring.

    Returns:
        The ``WORKDIR/best.json`` document: ``candidates`` (configurations, recipes, mean foreground Dice, Dice per
        label, ``n_cases``), ``cases``, ``skipped`` (with the reason and the fix), ``chosen`` (with its
        postprocessing) and ``command`` (the ``decathlete predict`` command line that uses it).
    """
    from decathlete.selection import find_best

    return find_best(workdir, configurations, recipe, workers=workers, progress=progress)


def evaluate(pred_dir: str | Path, ref_dir: str | Path, labels: str | Path | Mapping[str, Any] | None = None,
             nsd_tolerance: float | Mapping[str, float] | Sequence[str] = 1.0, *, output: str | Path | None = None,
             workers: int = 1, only_predicted: bool = False, ignore_label: int | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Score the label maps of ``pred_dir`` against those of ``ref_dir``, paired by case id; writes
    ``summary.json`` (default ``PRED/summary.json``), a per-case CSV and box plots.

    Args:
        labels: what is scored: a dataset folder or ``dataset.json`` (its labels and regions), a work folder (its
            plans' labels, or a recipe's regions), a mapping ``name -> value or [values]``, or None (every value in
            the references). A path also gives the ignore label, if the dataset has one.
        nsd_tolerance: NSD tolerance in mm: one number, ``{label: mm}``, or ``--nsd-tolerance`` words
            (``["1", "Mandible=2"]``).
        only_predicted: score the predicted cases when some references have none (the summary's ``left_out``
            says how many); otherwise a missing prediction is an error.
        ignore_label: a label value whose voxels count nowhere (with a mapping ``labels``).

    Returns:
        The summary: ``per_case``, ``mean`` per label, ``foreground_mean``, conventions, and ``left_out``.
    """
    from decathlete.evaluate import evaluate_folder, labels_to_score, parse_tolerances

    if isinstance(labels, (str, Path)):
        labels, ignore_label = labels_to_score(labels)
    if not isinstance(nsd_tolerance, (int, float, Mapping)):
        nsd_tolerance = parse_tolerances(list(nsd_tolerance), labels)
    output = Path(pred_dir) / "summary.json" if output is None else output
    return evaluate_folder(pred_dir, ref_dir, labels, nsd_tolerance, workers=workers, output=output,
                           ignore_label=ignore_label, only_predicted=only_predicted, progress=progress)


def search(workdir: str | Path, space: str | Path, trials: int = 20, trial_budget: str | float = "2m", *,
           configuration: str = "3d_fullres", fold: int = 0, recipe: str | None = None,
           overrides: Sequence[str] = (), sampler: str = "tpe", startup_trials: int | None = None,
           pruner: str = "median", storage: str | None = None, study: str | None = None, metric: str = "dice",
           seed: int = 0, device: str = "auto", tta: bool | None = None, baseline: bool = True,
           val_iterations: int = 50, workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Search the recipe's hyperparameters over ``space`` on one fold (:mod:`decathlete.search`): every trial trains
    for ``trial_budget`` and is scored on the fold's validation cases; resumes or joins the study when it exists.

    Args:
        space: JSON file of dotted recipe fields and their ranges (``examples/search/``).
        trials: finished trials the study should hold (whoever ran them).
        trial_budget: wall-clock training time of every trial (``"2m"`` or seconds).
        recipe, overrides: the recipe and the ``--set`` overrides every trial gets before the space's values.
        sampler: ``tpe``, ``random`` or ``random-around-best`` (registry kind ``search_samplers``).
        startup_trials: TPE's random trials before it models (None: a third of ``trials``, 1 to 10).
        pruner: ``median`` (on the epochs' pseudo-Dice) or ``none``.
        storage: Optuna storage URL shared by workers (default ``sqlite:///WORKDIR/search/search.db``).
        study: study name (default ``<recipe>-<configuration>-fold<k>``).
        metric: ``dice`` or ``iou``, the foreground mean over the validation cases.
        seed: seed of the sampler and of every trial's training.
        tta: mirroring at scoring (None: the recipe's).
        baseline: the first trial at the recipe's own values.
        val_iterations: validation batches per training epoch (the pseudo-Dice the pruner sees).
        workers: processes for scoring.

    Returns:
        The summary of ``WORKDIR/search/<study>/search.json``: the best trial and its override file, counts per state.
    """
    from decathlete.search.run import search as run_search
    from decathlete.search.study import SearchOptions

    return run_search(workdir, SearchOptions(
        space=space, trials=trials, trial_budget=trial_budget, configuration=configuration, fold=fold, recipe=recipe,
        overrides=overrides, sampler=sampler, startup_trials=startup_trials, pruner=pruner, storage=storage,
        study=study, metric=metric, seed=seed, device=device, tta=tta, baseline=baseline,
        val_iterations=val_iterations, workers=workers, progress=progress))


def demo(workdir: str | Path = "demo_work", data: str | Path | None = None, quick: bool = False, workers: int = 2,
         device: str = "auto") -> dict[str, Any]:
    """The whole pipeline on the built-in synthetic dataset (or ``data``), as ``decathlete demo`` runs it
    (:mod:`decathlete.demo`): plan for a short time budget, train fold 0, predict and score its held-out cases.

    Returns:
        ``summary`` (the evaluation), ``report`` (path of ``report.html``) and ``timings`` (seconds per stage).
    """
    from decathlete.demo import run_demo

    return run_demo(workdir, data=data, quick=quick, workers=workers, device=device)
