"""``decathlete search``: hyperparameter search over any recipe on one fold, as an Optuna study.

Every trial is a real training run under the recipe contract: the recipe (the plans' one, or ``--recipe``) with the
user's ``--set`` overrides, then the space's fixed entries, then the drawn values (`decathlete.search.space`),
trained for the same wall-clock budget (``--trial-budget``) into its own folder ``WORKDIR/search/<study>/trial_<n>/``
and scored by the real metric: its model predicts the fold's validation cases from the raw images (sliding window,
the recipe's TTA) and ``evaluate`` averages the foreground Dice (or IoU) over them. Every epoch's EMA pseudo-Dice is
reported to Optuna, so the median pruner can stop a trial that trails the others at the same epoch.

The study lives in an Optuna RDB storage: a SQLite file ``WORKDIR/search/search.db`` by default, or any URL
(PostgreSQL, MySQL) that several processes or machines share. A search that is killed resumes when run again: a
trial whose process is gone (same machine: its process id no longer runs; another machine: its heartbeat stopped for
``GRACE_S``) is marked failed and queued again with the same values, under a new number, so it is never counted
twice. ``--trials N`` counts finished trials (complete or pruned) of the whole study, whichever worker ran them.

The first trial is the recipe's own values where they lie inside the space (``--no-baseline`` to skip it), so a
search always reports where it started.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from decathlete.data.folds import single_fold
from decathlete.devices import resolve_device
from decathlete.planning.budget import parse_duration
from decathlete.planning.plans import Configuration, Plans
from decathlete.recipes import build
from decathlete.recipes.base import Recipe, validate
from decathlete.recipes.schema import RecipeError, parse_value
from decathlete.registry import get, names
from decathlete.search.space import SearchSpace, SpaceError, current_values, load_space

HEARTBEAT_S, GRACE_S = 30, 120
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SETTINGS_KEYS = ("recipe", "configuration", "fold", "space", "metric", "trial_budget_s", "overrides")


class SearchError(ValueError):
    """A search that cannot start; the message names the problem and the fix."""


class SurplusTrial(Exception):
    """A trial started by a worker after the others had already started or finished all ``--trials``."""


@dataclass
class SearchOptions:
    """What ``decathlete search`` takes (see the CLI's help).

    Attributes:
        space: the space file (`decathlete.search.space`).
        trials: finished trials the study should hold.
        trial_budget: wall-clock training budget of every trial (``"2m"`` or seconds).
        recipe: registered recipe (default: the plans').
        overrides: ``--set`` overrides every trial gets before the space's.
        sampler: registry kind ``search_samplers`` (``tpe``, ``random``, ``random-around-best``).
        startup_trials: TPE's random trials before it models; None = a third of ``trials``, 1 to 10.
        pruner: ``median`` (Optuna's MedianPruner on the epochs' pseudo-Dice) or ``none``.
        storage: Optuna storage URL (default ``sqlite:///WORKDIR/search/search.db``).
        study: study name (default ``<recipe>-<configuration>-fold<k>``).
        metric: ``dice`` or ``iou``, the foreground mean over the validation cases.
        tta: mirroring at scoring (None: the recipe's).
        baseline: first trial at the recipe's own values.
        val_iterations: the trainer's validation batches per epoch (the pseudo-Dice the pruner sees).
    """

    space: str | Path
    trials: int = 20
    trial_budget: str | float = "2m"
    configuration: str = "3d_fullres"
    fold: int = 0
    recipe: str | None = None
    overrides: Sequence[str] = ()
    sampler: str = "tpe"
    startup_trials: int | None = None
    pruner: str = "median"
    storage: str | None = None
    study: str | None = None
    metric: str = "dice"
    seed: int = 0
    device: str = "auto"
    tta: bool | None = None
    baseline: bool = True
    val_iterations: int = 50
    workers: int = 1
    progress: bool = True


@dataclass
class Setup:
    """A checked search: everything resolved before any training."""

    workdir: Path
    options: SearchOptions
    plans: Plans
    recipe: Recipe
    space: SearchSpace
    budget_s: float
    study_name: str
    storage_url: str
    folder: Path

    def settings(self) -> dict[str, Any]:
        return {"recipe": self.recipe.name, "configuration": self.options.configuration, "fold": self.options.fold,
                "space": self.space.raw, "metric": self.options.metric, "trial_budget_s": self.budget_s,
                "overrides": list(self.options.overrides)}


def prepare(workdir: str | Path, options: SearchOptions) -> Setup:
    """Check everything a search needs before it opens the study or trains anything.

    Raises:
        SearchError, SpaceError, RecipeError, FileNotFoundError: naming the problem and the fix.
    """
    workdir = Path(workdir).resolve()
    if not (workdir / "plans.json").is_file():
        raise FileNotFoundError(f"{workdir} has no plans.json: run `decathlete plan DATASET -o {workdir}` and "
                                "`decathlete preprocess` first")
    plans = Plans.load(workdir / "plans.json")
    config = plans.configuration(options.configuration)
    try:
        single_fold(options.fold)
    except ValueError as err:
        raise SearchError(f"search scores trials on one fold's held-out cases: {err}") from None
    if options.metric not in ("dice", "iou"):
        raise SearchError(f"--metric must be dice or iou, got '{options.metric}'")
    if options.sampler not in names("search_samplers"):
        raise SearchError(f"unknown sampler '{options.sampler}'; choose one of {', '.join(names('search_samplers'))}")
    if options.pruner not in ("median", "none"):
        raise SearchError(f"--pruner must be median or none, got '{options.pruner}'")
    if options.trials < 1:
        raise SearchError(f"--trials must be at least 1, got {options.trials}")
    budget_s = parse_duration(options.trial_budget)
    resolve_device(options.device)  # a wrong device fails here, not inside the first trial
    recipe = validate(build.plans_recipe(plans, options.recipe).with_overrides(options.overrides))
    build.check_against_plans(recipe, plans, config, workdir)

    def fits_the_plan(probe: Recipe) -> None:
        try:
            build.check_against_plans(probe, plans, config, workdir)
        except RecipeError as err:
            raise SpaceError(f"{options.space}: a trial cannot change what shapes the plan ({err})") from None

    space = load_space(options.space, recipe, fits_the_plan)
    _check_preprocessed(workdir, plans, config, options)
    study_name = options.study or f"{recipe.name}-{options.configuration}-fold{options.fold}"
    folder = workdir / "search" / study_name
    url = options.storage or f"sqlite:///{workdir / 'search' / 'search.db'}"
    return Setup(workdir, options, plans, recipe, space, budget_s, study_name, url, folder)


def _check_preprocessed(workdir: Path, plans: Plans, config: Configuration, options: SearchOptions) -> None:
    from decathlete.data.splits import check_fold_preprocessed, fold_split

    split = fold_split(workdir, plans, options.fold)
    check_fold_preprocessed(workdir, config.data_identifier, options.configuration, options.fold, split)
    if not split["val"]:
        raise FileNotFoundError(f"fold {options.fold} of '{options.configuration}' is not ready to search: the fold "
                                "has no validation cases")


def open_storage(url: str) -> RDBStorage:
    """The study's storage, with heartbeats and a retry of every trial whose process died.

    Raises:
        SearchError: the URL cannot be opened (naming it and the reason).
    """
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                              heartbeat_stale_trial_callback=retry_callback())
    except Exception as err:  # SQLAlchemy's errors for a bad URL, a missing driver, a refused connection
        raise SearchError(f"cannot open the search storage '{url}': {type(err).__name__}: {err}. Give a SQLite "
                          "file (sqlite:///path/search.db) or a reachable database URL (postgresql://user@host/db "
                          "with its driver installed)") from None


def open_study(setup: Setup, storage: RDBStorage) -> optuna.Study:
    """Create the study (its settings recorded, the baseline trial queued) or load it, refusing one made for other
    settings."""
    options = setup.options
    startup = options.startup_trials if options.startup_trials is not None else max(1, min(10, options.trials // 3))
    sampler = get("search_samplers", options.sampler)(seed=options.seed, startup_trials=startup)
    # No pruning before 3 trials finished, nor in a trial's first two epochs: an early pseudo-Dice says little.
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2) if options.pruner == "median" \
        else optuna.pruners.NopPruner()
    kwargs = {"study_name": setup.study_name, "storage": storage, "sampler": sampler, "pruner": pruner}
    try:
        study = optuna.create_study(direction="maximize", load_if_exists=False, **kwargs)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(**kwargs)
        _check_settings(study, setup)
        return study
    study.set_user_attr("settings", setup.settings())
    if options.baseline:
        start = setup.space.encode(current_values(setup.space, setup.recipe.to_dict(), _preset_values(setup)))
        if start:
            study.enqueue_trial(start, user_attrs={"baseline": True})
    return study


def _preset_values(setup: Setup) -> dict[str, Any]:
    """``augment.<field>`` values the recipe leaves to its preset, as this configuration gets them."""
    config = setup.plans.configuration(setup.options.configuration)
    augmentation, _ = build.build_augmentation(setup.recipe, config)
    return {f"augment.{k}": v for k, v in asdict(augmentation).items()}


def _check_settings(study: optuna.Study, setup: Setup) -> None:
    wanted = json.loads(json.dumps(setup.settings()))
    for _ in range(60):  # a worker that created the study a moment ago may not have recorded them yet
        saved = study.user_attrs.get("settings")
        if saved is not None:
            break
        time.sleep(0.5)
        study = optuna.load_study(study_name=study.study_name, storage=study._storage)
    differing = [k for k in SETTINGS_KEYS if (saved or {}).get(k) != wanted[k]]
    if differing:
        raise SearchError(f"study '{study.study_name}' in {setup.storage_url} was started with other settings "
                          f"({', '.join(differing)} differ); resume it with the same ones, or start another with "
                          "--study NEW_NAME")


def worker_id() -> dict[str, Any]:
    """This process as a trial records it: host, process id and the process's start time (pid reuse)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _start_time(os.getpid())}


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(worker: dict[str, Any]) -> bool:
    pid = int(worker.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return worker.get("pid_start") is None or _start_time(pid) in (None, worker["pid_start"])


def retry_callback() -> RetryHeartbeatStaleTrialCallback:
    """Queues a failed trial again with its values (up to 3 times)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=3)


def recover_dead_trials(study: optuna.Study, retry: RetryHeartbeatStaleTrialCallback | None = None) -> list[int]:
    """Fail and queue again every running trial of this machine whose process is gone (another machine's are failed
    by Optuna once their heartbeat is older than the grace period). Returns their numbers."""
    retry = retry or retry_callback()
    me = worker_id()
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker") or {}
        if worker.get("host") != me["host"] or worker.get("pid") == me["pid"] or _alive(worker):
            continue
        study._storage.set_trial_user_attr(trial._trial_id, "note", "interrupted: its process is gone; run again "
                                                                  "as a new trial")
        if study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
            retry(study, study._storage.get_trial(trial._trial_id))
            recovered.append(trial.number)
    return recovered


def counts(study: optuna.Study) -> dict[str, int]:
    """Trials per state name."""
    found: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        found[trial.state.name] = found.get(trial.state.name, 0) + 1
    return found


def finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def describe_trial(trial: FrozenTrial) -> str:
    """One line: number, state, value (a pruned trial's last pseudo-Dice) and the drawn values."""
    value = "" if trial.value is None else f" {trial.value:.4f}"
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        epoch = max(trial.intermediate_values)
        value = f" after epoch {epoch} (pseudo-Dice {trial.intermediate_values[epoch]:.4f})"
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    return f"trial {trial.number} {trial.state.name.lower()}{value} ({params})"


def overrides_of(setup: Setup, params: dict[str, Any]) -> dict[str, Any]:
    """The override file of a trial: the user's --set values, then the space's (fixed, then drawn)."""
    user = {}
    for assignment in setup.options.overrides:
        path, _, text = assignment.partition("=")
        user[path.strip()] = parse_value(text)
    return {**user, **setup.space.override_values(setup.space.decode(params))}
