"""CPU threads for a time budget: which torch thread count trains fastest here, and whether the machine is busy.

Two-thread torch on a 2-core machine collapses when another process takes a core (measured: 0.33-0.38 s per step
quiet, 1.01 s with a nice-19 busy loop on one core), while one thread only halves. So before fitting a configuration
to a budget on a CPU, its narrowest network's step is timed at one thread and at all of them, and the faster count is
kept for the probe and for training (``training["threads"]``). The fitted network is timed at both again when it is
wider or batched larger than the narrowest, and fitted again at the other count if that is faster there: a narrow
step is mostly overhead (the hippocampus's 8-feature 2D step ran in 0.015 s on one thread, 0.021 s on two), which a
wider network outgrows. The same timing tells how much of the cores the process got (CPU seconds over wall seconds
and threads): below ``BUSY_SHARE`` the plan says that the machine looked busy, since its step times, and so its
iterations, are those of a busy machine (the trainer re-fits the iterations to the steps it measures, wider again
when the machine quiets down).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import Any

import torch

from decathlete.planning.budget import (
    Measure,
    candidate_widths,
    fit_to_budget,
    start_batch_size,
    with_short_schedule,
    with_width,
)
from decathlete.planning.plans import Configuration, Plans

BUSY_SHARE = 0.75  # a process that gets less than this share of its threads' CPU time shares the machine

# ``measure_at(threads) -> {"step_seconds", "cpu_share", ...}``: one candidate's step timed at that thread count
MeasureAt = Callable[[int], dict[str, float]]


def thread_counts(device: torch.device, available: int | None = None) -> list[int]:
    """The counts worth timing: none on a GPU (the CPU only feeds it), else 1 and all of torch's threads."""
    n = torch.get_num_threads() if available is None else available
    return [] if device.type != "cpu" or n <= 1 else [1, n]


def choose_threads(measure_at: MeasureAt, counts: list[int]) -> dict[str, Any]:
    """Time the step at each of ``counts`` and keep the fastest (ties go to fewer threads, which a busy machine
    hurts less). Returns ``{"threads", "step_seconds": {count: s}, "cpu_share", "busy"}`` (``cpu_share`` of the
    chosen count; ``busy``: below ``BUSY_SHARE``)."""
    timings = {n: measure_at(n) for n in counts}
    best = min(counts, key=lambda n: (round(timings[n]["step_seconds"], 4), n))
    share = float(timings[best].get("cpu_share", 1.0))
    return {"threads": best, "step_seconds": {str(n): round(t["step_seconds"], 4) for n, t in timings.items()},
            "cpu_share": round(share, 3), "busy": share < BUSY_SHARE}


def describe(choice: dict[str, Any]) -> str:
    """One line for the plan's log and notes."""
    times = ", ".join(f"{n} thread{'s' if n != '1' else ''} {s:.3f} s/step" for n, s in choice["step_seconds"].items())
    line = f"{times} -> {choice['threads']}"
    if choice["busy"]:
        line += (f"; the machine looks busy: while probing, this process got {choice['cpu_share']:.0%} of the CPU "
                 f"time of its {choice['threads']} thread(s), so the plan holds fewer steps than a quiet machine "
                 "would (training re-fits them to the steps it measures)")
    return line


def fit_with_threads(config: Configuration, plans: Plans, budget_s: float, device: torch.device, measure: Measure,
               log: Any = print) -> Configuration:
    """`decathlete.planning.budget.fit_to_budget` at the faster thread count (see the module docstring): chosen on
    the narrowest candidate, checked on the fitted network when that differs, fitted again if the other count is
    faster there; recorded by `with_threads`. On a GPU, plain ``fit_to_budget``."""
    quick = partial(measure, steps=3, warmup=1)
    choice = fit_threads(config, plans, device, quick, log)
    with torch_threads(choice and choice["threads"]):
        fitted = fit_to_budget(config, plans, budget_s, device, measure, log)
    first = (fitted.training or {}).get("candidates", [{}])[0]
    if choice and (first.get("base_features"), first.get("batch_size")) != (fitted.features_per_stage[0],
                                                                          fitted.batch_size):
        again = choose_threads(lambda n: quick(fitted, plans, device, threads=n), thread_counts(device))
        if again["threads"] != choice["threads"]:
            log(f"  threads at the fitted network: {describe(again)}; fitting again")
            choice = again
            with torch_threads(choice["threads"]):
                fitted = fit_to_budget(config, plans, budget_s, device, measure, log)
    return with_threads(fitted, choice)


def fit_threads(config: Configuration, plans: Plans, device: torch.device, measure: Measure,
                log: Any = print) -> dict[str, Any] | None:
    """`choose_threads` for ``config``'s narrowest budget candidate (the width and batch the budget rules try
    first), timed by ``measure(candidate, plans, device, threads=n)``; None on a GPU or a one-thread CPU."""
    counts = thread_counts(device)
    if not counts:
        return None
    narrowest = with_width(config, plans, candidate_widths(config)[0], start_batch_size(config, plans))
    narrowest = with_short_schedule(narrowest, plans)
    choice = choose_threads(lambda n: measure(narrowest, plans, device, threads=n), counts)
    log(f"  threads: {describe(choice)}")
    return choice


def with_threads(config: Configuration, choice: dict[str, Any] | None) -> Configuration:
    """``config`` with the thread choice in its ``training`` (the trainer sets torch's threads from it) and, on a
    busy machine, a note saying so."""
    if choice is None or config.training is None:
        return config
    notes = list(config.notes) + ([f"probed on a busy machine: {describe(choice)}"] if choice["busy"] else [])
    return replace(config, training={**config.training, "threads": choice}, notes=notes)


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's CPU threads set to ``count`` (None: unchanged) inside the block, restored after."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
