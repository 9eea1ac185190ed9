"""Planning for a compute budget: time real training steps of candidate networks on the device, keep what fits.

nnU-Net plans for GPU memory only; on a 2-core CPU its hippocampus plan costs ~15 s per iteration, so its schedule
(250,000 iterations) would take weeks. Given a wall-clock budget, this module narrows the network and the batch of a
configuration until enough optimiser steps fit, and writes the chosen trade-off, the measured step time and the
predicted training time into the configuration (``Configuration.training``).

Rules, in order (the patch planned from the fingerprint is kept, so the network still sees whole structures, unless
the recipe allows rule 5):
1. Width: the widest base (32, 24, 16, 12, 8 features; the caps scaled alike) whose step at batch 2 leaves at least
   ``MIN_ITERATIONS`` iterations in the budget. Wider networks learn more per step, but below a few thousand steps
   an undertrained wide network loses to a trained narrow one.
2. Batch: grown from 2 towards the planned batch while the iterations stay at or above ``MIN_ITERATIONS``; a batch
   the recipe fixes (``planning.batch_size``: Rippel's 4, SegResNet's 1) is kept throughout.
3. Iterations: what the budget holds, capped at the recipe's schedule (``epochs x iterations_per_epoch``: nnU-Net's
   250,000 for ``default``), so a large budget on a GPU gives the recipe's own plan.
4. Initial weights: a schedule shorter than the recipe's starts from PyTorch's default weights (``init="torch"``) where
   the network takes an ``init`` and the recipe does not name one. nnU-Net's Kaiming-normal weights are ~2.4x larger,
   and a convolution followed by a norm is scale-invariant, so its effective learning rate starts ~6x smaller: a
   transient that 250,000 steps absorb but a budget of a few thousand steps pays for in held-out Dice (measured:
   ``benchmarks/results/init_ablation.json``). ``--set net.init=he`` keeps nnU-Net's.
5. Crop, only for a recipe that allows it (``planning.budget_crop``, e.g. SegResNet's batch-1 large crop): when even
   the narrowest width leaves fewer than ``MIN_ITERATIONS``, the patch shrinks on the same topology (the axis with the
   largest patch/median ratio first, as nnU-Net's memory rule) until they fit or the bottleneck is 4 voxels.
6. Optimiser: a schedule shorter than the recipe's, for a recipe that keeps nnU-Net's SGD (lr 0.01, momentum 0.99),
   trains with AdamW (lr 3e-3, ``SHORT_SCHEDULE_OPTIMIZER``), recorded as ``training["recipe_overrides"]`` that the
   probe times and the trainer applies before the user's ``--set``. On CT with small organs (Task106: 0.5 %
   foreground, 7 organs) SGD's first thousand steps leave every organ's softmax near its prior: the rare classes'
   gradient is a few hundred voxels' share of a mean over millions, so the logits separate the organs (AUC 0.96-0.99
   after 690 steps) but never cross the background's, and every organ scores Dice 0; AdamW's per-parameter step
   size does not shrink with that share and finds 4 organs in the same steps (measured:
   ``benchmarks/results/budget_short_schedule_task106.json``). A recipe that names its own optimiser keeps it.
7. Configuration: when even the narrowest 3D network leaves fewer than ``MIN_ITERATIONS`` (after rule 5, where the
   recipe allows it) and the 2D configuration holds them, the plan records 2D as the one to train
   (``Plans.budget_choice``, printed by ``plan``). On Task106 CT (15 min, 2 cores) 3D at 8 base features holds 250
   steps; after 400 steps with AdamW, 2D had found 4 of the 7 organs and a 3D network cropped to 64^3 (each step
   dearer than 2D's) only the mandible (``benchmarks/results/budget_short_schedule_task106.json``). A coarser spacing
   (nnU-Net's 3d_lowres) is not tried: at twice 4.7 mm the oesophagus keeps ~10 voxels.
Validation is sized to the budget, by the trainer's rule (`validation_batches`): its batches per epoch keep it within
``VAL_SHARE`` of the budget over the run, so the iterations and the predicted seconds charge the same validation. A
budget that cannot hold ``MIN_BUDGET_STEPS`` steps of the narrowest (or cropped) network and one validation batch is
refused rather than planned with a note: its training could neither learn nor keep to its cap, and refusing at plan
time spares the preprocessing.
Step times are measured, never assumed: the caller passes ``measure``, which times the very training step the trainer
runs (`decathlete.train.probe.time_step`: augmentation of a random batch of the configuration's input size, forward,
the recipe's loss, backward, clipping, optimiser step), the median of 5 after 2 warm-up steps. Larger batches are
extrapolated linearly from batch 2 to choose; the chosen candidate is then measured, and that figure is the one the
prediction uses. Every candidate recorded in ``training["candidates"]`` is a measurement.
"""

