"""The one training loop: setup -> (train epoch -> validate -> end epoch) until done -> finish.

Everything pluggable comes from the recipe through `decathlete.recipes.build` (network, loss, optimiser, schedule,
augmentation, sampler); the step each iteration runs is `decathlete.train.step.TrainStep`, the one the budget probe
times. A run is a pure function of its settings: batch ``i`` and its augmentation are drawn from generators seeded
by ``(seed, rank, i)``, so ``--resume`` after a crash (even SIGKILL) replays the interrupted epoch exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from decathlete.data import cascade
from decathlete.data.folds import ALL, Fold, fold_name
from decathlete.data.splits import check_fold_preprocessed, fold_split
from decathlete.devices import memory_format, resolve_device
from decathlete.io import checkpoint as ckpt
from decathlete.planning import budget as budgeting
from decathlete.planning.budget import parse_duration
from decathlete.planning.plans import Configuration, Plans
from decathlete.planning.threads import torch_threads
from decathlete.recipes import build
from decathlete.recipes.base import Recipe, saved_recipe, validate
from decathlete.train import run as records
from decathlete.train.batches import TrainBatches, ValidationBatches, default_workers
from decathlete.train.clock import TrainingClock, achieved_vs_planned, budget_spent, extended_anchor, refit_epochs
from decathlete.train.distributed import World, all_reduce_sum, barrier, init_world, local_batch_size, shutdown
from decathlete.train.progress import TrainingLog
from decathlete.train.step import TrainStep, build_step
from decathlete.train.validation import Validation
from decathlete.train.validation import validate as validate_epoch

EMA_DECAY = 0.9  # nnU-Net's pseudo-Dice smoothing


@dataclass
class TrainOptions:
    """What to train and how (`train` resolves it into the `RunSettings` saved with the model).

    Attributes:
        configuration, fold: what to train; fold ``"all"`` is nnU-Net's: one model trained and validated on every
            case of the splits, in ``fold_all`` (`decathlete.data.folds`).
        recipe: registered recipe; None = the one the plans were made for (as resolved there).
        overrides: dotted recipe overrides (``"optimizer.lr=3e-4"``, see `decathlete.recipes.base`).
        epochs, iterations_per_epoch: the run's length (default: the plan's for a time budget, else the recipe's).
        val_iterations: validation batches per epoch; with a time budget the most, fewer where they would take
            more than ``VAL_SHARE`` of it (`decathlete.planning.budget.validation_batches`).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        resume: continue the fold folder's run (its own ``recipe.json``), or extend a finished one.
        seed: initial weights, sampling and augmentation.
        num_workers: loader processes (None: 0 on a CPU, several feeding a GPU).
        compile: ``torch.compile`` the network.
        time_budget: wall-clock cap (``"20m"`` or seconds; default: the plan's budget, if any).
        model_dir: the folder of ``fold_<k>``; default ``WORKDIR/models/<configuration>/<recipe>`` (search trials and
            other runs of one recipe give their own).
        progress: progress bars.
    """

    configuration: str = "3d_fullres"
    fold: Fold = 0
    recipe: str | None = None
    overrides: Sequence[str] = ()
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    val_iterations: int = 50
    device: str = "auto"
    resume: bool = False
    seed: int = 0
    num_workers: int | None = None
    compile: bool = False
    time_budget: str | float | None = None
    model_dir: str | Path | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        # checked before any work: 0 epochs would fall back to the plan's silently, 0 validation batches fail late
        for name, value, least in (("epochs", self.epochs, 1), ("iterations_per_epoch", self.iterations_per_epoch, 1),
                                   ("val_iterations", self.val_iterations, 1), ("workers", self.num_workers, 0)):
            if value is not None and value < least:
                raise ValueError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")


@dataclass
class EpochReport:
    """What callbacks receive after every epoch (for logging, search reporting and pruning)."""

    epoch: int
    step: int
    train_loss: float
    val_loss: float
    pseudo_dice: list[float]
    ema_dice: float
    lr: float
    seconds: float
    folder: Path
    confusion: list[list[int]] | None = None  # validation voxels, rows reference, columns predicted (not regions)


# A callback returning True stops training after this epoch (with the final checkpoint written, as for a budget).
Callback = Callable[[EpochReport], bool | None]


@dataclass
class _Run:
    """Everything `_setup` builds for the loop."""

    settings: records.RunSettings
    world: World
    dev: torch.device
    out: Path
    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: TrainStep
    train_batches: TrainBatches
    val_batches: ValidationBatches
    schedule: Callable[[int, int], float]
    base_lr: float
    state: records.TrainState
    clock: TrainingClock
    log: TrainingLog
    progress: bool
    total_steps: int = 0
    reserve_s: float = 0.0
    planned: dict[str, Any] = field(default_factory=dict)  # the plan's budget figures (Configuration.training)
    val_default: int = 50  # the most validation batches per epoch (TrainOptions.val_iterations)
    val_batch_seconds: float | None = None  # one validation batch: last measured, else the plan's forward
    train_seconds: float = 0.0  # this session's training, without validation, for the achieved s/step
    session_steps: int = 0
    out_of_time: bool = False
    stopped: bool = False
    callbacks: list[Callback] = field(default_factory=list)


def train(workdir: str | Path, options: TrainOptions | None = None,
          callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train one fold of one configuration (see `TrainOptions`); writes the fold folder.

    Returns:
        A summary: the output folder, epochs and steps done, the last and best EMA pseudo-Dice, seconds, and
        whether the time budget or a callback stopped the run.
    """
    workdir, options = Path(workdir), options or TrainOptions()
    plans = Plans.load(workdir / "plans.json")
    config = plans.configuration(options.configuration)
    name = options.recipe or plans.recipe
    model_dir = Path(options.model_dir) if options.model_dir else workdir / "models" / options.configuration / name
    out = model_dir / fold_name(options.fold)
    recipe = _resolve_recipe(plans, config, options, out, workdir)
    config = build.trained_configuration(recipe, config)  # the recipe's dropout, activation ... on the planned net
    plans = replace(plans, configurations={**plans.configurations, options.configuration: config})
    budget = options.time_budget if options.time_budget is not None else (config.training or {}).get("budget_seconds")
    dev = resolve_device(options.device)
    world = init_world(dev.type)
    if dev.type == "cuda":
        dev = torch.device("cuda", world.local_rank)
    workers = default_workers(dev) if options.num_workers is None else options.num_workers
    settings = records.RunSettings(options.configuration, options.fold, recipe.to_dict(), options.seed,
                                   options.val_iterations, workers, dev.type, options.compile,
                                   time_budget=parse_duration(budget) if budget is not None else None)
    planned = config.training or {}
    try:
        if settings.time_budget:  # refused before the fold folder is written; validation sized to the budget
            budgeting.check_planned_budget(settings.time_budget, planned, budget)
            settings.val_iterations = budgeting.validation_batches(
                settings.time_budget, settings.epochs, planned.get("forward_seconds"), options.val_iterations)
        # on a CPU, the thread count the plan found fastest (`decathlete.planning.threads`)
        threads = (planned.get("threads") or {}).get("threads") if dev.type == "cpu" else None
        with torch_threads(threads):
            run = _setup(workdir, plans, config, recipe, settings, world, dev, out, options)
            run.planned, run.val_default = planned, options.val_iterations
            run.val_batch_seconds = planned.get("forward_seconds")
            run.callbacks = list(callbacks)
            if threads:
                run.log(f"{threads} torch thread(s), as the plan measured fastest on this machine")
            summary = _loop(run)
        # Leave together: a rank tearing the group down while another still writes can leave that one waiting on
        # the group's store at exit (seen once on a loaded 2-core machine). Not on errors: torchrun stops the rest.
        barrier(world)
        return summary
    finally:
        shutdown(world)


def _check_measured_step(run: _Run, step_s: float) -> None:
    """`check_planned_budget` for a plan without step times, at the run's second step (the first pays warm-up):
    timing steps before the run would cost as much as the steps it makes anyway."""
    if run.settings.time_budget and "step_seconds" not in run.planned:
        budget = run.settings.time_budget  # the ranks' mean step: every rank refuses, or none
        step_s = float(all_reduce_sum(torch.tensor(step_s, device=run.dev), run.world).item()) / run.world.size
        budgeting.check_budget_holds(budget, step_s, run.val_batch_seconds or 0.0, "measured on this run's second "
                                     "step", f"narrow the network for it with `decathlete plan DATASET -o WORKDIR "
                                     f"--time-budget {budget:.0f}s`", startup_s=0.0)


def _resolve_recipe(plans: Plans, config: Configuration, options: TrainOptions, out: Path, workdir: Path) -> Recipe:
    """The run's recipe: the fold folder's own on resume, else the plans' (as resolved there) or the named one;
    with the options' overrides and lengths, checked against the plans."""
    saved = saved_recipe(out) if options.resume else None
    resumed = saved is not None and options.recipe in (None, saved.name)
    base = saved if resumed else build.plans_recipe(plans, options.recipe)
    planned = config.training or {}
    lengths = [f"{key}={value}" for key, value in (
        ("epochs", options.epochs or planned.get("epochs")),
        ("iterations_per_epoch", options.iterations_per_epoch or planned.get("iterations_per_epoch"))) if value]
    # the plan's overrides were made for its own recipe (a saved one holds them), then the user's
    own = options.recipe in (None, plans.recipe) and not resumed
    planned_overrides = build.planned_overrides(config) if own else []
    recipe = validate(base.with_overrides([*planned_overrides, *options.overrides, *lengths]))
    build.check_against_plans(recipe, plans, config, workdir)
    return recipe


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _setup(workdir: Path, plans: Plans, config: Configuration, recipe: Recipe, settings: records.RunSettings,
           world: World, dev: torch.device, out: Path, options: TrainOptions) -> _Run:
    split = fold_split(workdir, plans, settings.fold)
    # before the fold folder exists: no stub left behind
    check_fold_preprocessed(workdir, config.data_identifier, settings.configuration, settings.fold, split)
    sampling: dict[str, Any] = {"rank": world.rank, "world_size": world.size}
    if config.previous_stage:  # its previous stage's predictions on this cache's grid (rank 0 writes them)
        sampling["previous_stage"] = cascade.prepare_previous_stage(
            workdir, plans, config, recipe.name, split["train"] + split["val"], write=world.is_main)
        barrier(world)
    torch.manual_seed(settings.seed)  # identical initial weights on every rank and in every rerun
    model = build.build_network(config, plans).to(dev, memory_format=memory_format(dev, config.spatial_dims))
    optimizer = build.build_optimizer(recipe, model)
    state, saved_total = records.TrainState(), 0
    if options.resume:
        state, saved_total = records.restore(out, settings, model, optimizer)
    elif world.is_main and (out / ckpt.LATEST).exists():
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue or extend it, or start over: "
                              f"delete {out}, or train into another folder with -o DIR")
    if world.is_main:
        records.write_run_files(out, plans, config, settings, split)
    net = torch.compile(model) if settings.compile else model
    if world.size > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    step, input_size = build_step(recipe, config, plans, net, optimizer, dev, world.size)
    batch = local_batch_size(config.batch_size, world)
    cases = workdir / "preprocessed" / config.data_identifier
    sampling["ignore_label"] = step.labels.ignore_label
    train_batches = TrainBatches(build.build_sampler(recipe, config, cases, split["train"], input_size, **sampling),
                                 batch, settings.seed, world.rank, state.step, settings.num_workers,
                                 dev.type == "cuda")
    val_batches = ValidationBatches(build.build_sampler(recipe, config, cases, split["val"], config.patch_size,
                                                        **sampling), batch, settings.seed, world.rank,
                                    settings.val_iterations)
    log = TrainingLog(out / "training_log.txt", world.is_main)
    log(f"training {settings.configuration} fold {settings.fold} on {dev} (world {world.size}): "
        f"{len(split['train'])} train / {len(split['val'])} val cases, batch {batch}/rank, patch {config.patch_size}")
    if settings.fold == ALL:
        log("fold 'all' (nnU-Net's): trained and validated on every case of the splits, so its pseudo-Dice is no "
            "held-out score")
    schedule, total = build.build_schedule(recipe), settings.epochs * settings.iterations_per_epoch
    if options.resume and settings.time_budget is None:
        _continue_schedule(schedule, state, saved_total, total, log)
    return _Run(settings, world, dev, out, model, net, optimizer, step, train_batches, val_batches, schedule,
                build.base_learning_rate(recipe), state,
                TrainingClock(settings.time_budget, state.seconds, state.schedule_anchor), log, options.progress,
                total_steps=total)


