"""Which CPU speed-ups pay: a training step and an inference forward of a planned network under each option.

    .venv/bin/python benchmarks/cpu_speedups.py WORK [-c 3d_fullres] [--steps 10] [--rounds 3] [--out FILE]

WORK is a ``decathlete plan`` work folder (its ``plans.json``); the network, batch and patch are that plan's. Options
compared against the baseline (eager, fp32, contiguous, torch threads = CPU count), one at a time:

* ``channels_last``: network and input in ``torch.channels_last_3d`` (what the trainer uses for 3D on CPUs);
* ``compile``: ``torch.compile(net)`` (default mode); its one-off compilation is reported separately;
* ``bf16``: ``torch.autocast("cpu", dtype=torch.bfloat16)`` around the forward (and loss);
* ``threads_1``: one torch thread instead of the CPU count.

A step is zero_grad + forward + the recipe's deep-supervision loss on random data + backward + clipping + the
recipe's optimiser step (no data loading); a forward is the validation/inference forward under ``inference_mode``.
Variants are measured in rounds (every variant once per round, so a busy machine hits all of them), ``--steps``
timed repetitions per variant and round after one warm-up; the figure is the median over all timed repetitions.
Prints and optionally writes one JSON object with seconds and speed-up vs the baseline. This is where the CPU
choices of the trainer and predictor come from (see ``decathlete.train.trainer.channels_last``); not part of
``make bench``, because its reference is decathlete itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from decathlete.labels import LabelScheme
from decathlete.losses.base import TrainingBatch
from decathlete.losses.deep_supervision import downsample_target, ds_factors
from decathlete.nets.base import NetOutput
from decathlete.planning.plans import Plans
from decathlete.recipes.base import Recipe, get_recipe
from decathlete.recipes.build import build_loss, build_network, build_optimizer

VARIANTS = ("baseline", "channels_last", "compile", "bf16", "threads_1")


def _setup(plans: Plans, configuration: str, variant: str, seed: int) -> dict[str, Callable[[], None]]:
    config = plans.configuration(configuration)
    torch.manual_seed(seed)
    net = build_network(config, plans)
    fmt = torch.contiguous_format
    if variant == "channels_last":
        fmt = torch.channels_last_3d if config.spatial_dims == 3 else torch.channels_last
        net = net.to(memory_format=fmt)
    model = torch.compile(net) if variant == "compile" else net
    recipe = Recipe.from_dict(plans.recipe_settings) if plans.recipe_settings else get_recipe(plans.recipe)
    loss_fn = build_loss(recipe, config, plans)
    optimizer = build_optimizer(recipe, net)
    labels = LabelScheme.from_dataset(plans.dataset)
    n_in = len(plans.dataset["channel_names"])
    gen = torch.Generator().manual_seed(seed)
    shape = (config.batch_size, n_in, *config.patch_size)
    image = torch.randn(shape, generator=gen).contiguous(memory_format=fmt)
    label = torch.randint(0, max(labels.label_values) + 1, (config.batch_size, 1, *config.patch_size), generator=gen)
    batch = TrainingBatch(image, label, downsample_target(labels.targets(label), ds_factors(config.strides)))
    bf16 = variant == "bf16"

    def step() -> None:
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(NetOutput.of(model(image)), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), recipe.grad_clip)
        optimizer.step()

    def forward() -> None:
        model.eval()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(image)

    return {"step": step, "forward": forward}


def _time(fn: Callable[[], None], n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def measure(plans: Plans, configuration: str, steps: int, rounds: int, variants: tuple[str, ...]) -> dict[str, Any]:
    threads = os.cpu_count() or 1
    runs = {v: _setup(plans, configuration, v, seed=0) for v in variants}
    first_call = {}
    for v, fns in runs.items():  # warm-up: compilation (and allocator growth) happens here, timed separately
        torch.set_num_threads(1 if v == "threads_1" else threads)
        first_call[v] = {k: round(_time(fn, 1)[0], 3) for k, fn in fns.items()}
    times: dict[str, dict[str, list[float]]] = {v: {"step": [], "forward": []} for v in variants}
    for _ in range(rounds):
        for v, fns in runs.items():
            torch.set_num_threads(1 if v == "threads_1" else threads)
            for kind, fn in fns.items():
                times[v][kind] += _time(fn, steps)
    torch.set_num_threads(threads)
    median = {v: {k: statistics.median(t) for k, t in kinds.items()} for v, kinds in times.items()}
    base = median["baseline"]
    return {v: {**{f"{k}_seconds": round(s, 4) for k, s in median[v].items()},
                **{f"{k}_speedup": round(base[k] / s, 3) for k, s in median[v].items()},
                "first_call_seconds": first_call[v]} for v in variants}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    variants = tuple(dict.fromkeys(["baseline", *args.variants]))
    plans = Plans.load(args.work / "plans.json")
    config = plans.configuration(args.configuration)
    result = {"configuration": args.configuration, "features_per_stage": config.features_per_stage,
              "batch_size": config.batch_size, "patch_size": config.patch_size, "parameters": config.parameters,
              "torch": torch.__version__, "cpu_count": os.cpu_count(), "steps": args.steps, "rounds": args.rounds,
              "variants": measure(plans, args.configuration, args.steps, args.rounds, variants)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