from __future__ import annotations

import inspect
import json
import math
import platform
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from decathlete.labels import LabelScheme
from decathlete.planning.plans import Configuration, NetworkSpec, Plans
from decathlete.planning.rules import MIN_FEATURE_MAP_SIZE, memory_gb
from decathlete.recipes.build import input_channels
from decathlete.registry import get

# ``measure(config, plans, device) -> {"step_seconds", "forward_seconds"}``: one training step, one validation forward.
Measure = Callable[[Configuration, Plans, torch.device], dict[str, float]]

BASE_WIDTHS = (32, 24, 16, 12, 8)
MIN_ITERATIONS = 2000
MAX_ITERATIONS = 250_000  # nnU-Net's 1000 epochs x 250
ITERATIONS_PER_EPOCH = 250
VAL_ITERATIONS = 50
# Validation's share of a budget over the run. nnU-Net spends 50 forwards per 250 steps, ~7 % of its time at a forward
# of a third of a step; 10 % keeps its 50 batches on such plans and trims them only where they would eat the budget.
VAL_SHARE = 0.10
# nnU-Net's optimiser, which rule 6 replaces for short schedules; the recipes' default (`decathlete.recipes.base`)
NNUNET_OPTIMIZER = {"name": "sgd", "kwargs": {"lr": 1e-2, "momentum": 0.99, "nesterov": True, "weight_decay": 3e-5}}
SHORT_SCHEDULE_OPTIMIZER = {"name": "adamw", "kwargs": {"lr": 3e-3, "weight_decay": 3e-5}}
MIN_BUDGET_STEPS = 10  # the fewest steps (and one validation) a budget must hold, or the run is refused up front
STARTUP_SECONDS = 5.0  # process start, data opening, first-batch warm-up: measured ~2-4 s on 2 cores
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | float) -> float:
    """Seconds in ``"90s"``, ``"20m"``, ``"1h30m"``, ``"6h"`` or a plain number of seconds."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        s = str(text).strip().lower()
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhd]?)", s)
        if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([smhd]?)", "", s).strip():
            raise ValueError(f"cannot read the duration '{text}': write e.g. 90s, 20m, 1h30m or 6h")
        seconds = sum(float(n) * _UNITS[u or "s"] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"a time budget must be positive, got '{text}'")
    return seconds


def device_description(device: torch.device) -> str:
    """What the step times were measured on (cached in plans.json with them)."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def with_width(config: Configuration, plans: Plans, base: int, batch: int) -> Configuration:
    """``config`` with its features scaled to start at ``base`` (caps scaled alike) and batch ``batch``."""
    kwargs = dict(config.network.kwargs)
    old = list(kwargs["features_per_stage"])
    scale = base / old[0]
    kwargs["features_per_stage"] = [max(1, int(round(f * scale))) for f in old]
    return _redescribed(config, plans, kwargs, config.patch_size, batch)


def with_patch(config: Configuration, plans: Plans, patch: list[int]) -> Configuration:
    """``config`` with a smaller patch on the same topology (a network sized for its patch is re-sized)."""
    kwargs = dict(config.network.kwargs)
    if "train_patch_size" in kwargs:
        kwargs["train_patch_size"] = list(patch)
    return _redescribed(config, plans, kwargs, list(patch), config.batch_size)