def _continue_schedule(schedule: Callable[[int, int], float], state: records.TrainState, saved_total: int,
                       total: int, log: TrainingLog) -> None:
    """A resumed run that is now longer continues its learning rate where it was (`extended_anchor`)."""
    anchor = extended_anchor(schedule, state.step, saved_total, total, state.schedule_anchor)
    if anchor != state.schedule_anchor:
        log(f"extending the run from {saved_total} to {total} steps at step {state.step}: the learning rate "
            "continues from where it was and anneals over the added steps (no warm-up); to train at the recipe's "
            "full rate, start a new run")
    state.schedule_anchor = anchor


def _loop(run: _Run) -> dict[str, Any]:
    start = time.perf_counter()
    while run.state.epoch < run.settings.epochs and not (run.out_of_time or run.stopped):
        _size_validation(run)
        epoch_start = time.perf_counter()
        train_loss, lr = _train_epoch(run)
        val_start = time.perf_counter()
        run.train_seconds += val_start - epoch_start
        result = validate_epoch(run.net, run.step, run.val_batches, run.dev, run.world, run.state.epoch,
                                progress=run.progress and run.world.is_main)
        run.reserve_s = time.perf_counter() - val_start
        run.val_batch_seconds = run.reserve_s / max(run.val_batches.n_batches, 1)
        run.state.history.setdefault("val_batches", []).append(run.val_batches.n_batches)
        _end_epoch(run, train_loss, result, lr, time.perf_counter() - epoch_start)
    return _finish(run, time.perf_counter() - start)


