"""The search loop and one trial: train under the budget with the trial's overrides, report every epoch to the
pruner, score the fold's validation cases, write the outputs (`decathlete.search.study` explains the design)."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from decathlete.search.report import write_outputs
from decathlete.search.study import (
    FINISHED,
    SearchOptions,
    Setup,
    SurplusTrial,
    counts,
    describe_trial,
    finished,
    open_storage,
    open_study,
    prepare,
    recover_dead_trials,
    retry_callback,
    worker_id,
)


def search(workdir: str | Path, options: SearchOptions, log: Any = print) -> dict[str, Any]:
    """Run (or resume, or join) the search until the study holds ``options.trials`` finished trials.

    Returns:
        The summary written to ``WORKDIR/search/<study>/search.json`` (best trial, its overrides file, counts).
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    setup = prepare(workdir, options)
    storage = open_storage(setup.storage_url)
    study = open_study(setup, storage)
    retry = retry_callback()
    log(f"search '{setup.study_name}' in {setup.storage_url}: {options.trials} trials of "
        f"{setup.budget_s:.0f} s training each, sampler {options.sampler}, pruner {options.pruner}, metric "
        f"validation {options.metric} of fold {options.fold} ({finished(study)} finished so far)")
    start = time.perf_counter()
    while True:
        for number in recover_dead_trials(study, retry):
            log(f"trial {number} was interrupted (its process is gone): failed, and queued again")
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        if finished(study) + running >= options.trials:
            break
        current: dict[str, int] = {}
        try:
            study.optimize(partial(run_trial, setup, current=current, log=log), n_trials=1, gc_after_trial=True,
                           catch=(SurplusTrial,))
        except KeyboardInterrupt:
            _queue_again(study, current, retry)
            raise
        trial = study.trials[current["number"]] if "number" in current else None
        if trial is not None:
            log(describe_trial(trial))
        write_outputs(setup, study)
    summary = write_outputs(setup, study)
    summary["wall_seconds_this_worker"] = round(time.perf_counter() - start, 1)
    summary["running_elsewhere"] = counts(study).get("RUNNING", 0)
    return summary


def _queue_again(study: optuna.Study, current: dict[str, int], retry: RetryHeartbeatStaleTrialCallback) -> None:
    """An interrupted (Ctrl-C) trial runs again when the search is resumed."""
    if "number" in current:
        trial = study.trials[current["number"]]
        if trial.state == TrialState.FAIL:
            retry(study, trial)


def run_trial(setup: Setup, trial: optuna.Trial, *, current: dict[str, int], log: Any = print) -> float:
    """Train the trial's recipe for the budget into its folder, then score the validation cases (the trial's value).

    Raises:
        optuna.TrialPruned: when the pruner stops it after an epoch.
    """
    from decathlete.crossval import validate_fold
    from decathlete.train.trainer import TrainOptions, train

    options = setup.options
    current["number"] = trial.number
    trial.set_user_attr("worker", worker_id())
    retried = trial.study.get_trials(deepcopy=False)[trial.number].system_attrs.get("failed_trial")
    trial.set_user_attr("note", None if retried is None else f"run again for interrupted trial {retried}")
    _refuse_surplus(trial, options.trials)
    drawn = setup.space.suggest(trial)
    overrides = [*options.overrides, *setup.space.overrides(drawn)]
    folder = setup.folder / f"trial_{trial.number:04d}"
    trial.set_user_attr("folder", str(folder))
    trial.set_user_attr("overrides", overrides)
    log(f"trial {trial.number}: " + ", ".join(f"{k}={v}" for k, v in drawn.items()))
    pruned: dict[str, int] = {}

    def report(epoch: Any) -> bool:
        trial.report(float(epoch.ema_dice), epoch.epoch)
        if trial.should_prune():
            pruned["epoch"] = epoch.epoch
            return True
        return False

    started = time.perf_counter()
    summary = train(setup.workdir, TrainOptions(
        configuration=options.configuration, fold=options.fold, recipe=setup.recipe.name, overrides=overrides,
        val_iterations=options.val_iterations, device=options.device, seed=options.seed,
        time_budget=setup.budget_s, model_dir=folder,
        progress=options.progress), callbacks=[report])
    trial.set_user_attr("train_seconds", round(time.perf_counter() - started, 1))
    trial.set_user_attr("epochs", summary.get("epochs"))
    trial.set_user_attr("steps", summary.get("steps"))
    if pruned:
        raise optuna.TrialPruned(f"pseudo-Dice below the median of earlier trials after epoch {pruned['epoch']}")
    started = time.perf_counter()
    scored = validate_fold(setup.workdir, folder / f"fold_{options.fold}", options.configuration,
                           device=options.device, tta=options.tta, workers=options.workers,
                           progress=options.progress)
    trial.set_user_attr("validation_seconds", round(time.perf_counter() - started, 1))
    trial.set_user_attr("n_validation_cases", len(scored.pairs))
    trial.set_user_attr("per_label", {name: {m: values.get(m) for m in ("dice", "iou")}
                                      for name, values in scored.summary["mean"].items()})
    return float(scored.summary["foreground_mean"][options.metric])


def _refuse_surplus(trial: optuna.Trial, wanted: int) -> None:
    """Workers that checked the count at the same moment may both start a trial when one was missing: the one with
    the higher number steps back (failed, marked as surplus, not counted, not retried)."""
    earlier = [t for t in trial.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
               if t.number < trial.number]
    if len(earlier) >= wanted:
        trial.set_user_attr("note", f"surplus: {wanted} trials were already running or finished when it started")
        raise SurplusTrial(f"trial {trial.number} is not needed: the study already holds {wanted} trials")