def _redescribed(config: Configuration, plans: Plans, kwargs: dict[str, Any], patch: list[int],
                 batch: int) -> Configuration:
    """``config`` with new network kwargs, patch and batch, its parameter count and memory estimate redone."""
    name = config.network.name
    n_in, n_out = input_channels(config, plans), LabelScheme.from_dataset(plans.dataset).num_outputs
    params = get("nets", name).parameter_count(n_in, n_out, **kwargs)
    memory = memory_gb(name, kwargs, patch, batch, n_in, n_out, plans.memory_target.kind)
    return replace(config, features_per_stage=list(kwargs["features_per_stage"]), patch_size=list(patch),
                   network=NetworkSpec(name, kwargs), batch_size=batch, parameters=int(params),
                   memory_estimate_gb=round(memory, 3), notes=list(config.notes))


def validation_batches(budget_s: float, epochs: int, forward_s: float | None, default: int = VAL_ITERATIONS) -> int:
    """Validation batches per epoch under a budget: as many as keep the run's validation within ``VAL_SHARE`` of
    the budget (``epochs x batches x forward <= VAL_SHARE x budget``), between 1 and ``default`` (nnU-Net's 50 is a
    default, not a rule: 50 forwards of a heavy plan can cost more than a short budget). Without a measured
    ``forward_s`` one batch, which measures it."""
    if forward_s is None:
        return 1
    if forward_s <= 0:
        return default
    return max(1, min(default, int(VAL_SHARE * budget_s / (max(epochs, 1) * forward_s))))


def predicted_seconds(iterations: int, step_s: float, forward_s: float, budget_s: float) -> float:
    """Seconds a run of ``iterations`` steps takes: startup, the steps, and each started epoch's validation sized
    to ``budget_s`` (`validation_batches`)."""
    epochs = max(1, math.ceil(iterations / ITERATIONS_PER_EPOCH))
    return STARTUP_SECONDS + iterations * step_s + epochs * validation_batches(budget_s, epochs, forward_s) * forward_s


def iterations_in(budget_s: float, step_s: float, forward_s: float) -> int:
    """Optimiser steps that fit: the most ``n`` with ``predicted_seconds(n) <= budget`` (capped at
    ``MAX_ITERATIONS``), by bisection: fewer steps mean fewer epochs and so less validation, which no closed form
    of the per-epoch rounding captures."""
    fits, over = 0, min(MAX_ITERATIONS, int(max(0.0, budget_s - STARTUP_SECONDS) / step_s)) + 1
    while over - fits > 1:  # ``fits``: the answer so far (0: none fit); ``over``: too many, or past the cap
        middle = (fits + over) // 2
        if predicted_seconds(middle, step_s, forward_s, budget_s) <= budget_s:
            fits = middle
        else:
            over = middle
    return fits


def minimum_budget_seconds(step_s: float, forward_s: float, startup_s: float = STARTUP_SECONDS) -> float:
    """The least budget worth training in: startup, ``MIN_BUDGET_STEPS`` steps and a one-batch validation."""
    return startup_s + MIN_BUDGET_STEPS * step_s + forward_s


def check_budget_holds(budget_s: float, step_s: float, forward_s: float, measured_on: str, fix: str,
                       startup_s: float = STARTUP_SECONDS) -> None:
    """Refuse (ValueError) a budget below `minimum_budget_seconds`: such a run would stop before it learnt anything,
    or overrun its cap by a step and a validation. ``fix``: what the user can do about it; ``startup_s``: the part
    of the budget that goes before the first step (0 for the trainer, whose budget clock starts at its first step)."""
    need = minimum_budget_seconds(step_s, forward_s, startup_s)
    if budget_s < need:
        validation = f" and {forward_s:.2f} s per validation batch" if forward_s else ""
        raise ValueError(f"a time budget of {budget_s:.0f} s cannot hold {MIN_BUDGET_STEPS} training steps and one "
                         f"validation: they take ~{need:.0f} s at {step_s:.2f} s/step{validation} ({measured_on}); "
                         f"{fix}, or give at least {math.ceil(need)} s")