def _size_validation(run: _Run) -> None:
    """A budgeted run's validation batches for the coming epoch (`validation_batches`, at the last measured seconds
    per batch, else the plan's forward), and the time its training leaves for them."""
    budget, settings = run.settings.time_budget, run.settings
    if not budget:
        return
    n = budgeting.validation_batches(budget, settings.epochs, run.val_batch_seconds, run.val_default)
    if n != run.val_batches.n_batches or run.session_steps == 0:  # a change, or the session's first
        per_batch = "unmeasured" if run.val_batch_seconds is None else f"{run.val_batch_seconds:.2f} s"
        run.log(f"validation: {n} batches per epoch (at most {run.val_default}; {per_batch} per batch): within "
                f"{budgeting.VAL_SHARE:.0%} of the {budget:.0f} s budget over {settings.epochs} epochs")
    run.val_batches.n_batches = settings.val_iterations = n
    run.reserve_s = n * (run.val_batch_seconds or 0.0)


def _train_epoch(run: _Run) -> tuple[float, float]:
    """One epoch of training steps (fewer when the budget runs out); returns the mean loss and the last lr."""
    run.net.train()
    state, settings, losses, lr = run.state, run.settings, [], 0.0
    bar = tqdm(range(settings.iterations_per_epoch), desc=f"epoch {state.epoch}",
               disable=not (run.progress and run.world.is_main))
    for _ in bar:
        run.out_of_time = budget_spent(run.clock, run.reserve_s, run.world, run.dev)
        if run.out_of_time and losses:
            break
        lr = run.base_lr * run.schedule(run.clock.schedule_step(state.step, run.total_steps), run.total_steps)
        step_start = time.perf_counter()
        image, label = run.train_batches.next(run.dev)
        generator = torch.Generator().manual_seed(_seed_for(settings.seed, run.world.rank, state.step))
        losses.append(run.step(image, label, generator, lr))
        state.step += 1
        run.session_steps += 1
        bar.set_postfix(loss=f"{losses[-1].item():.3f}", lr=f"{lr:.2e}")  # .item() waits for the step's end
        if run.session_steps == 2:
            _check_measured_step(run, time.perf_counter() - step_start)
    mean = all_reduce_sum(torch.stack(losses).mean().float(), run.world)
    return float(mean.item() / run.world.size), lr


