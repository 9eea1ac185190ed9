"""The budget probe: seconds of the recipe's training step and of one validation forward on a device.

`decathlete.planning.budget.fit_to_budget` asks these figures for every candidate width; they come from the very
`TrainStep` the trainer runs, built from the same recipe, so the plan measures what training will do.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from decathlete.devices import memory_format
from decathlete.labels import LabelScheme
from decathlete.planning.plans import Configuration, Plans
from decathlete.planning.threads import torch_threads
from decathlete.recipes.base import Recipe
from decathlete.recipes.build import base_learning_rate, build_network, build_optimizer, with_planned_overrides
from decathlete.train.step import build_step


def time_step(config: Configuration, plans: Plans, device: torch.device, recipe: Recipe, steps: int = 5,
              warmup: int = 2, seed: int = 0, threads: int | None = None) -> dict[str, float]:
    """Seconds of one training step and of one validation forward pass on ``device``: the median of ``steps``
    after ``warmup`` (the first steps pay for allocations and kernel selection; medians resist a busy machine).
    The recipe overrides the plan records for the candidate (``config.training["recipe_overrides"]``) apply, as
    they will in training. ``threads``: torch's CPU threads while timing (restored after). Also returns
    ``cpu_share``: the process's CPU seconds over wall seconds and threads while training steps ran (1: it had its
    cores to itself; `decathlete.planning.threads`)."""
    with torch_threads(threads):
        return _time_step(config, plans, device, with_planned_overrides(recipe, config), steps, warmup, seed)


def _time_step(config: Configuration, plans: Plans, device: torch.device, recipe: Recipe, steps: int, warmup: int,
               seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    net = build_network(config, plans).to(device, memory_format=memory_format(device, config.spatial_dims))
    step, input_size = build_step(recipe, config, plans, net, build_optimizer(recipe, net), device)
    n_in = len(plans.dataset["channel_names"])  # the images' channels: a cascade's others come from the label
    n_labels = max(LabelScheme.from_dataset(plans.dataset).label_values) + 1
    lr = base_learning_rate(recipe)
    gen = torch.Generator().manual_seed(seed)

    def train() -> None:
        # A fresh random batch each step stands in for the trainer's in-process sampling (reading and cropping a
        # cached case): measured on 2 cores, leaving it out made the prediction 20-35 % short.
        image = torch.randn((config.batch_size, n_in, *input_size), generator=gen).to(device)
        label = torch.randint(0, n_labels, (config.batch_size, step.label_channels, *input_size), generator=gen)
        step(image, label.to(device), gen, lr)

    def forward() -> None:
        image = torch.randn((config.batch_size, n_in, *config.patch_size), generator=gen).to(device)
        label = torch.randint(0, n_labels, (config.batch_size, step.label_channels, *config.patch_size), generator=gen)
        step.evaluate(image, label.to(device))

    net.train()
    cpu, wall = time.process_time(), time.perf_counter()
    step_seconds = _timed(train, steps, warmup, device)
    share = (time.process_time() - cpu) / max((time.perf_counter() - wall) * torch.get_num_threads(), 1e-9)
    net.eval()
    return {"step_seconds": step_seconds, "forward_seconds": _timed(forward, 3, 1, device),
            "cpu_share": min(1.0, share)}


def _timed(fn: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return float(statistics.median(times))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