def check_planned_budget(budget_s: float, training: dict[str, Any], text: str | float) -> None:
    """`check_budget_holds` before a run's first step, at the step and forward times its plan measured (none
    without them; no startup: the trainer's clock starts after it); ``text``: the budget as the user wrote it."""
    if "step_seconds" in training:
        check_budget_holds(budget_s, training["step_seconds"], training.get("forward_seconds", 0.0),
                           f"measured by the plan on {training.get('device', 'its device')}",
                           f"narrow the network for it with `decathlete plan DATASET -o WORKDIR --time-budget {text}`",
                           startup_s=0.0)


def fit_to_budget(config: Configuration, plans: Plans, budget_s: float, device: torch.device, measure: Measure,
                  log: Any = print) -> Configuration:
    """The configuration narrowed/batched for ``budget_s`` of training on ``device`` (see the module docstring),
    step times taken by ``measure``."""
    planned_base, planned_batch = config.features_per_stage[0], config.batch_size
    overrides = short_schedule_overrides(plans)  # rule 6, timed from the first probe on; dropped if all fits
    config = with_short_schedule(config, plans)
    widths, start_batch = candidate_widths(config), start_batch_size(config, plans)
    records: list[dict[str, Any]] = []
    chosen: tuple[int, dict[str, float]] | None = None
    for base in widths:  # narrowest first: stop measuring once a width is too slow
        candidate = with_width(config, plans, base, start_batch)
        timing = measure(candidate, plans, device)
        n = iterations_in(budget_s, timing["step_seconds"], timing["forward_seconds"])
        records.append({"base_features": base, "batch_size": start_batch, "parameters": candidate.parameters,
                        **_rounded(timing), "iterations": n, "measured": True})
        log(f"  probe {base} base features, batch {start_batch}: {timing['step_seconds']:.3f} s/step -> {n} steps")
        if chosen is None or n >= MIN_ITERATIONS:
            chosen = (base, timing)
        if n < MIN_ITERATIONS:
            break
    base, timing = chosen
    batch = start_batch
    for b in range(start_batch + 1, planned_batch + 1):  # extrapolated linearly in the batch
        scale = b / start_batch
        n = iterations_in(budget_s, timing["step_seconds"] * scale, timing["forward_seconds"] * scale)
        if n < MIN_ITERATIONS:
            break
        batch = b
    result = with_width(config, plans, base, batch)
    if batch != start_batch:
        timing = measure(result, plans, device)
        records.append({"base_features": base, "batch_size": batch, "parameters": result.parameters,
                        **_rounded(timing), "measured": True})
    n = iterations_in(budget_s, timing["step_seconds"], timing["forward_seconds"])
    if n < MIN_ITERATIONS and (plans.recipe_settings or {}).get("planning", {}).get("budget_crop", False):
        result, timing = _shrink_crop(result, plans, budget_s, device, measure, timing, records, log)
        n = iterations_in(budget_s, timing["step_seconds"], timing["forward_seconds"])
    check_budget_holds(budget_s, timing["step_seconds"], timing["forward_seconds"],
                       f"the narrowest network, measured on {device_description(device)}",
                       "a smaller patch (plan --gpu-memory 1) or the 2d configuration may fit")
    if n >= recipe_iterations(plans) and overrides:  # the recipe's own schedule fits: its own optimiser
        overrides, result = {}, replace(result, training=None)
        timing = measure(result, plans, device)
    n = min(n, recipe_iterations(plans))
    epochs = max(1, math.ceil(n / ITERATIONS_PER_EPOCH))
    per_epoch = n // epochs  # rounded down: the plan never asks for more steps than the budget holds
    training = {"budget_seconds": budget_s, "device": device_description(device), "base_features": base,
                "batch_size": batch, "patch_size": list(result.patch_size), "iterations": epochs * per_epoch,
                "epochs": epochs, "iterations_per_epoch": per_epoch,
                "val_iterations": validation_batches(budget_s, epochs, timing["forward_seconds"]), **_rounded(timing),
                "predicted_seconds": round(predicted_seconds(epochs * per_epoch, timing["step_seconds"],
                                                             timing["forward_seconds"], budget_s), 1),
                "planned_without_budget": {"base_features": planned_base, "batch_size": planned_batch,
                                           "patch_size": list(config.patch_size), "parameters": config.parameters},
                "candidates": records, **({"recipe_overrides": overrides} if overrides else {})}
    result = _short_schedule_init(result, training["iterations"], recipe_iterations(plans))
    if overrides:
        result.notes.append(f"{training['iterations']} iterations, fewer than the recipe's {recipe_iterations(plans)}:"
                            f" trained with {json.dumps(overrides)} instead of nnU-Net's SGD, which leaves rare "
                            "classes at background for the first thousands of steps (train --set "
                            f"'optimizer={json.dumps(NNUNET_OPTIMIZER)}' keeps nnU-Net's)")
    if n < MIN_ITERATIONS:
        result.notes.append(f"even {base} base features leave only {n} iterations in the budget: expect an "
                            "undertrained network; give more time")
    result.notes.append(f"time budget {budget_s:.0f} s on {training['device']}: {base} base features, batch {batch},"
                        f" patch {result.patch_size},"
                        f" {training['iterations']} iterations of {timing['step_seconds']:.3f} s, predicted "
                        f"{training['predicted_seconds']:.0f} s")
    return replace(result, training=training)


