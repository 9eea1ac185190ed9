"""The one training loop: sample → augment on the device → forward/backward → validate → checkpoint.

Everything pluggable comes from the registry through the recipe (network, loss, optimiser, schedule); sampling,
augmentation and checkpointing are modules this loop calls. Read ``train`` top to bottom: it is the table of
contents. A run is a pure function of its settings: batch ``i`` and its augmentation are drawn from generators
seeded by ``(seed, rank, i)``, so ``--resume`` after a crash (even SIGKILL) replays the interrupted epoch exactly.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from decathlete import __version__, registry
from decathlete.augment import AugmentConfig, augment, default_config, required_input_size
from decathlete.data.splits import load_or_create_splits
from decathlete.io.atomic import is_temporary_of, write_json_atomic
from decathlete.losses.deep_supervision import DeepSupervisionLoss, downsample_target, ds_factors, ds_weights
from decathlete.planning.budget import parse_duration
from decathlete.planning.plans import Configuration, Plans
from decathlete.recipes.default import Recipe, get_recipe
from decathlete.train import checkpoint as ckpt
from decathlete.train.clock import TrainingClock, budget_spent, refit_epochs
from decathlete.train.distributed import World, all_reduce_sum, barrier, init_world, local_batch_size, shutdown
from decathlete.train.progress import TrainingLog, plot_progress
from decathlete.train.steps import TrainBatches, ValidationBatches, pseudo_dice_counts, to_targets

EMA_DECAY = 0.9  # nnU-Net's pseudo-Dice smoothing
GRAD_CLIP = 12.0


@dataclass
class RunSettings:
    """The resolved settings of one training run (JSON, saved with the model; --resume refuses other ones)."""

    configuration: str
    fold: int
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
    history: dict[str, list] = field(default_factory=lambda: {
        "train_loss": [], "val_loss": [], "pseudo_dice": [], "ema_dice": [], "lr": [], "epoch_seconds": [],
        "pseudo_dice_per_class": []})


def model_folder(workdir: str | Path, configuration: str, recipe: str, fold: int) -> Path:
    """``WORKDIR/models/<configuration>/<recipe>/fold_<k>``."""
    return Path(workdir) / "models" / configuration / recipe / f"fold_{fold}"


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error, not a silent CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    return torch.device(device)


def num_outputs(plans: Plans) -> int:
    """Network output channels: one per region for region-based data, else one per label value."""
    regions = plans.dataset.get("regions")
    return len(regions) if regions else len(plans.dataset["label_values"])


def build_network(config: Configuration, plans: Plans) -> torch.nn.Module:
    """The registered network the plan describes (the same description the memory estimate used)."""
    return registry.build("nets", config.network.name, in_channels=len(plans.dataset["channel_names"]),
                          num_classes=num_outputs(plans), **config.network.kwargs)


def build_loss(recipe: Recipe, config: Configuration, plans: Plans, world: World) -> DeepSupervisionLoss:
    """The recipe's loss (Dice+BCE for region-based data) wrapped for deep supervision."""
    name, kwargs = recipe.loss.name, dict(recipe.loss.kwargs)
    if plans.dataset.get("regions") and name == "dice_ce":
        name, kwargs = "dice_bce", {k: v for k, v in kwargs.items() if k in ("weight_ce", "weight_dice", "smooth")}
    if name in ("dice_ce", "dice_bce"):
        kwargs.setdefault("batch_dice", config.batch_dice)
    n_outputs = len(config.strides) - 1
    # Under DDP every head needs a gradient: a tiny weight instead of 0 for the lowest one (nnU-Net's trick).
    weights = ds_weights(n_outputs, last_weight=1e-6 if world.size > 1 else 0.0)
    return DeepSupervisionLoss(registry.build("losses", name, **kwargs), weights)