def _end_epoch(run: _Run, train_loss: float, result: Validation, lr: float, seconds: float) -> None:
    """Record the epoch, refit a budgeted run, log, checkpoint, and ask the callbacks whether to go on."""
    state, settings = run.state, run.settings
    val_loss, dice = result.loss, result.dice
    mean = float(np.mean(dice)) if dice else 0.0
    state.ema_dice = mean if state.ema_dice is None else EMA_DECAY * state.ema_dice + (1 - EMA_DECAY) * mean
    for key, value in (("train_loss", train_loss), ("val_loss", val_loss), ("pseudo_dice", mean),
                       ("ema_dice", state.ema_dice), ("lr", lr), ("epoch_seconds", seconds),
                       ("pseudo_dice_per_class", dice)):
        state.history[key].append(value)
    if result.confusion is not None:  # a run resumed from before the confusion matrix was recorded has no list yet
        state.history.setdefault("confusion", []).append(result.confusion)
    state.epoch += 1
    state.seconds = run.clock.elapsed()
    if run.out_of_time:
        run.log(f"time budget of {settings.time_budget:.0f} s reached after {state.step} steps: stopping")
    else:
        _refit(run)
    run.log(f"epoch {state.epoch - 1}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, pseudo-Dice "
            f"{[round(d, 4) for d in dice]}, EMA {state.ema_dice:.4f}, lr {lr:.2e}, {seconds:.1f} s")
    if result.confusion is not None:
        run.log(f"  validation confusion (rows reference, columns predicted, voxels): {result.confusion}")
    if run.world.is_main:
        records.save_epoch(run.out, run.model, run.optimizer, state, settings, final=run.out_of_time)
    barrier(run.world)
    report = EpochReport(state.epoch - 1, state.step, train_loss, val_loss, dice, state.ema_dice, lr, seconds,
                         run.out, result.confusion)
    if any([bool(callback(report)) for callback in run.callbacks]):
        run.stopped = True
        run.log(f"stopped by a callback after epoch {state.epoch - 1}")