def choose_configuration(configurations: dict[str, Configuration]) -> dict[str, Any] | None:
    """Rule 7: the budgeted configuration to train. The first 3D one (in plan order: 3d_fullres before 3d_lowres) whose
    plan holds ``MIN_ITERATIONS``; else 2D where it holds them; else the one holding the most. None without a
    budget. A cascade stage is no candidate: it needs its previous stage trained first. Returns
    ``{"configuration", "why", "iterations"}`` (planned iterations per configuration)."""
    steps = {name: c.training["iterations"] for name, c in configurations.items()
             if c.training and not c.previous_stage}
    if not steps:
        return None
    three_d = [n for n in steps if configurations[n].spatial_dims == 3]
    enough = [n for n in three_d if steps[n] >= MIN_ITERATIONS] or [n for n in steps if steps[n] >= MIN_ITERATIONS]
    if enough:
        name = enough[0]
        why = (f"holds {steps[name]} iterations, at least {MIN_ITERATIONS}" if name in three_d or not three_d else
               f"no 3D configuration holds {MIN_ITERATIONS} iterations in the budget "
               f"({', '.join(f'{n}: {steps[n]}' for n in three_d)}); {name} holds {steps[name]}")
    else:
        name = max(steps, key=lambda n: steps[n])
        why = f"none holds {MIN_ITERATIONS} iterations; {name} holds the most ({steps[name]})"
    return {"configuration": name, "why": why, "iterations": steps}


def smaller_patch(patch: list[int], median: list[int], divisor: list[int], floor: list[int],
                  voxels: float) -> list[int]:
    """``patch`` shrunk to at most ``voxels``, as the memory rule shrinks it: the axis with the largest patch/median
    ratio loses its pooling divisor, until the target or every axis's ``floor`` is reached."""
    patch = list(patch)
    while math.prod(patch) > voxels:
        ratios = [p / max(m, 1) if p - d >= f else -1.0 for p, m, d, f in zip(patch, median, divisor, floor)]
        axis = max(range(len(patch)), key=lambda i: (ratios[i], i))
        if ratios[axis] < 0:
            break
        patch[axis] -= divisor[axis]
    return patch