def build_optimizer(recipe: Recipe, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD (Nesterov), Adam or AdamW from the recipe's optimiser spec."""
    kwargs = dict(recipe.optimizer.kwargs)
    name = recipe.optimizer.name.lower()
    classes = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if name not in classes:
        raise KeyError(f"unknown optimizer '{name}'; choose one of {', '.join(classes)}")
    return classes[name](model.parameters(), **kwargs)


def augmentation_for(config: Configuration) -> tuple[AugmentConfig, tuple[int, ...]]:
    """nnU-Net's augmentation settings for this configuration and the input crop size they need."""
    patch = config.patch_size
    anisotropic = config.spatial_dims == 3 and max(patch) / patch[0] > 3
    aug = default_config(config.spatial_dims, anisotropic, patch)
    # Cover nnU-Net's scale range for the margin: rarer, stronger zooms pull in a little padding (label -1 -> 0).
    size = required_input_size(patch, aug.rotation_deg, (0.85, 1.25), rotation_axes=aug.rotation_axes,
                               dummy_2d=aug.dummy_2d)
    return aug, tuple(size)


def default_workers(dev: torch.device) -> int:
    """Loader processes: none on a CPU (measured on 2 cores: moving a batch between processes costs ~80 ms, sampling
    it in-process ~20 ms, and the workers would compete with the training threads), several feeding a GPU."""
    if dev.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def train(workdir: str | Path, configuration: str = "3d_fullres", fold: int = 0, *, recipe: str | None = None,
          epochs: int | None = None, iterations_per_epoch: int | None = None, val_iterations: int = 50,
          device: str = "auto", resume: bool = False, seed: int = 0, num_workers: int | None = None,
          compile: bool = False, time_budget: str | float | None = None, progress: bool = True) -> dict[str, Any]:
    """Train one fold of one configuration; writes ``WORKDIR/models/<configuration>/<recipe>/fold_<k>/``.

    A configuration planned for a time budget (``plan --time-budget``) brings its epochs, iterations and budget;
    ``time_budget`` (``"20m"``, seconds) caps the wall-clock time of this run: the schedule anneals over it and
    training stops in time for a closing validation and the final checkpoint.

    Returns:
        A summary: the output folder, epochs and steps done, the last and best EMA pseudo-Dice, seconds.
    """
    workdir = Path(workdir)
    plans = Plans.load(workdir / "plans.json")
    config = plans.configuration(configuration)
    chosen = get_recipe(recipe or plans.recipe)
    planned = config.training or {}
    lengths = (("epochs", epochs or planned.get("epochs")),
               ("iterations_per_epoch", iterations_per_epoch or planned.get("iterations_per_epoch")))
    overrides = {k: v for k, v in lengths if v}
    if time_budget is None:
        time_budget = planned.get("budget_seconds")
    budget_s = parse_duration(time_budget) if time_budget is not None else None
    chosen = replace(chosen, **overrides)
    dev = resolve_device(device)
    world = init_world(dev.type)
    if dev.type == "cuda":
        dev = torch.device("cuda", world.local_rank)
    if num_workers is None:
        num_workers = default_workers(dev)
    settings = RunSettings(configuration, fold, json.loads(json.dumps(asdict(chosen))), seed, val_iterations,
                           num_workers, dev.type, compile, time_budget=budget_s)
    out = model_folder(workdir, configuration, chosen.name, fold)
    try:
        return _run(workdir, plans, config, chosen, settings, world, dev, out, resume, progress)
    finally:
        shutdown(world)


def _run(workdir: Path, plans: Plans, config: Configuration, recipe: Recipe, settings: RunSettings, world: World,
         dev: torch.device, out: Path, resume: bool, progress: bool) -> dict[str, Any]:
    split = fold_split(workdir, plans, settings.fold)
    torch.manual_seed(settings.seed)  # identical initial weights on every rank and in every rerun
    model = build_network(config, plans).to(dev, memory_format=memory_format(dev, config.spatial_dims))
    optimizer = build_optimizer(recipe, model)
    state = TrainState()
    if resume:
        state = _restore(out, settings, model, optimizer)
    elif world.is_main and (out / ckpt.LATEST).exists():
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue or extend it")
    if world.is_main:
        _write_run_files(out, plans, config, settings)
        for stale in out.glob(".tmp-*"):  # what writes cut short by a kill left behind
            if is_temporary_of(stale):
                stale.unlink(missing_ok=True)
    net = torch.compile(model) if settings.compile else model
    if world.size > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    loss_fn = build_loss(recipe, config, plans, world).to(dev)
    aug, input_size = augmentation_for(config)
    batch = local_batch_size(config.batch_size, world)
    cases_dir = workdir / "preprocessed" / config.data_identifier
    train_batches = TrainBatches(cases_dir, split["train"], config, input_size, batch, settings.seed, world.rank,
                                 state.step, settings.num_workers, pin_memory=dev.type == "cuda")
    val_batches = ValidationBatches(cases_dir, split["val"], config, batch, settings.seed, world.rank,
                                    settings.val_iterations)
    schedule = registry.build("schedules", recipe.schedule.name, **recipe.schedule.kwargs)
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda")
    base_lr = float(recipe.optimizer.kwargs.get("lr", 1e-2))
    total_steps = settings.epochs * settings.iterations_per_epoch
    factors = ds_factors(config.strides)
    log = TrainingLog(out / "training_log.txt", world.is_main)
    log(f"training {settings.configuration} fold {settings.fold} on {dev} (world {world.size}): "
        f"{len(split['train'])} train / {len(split['val'])} val cases, batch {batch}/rank, patch {config.patch_size}")
    start = time.perf_counter()
    clock, reserve_s, out_of_time = TrainingClock(settings.time_budget, state.seconds), 0.0, False
    while state.epoch < settings.epochs and not out_of_time:
        epoch_start = time.perf_counter()
        net.train()
        losses = []
        bar = tqdm(range(settings.iterations_per_epoch), desc=f"epoch {state.epoch}", disable=not (progress and
                                                                                              world.is_main))
        for _ in bar:
            out_of_time = budget_spent(clock, reserve_s, world, dev)
            if out_of_time and losses:
                break
            lr = base_lr * schedule(clock.schedule_step(state.step, total_steps), total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            image, label = train_batches.next(dev)
            generator = torch.Generator().manual_seed(_seed_for(settings.seed, world.rank, state.step))
            image, label = augment(image, label, config.patch_size, aug, generator)
            targets = downsample_target(to_targets(label, plans.dataset.get("regions")), factors)
            with torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
                outputs = net(_memory_format(image, dev, config.spatial_dims))
                loss = loss_fn(outputs, targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(net.parameters(), GRAD_CLIP)
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.detach())
            state.step += 1
            bar.set_postfix(loss=f"{losses[-1].item():.3f}", lr=f"{lr:.2e}")
        val_start = time.perf_counter()
        val_loss, dice = _validate(net, loss_fn, val_batches, plans, factors, dev, world)
        reserve_s = time.perf_counter() - val_start
        train_loss = float(all_reduce_sum(torch.stack(losses).mean().float(), world).item() / world.size)
        _end_epoch(state, train_loss, val_loss, dice, lr, time.perf_counter() - epoch_start)
        state.seconds = clock.elapsed()
        if out_of_time:
            log(f"time budget of {settings.time_budget:.0f} s reached after {state.step} steps: stopping")
        else:
            total_steps = _refit(settings, state, clock, world, dev, log)
        log(f"epoch {state.epoch - 1}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, pseudo-Dice "
            f"{[round(d, 4) for d in dice]}, EMA {state.ema_dice:.4f}, lr {lr:.2e}, "
            f"{state.history['epoch_seconds'][-1]:.1f} s")
        if world.is_main:
            _save_epoch(out, model, optimizer, state, settings, final=out_of_time)
        barrier(world)
    if world.is_main:
        _save(out / ckpt.FINAL, model, optimizer, state, settings)
        _save(out / ckpt.LATEST, model, optimizer, state, settings)
    train_batches.close()
    summary = {"folder": str(out), "epochs": state.epoch, "steps": state.step, "ema_dice": state.ema_dice,
               "best_ema_dice": state.best_ema, "seconds": time.perf_counter() - start,
               "stopped_by_time_budget": out_of_time}
    log(f"done: {json.dumps(summary)}")
    return summary


def _refit(settings: RunSettings, state: TrainState, clock: TrainingClock, world: World, dev: torch.device,
           log: TrainingLog) -> int:
    """Re-count the epochs of a budgeted run from its measured epoch time; returns the new total of steps."""
    epochs = refit_epochs(clock, state.epoch, state.history["epoch_seconds"], settings.epochs, world, dev)
    if epochs != settings.epochs:
        log(f"{clock.elapsed():.0f} of {settings.time_budget:.0f} s spent at {state.epoch} epochs: the budget now "
            f"holds {epochs} epochs in all (was {settings.epochs})")
        settings.recipe["epochs"] = epochs
    return settings.epochs * settings.iterations_per_epoch


def fold_count(workdir: str | Path) -> int:
    """Number of cross-validation folds of the work folder's splits (created when missing)."""
    workdir = Path(workdir)
    plans = Plans.load(workdir / "plans.json")
    return len(load_or_create_splits(workdir, _preprocessed_ids(workdir, plans), plans.dataset.get("splits")))


def fold_split(workdir: Path, plans: Plans, fold: int) -> dict[str, list[str]]:
    ids = _preprocessed_ids(workdir, plans)
    splits = load_or_create_splits(workdir, ids, plans.dataset.get("splits"))
    if not 0 <= fold < len(splits):
        raise ValueError(f"fold {fold} does not exist: the splits have folds 0..{len(splits) - 1}")
    return splits[fold]


def _preprocessed_ids(workdir: Path, plans: Plans) -> list[str]:
    from decathlete.preprocess.cache import list_cases

    ids: set[str] = set()
    for config in plans.configurations.values():
        folder = workdir / "preprocessed" / config.data_identifier
        if folder.is_dir():
            ids.update(list_cases(folder))
    if not ids:
        raise FileNotFoundError(f"no preprocessed cases under {workdir / 'preprocessed'}; run "
                                f"`decathlete preprocess {workdir}` first")
    return sorted(ids)


def memory_format(dev: torch.device, dims: int) -> torch.memory_format:
    """Channels-last for networks and their inputs on CUDA, and for 3D on the CPU too (training and prediction;
    measured with benchmarks/cpu_speedups.py on 2 cores, hippocampus budget plan: training step 1.47x, prediction
    with TTA 0.468 vs 0.567 s/case)."""
    if dev.type == "cuda" or dims == 3:
        return torch.channels_last_3d if dims == 3 else torch.channels_last
    return torch.contiguous_format


def _memory_format(image: torch.Tensor, dev: torch.device, dims: int) -> torch.Tensor:
    return image.contiguous(memory_format=memory_format(dev, dims))


@torch.no_grad()
def _validate(net: torch.nn.Module, loss_fn: DeepSupervisionLoss, batches: ValidationBatches, plans: Plans,
              factors: list[list[int]], dev: torch.device, world: World) -> tuple[float, list[float]]:
    """Loss and per-class pseudo-Dice (tp/fp/fn summed over all validation patches and ranks)."""
    net.eval()
    regions = plans.dataset.get("regions")
    counts, loss_sum, n = None, torch.zeros((), device=dev), 0
    for image, label in batches.iterate(dev):
        targets = downsample_target(to_targets(label, regions), factors)
        with torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
            outputs = net(_memory_format(image, dev, len(image.shape) - 2))
            loss_sum += loss_fn(outputs, targets).float()
        batch_counts = pseudo_dice_counts(outputs[0] if isinstance(outputs, list) else outputs, label, regions)
        counts = batch_counts if counts is None else counts + batch_counts
        n += 1
    stats = all_reduce_sum(torch.cat([counts.flatten(), loss_sum.view(1), torch.tensor([float(n)], device=dev)]),
                           world)
    tp, fp, fn = stats[:-2].view(3, -1)
    dice = (2 * tp / (2 * tp + fp + fn).clamp_min(1e-8)).tolist()
    return float(stats[-2] / stats[-1].clamp_min(1)), dice


def _end_epoch(state: TrainState, train_loss: float, val_loss: float, dice: list[float], lr: float,
               seconds: float) -> None:
    mean = float(np.mean(dice)) if dice else 0.0
    state.ema_dice = mean if state.ema_dice is None else EMA_DECAY * state.ema_dice + (1 - EMA_DECAY) * mean
    for key, value in (("train_loss", train_loss), ("val_loss", val_loss), ("pseudo_dice", mean),
                       ("ema_dice", state.ema_dice), ("lr", lr), ("epoch_seconds", seconds),
                       ("pseudo_dice_per_class", dice)):
        state.history[key].append(value)
    state.epoch += 1


def _save(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
          settings: RunSettings) -> None:
    ckpt.save_checkpoint(path, {"model": ckpt.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                                "state": asdict(state), "settings": asdict(settings), "version": __version__})


def _save_epoch(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
                settings: RunSettings, final: bool = False) -> None:
    if state.ema_dice is not None and state.ema_dice > state.best_ema:
        state.best_ema = state.ema_dice
        _save(out / ckpt.BEST, model, optimizer, state, settings)
    if state.epoch % settings.checkpoint_every == 0 or state.epoch == settings.epochs or final:
        _save(out / ckpt.LATEST, model, optimizer, state, settings)
    plot_progress(state.history, out / "progress.png")


def _restore(out: Path, settings: RunSettings, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer) -> TrainState:
    """Load the latest checkpoint; the recipe apart from its length must match (a longer run extends it)."""
    saved = ckpt.load_checkpoint(out / ckpt.LATEST)
    old = {k: v for k, v in saved["settings"]["recipe"].items() if k != "epochs"}
    new = {k: v for k, v in settings.recipe.items() if k != "epochs"}
    if old != new or saved["settings"]["seed"] != settings.seed:
        raise ValueError(f"--resume: the recipe or seed differs from the run in {out}; start a new run elsewhere "
                         f"or use the same settings (saved: {json.dumps(saved['settings'])})")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    return TrainState(**saved["state"])


def _write_run_files(out: Path, plans: Plans, config: Configuration, settings: RunSettings) -> None:
    """Everything needed to rebuild and reproduce the model, next to its checkpoints."""
    out.mkdir(parents=True, exist_ok=True)
    plans.save(out / "plans.json")
    write_json_atomic(out / "recipe.json", settings.recipe)
    write_json_atomic(out / "run.json", {
        "settings": asdict(settings), "configuration": asdict(config), "command": sys.argv,
        "versions": {"decathlete": __version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "plugins": registry.loaded_plugins()})