def _refit(run: _Run) -> None:
    """Re-count the epochs of a budgeted run from its measured epoch time, and with them the total of steps."""
    settings, state = run.settings, run.state
    epochs = refit_epochs(run.clock, state.epoch, state.history["epoch_seconds"], settings.epochs, run.world, run.dev)
    if epochs != settings.epochs:
        run.log(f"{run.clock.elapsed():.0f} of {settings.time_budget:.0f} s spent at {state.epoch} epochs: the budget "
                f"now holds {epochs} epochs in all (was {settings.epochs})")
        settings.recipe["epochs"] = epochs
    run.total_steps = settings.epochs * settings.iterations_per_epoch


def _finish(run: _Run, seconds: float) -> dict[str, Any]:
    if run.world.is_main:
        records.save(run.out / ckpt.FINAL, run.model, run.optimizer, run.state, run.settings)
        records.save(run.out / ckpt.LATEST, run.model, run.optimizer, run.state, run.settings)
    run.train_batches.close()
    summary = {"folder": str(run.out), "epochs": run.state.epoch, "steps": run.state.step,
               "ema_dice": run.state.ema_dice, "best_ema_dice": run.state.best_ema, "seconds": seconds,
               "stopped_by_time_budget": run.out_of_time, "stopped_by_callback": run.stopped}
    if run.settings.time_budget:
        for line in achieved_vs_planned(run.state.step, run.train_seconds / max(run.session_steps, 1), run.planned):
            run.log(line)
    stop = " (time budget reached)" if run.out_of_time else " (stopped by a callback)" if run.stopped else ""
    ema = "n/a" if run.state.ema_dice is None else f"{run.state.ema_dice:.4f}"
    run.log(f"done{stop}: {run.state.epoch} epochs, {run.state.step} steps in {seconds:.0f} s; EMA pseudo-Dice {ema}"
            f" (best {run.state.best_ema:.4f}) -> {run.out / ckpt.FINAL}")
    return summary