def _shrink_crop(config: Configuration, plans: Plans, budget_s: float, device: torch.device, measure: Measure,
                 timing: dict[str, float], records: list[dict[str, Any]], log: Any) -> tuple[Configuration, dict]:
    """Rule 5 (a recipe's ``planning.budget_crop``): shrink the patch, on the same topology, until the budget holds
    ``MIN_ITERATIONS`` steps or the bottleneck reaches nnU-Net's smallest feature map; the step time is assumed
    proportional to the voxels to choose each smaller patch, and each is measured."""
    divisor = [math.prod(s[a] for s in config.strides) for a in range(config.spatial_dims)]
    floor = [d * MIN_FEATURE_MAP_SIZE for d in divisor]
    median = [int(m) for m in (config.median_shape or config.patch_size)]
    for _ in range(4):
        n = iterations_in(budget_s, timing["step_seconds"], timing["forward_seconds"])
        if n >= MIN_ITERATIONS:
            break
        voxels = math.prod(config.patch_size) * max(n, 1) / MIN_ITERATIONS
        patch = smaller_patch(list(config.patch_size), median, divisor, floor, voxels)
        if patch == list(config.patch_size):
            break
        config = with_patch(config, plans, patch)
        timing = measure(config, plans, device)
        n = iterations_in(budget_s, timing["step_seconds"], timing["forward_seconds"])
        records.append({"base_features": config.features_per_stage[0], "batch_size": config.batch_size,
                        "patch_size": patch, "parameters": config.parameters, **_rounded(timing), "iterations": n,
                        "measured": True})
        log(f"  probe patch {patch}: {timing['step_seconds']:.3f} s/step -> {n} steps")
    return config, timing


def _rounded(timing: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in timing.items()}


def recipe_iterations(plans: Plans) -> int:
    """The optimiser steps of the recipe's own schedule (nnU-Net's 250,000 for plans that do not record it)."""
    recipe = plans.recipe_settings or {}
    if "epochs" not in recipe:
        return MAX_ITERATIONS
    return min(MAX_ITERATIONS, int(recipe["epochs"]) * int(recipe.get("iterations_per_epoch", ITERATIONS_PER_EPOCH)))


def candidate_widths(config: Configuration) -> list[int]:
    """The base widths rule 1 tries, narrowest first: ``BASE_WIDTHS`` up to the planned one, and the planned one."""
    planned = config.features_per_stage[0]
    return sorted({w for w in BASE_WIDTHS if w <= planned} | {planned})


def start_batch_size(config: Configuration, plans: Plans) -> int:
    """The batch candidates are timed at (rule 2): 2, or the planned batch where the recipe fixes it."""
    fixed = (plans.recipe_settings or {}).get("planning", {}).get("batch_size") is not None
    return config.batch_size if fixed else min(2, config.batch_size)


def with_short_schedule(config: Configuration, plans: Plans) -> Configuration:
    """``config`` carrying rule 6's overrides in its ``training`` (what the probe applies), or none."""
    overrides = short_schedule_overrides(plans)
    return replace(config, training={"recipe_overrides": overrides} if overrides else None)


def short_schedule_overrides(plans: Plans) -> dict[str, Any]:
    """Rule 6's recipe overrides for a schedule shorter than the recipe's: AdamW where the recipe keeps nnU-Net's
    SGD, nothing where it names its own optimiser."""
    optimizer = (plans.recipe_settings or {}).get("optimizer")
    return {"optimizer": SHORT_SCHEDULE_OPTIMIZER} if optimizer == NNUNET_OPTIMIZER else {}


def _short_schedule_init(config: Configuration, iterations: int, full: int) -> Configuration:
    """PyTorch's initial weights for a schedule shorter than the recipe's ``full`` one (rule 4), unless the plan
    names an init."""
    network = config.network
    takes_init = "init" in inspect.signature(get("nets", network.name)).parameters
    if iterations >= full or not takes_init or "init" in network.kwargs:
        return config
    notes = [*config.notes, f"{iterations} iterations, fewer than the recipe's {full}: PyTorch's initial "
                            "weights, which learn faster at the start (--set net.init=he for nnU-Net's)"]
    return replace(config, network=NetworkSpec(network.name, {**network.kwargs, "init": "torch"}), notes=notes)
