"""The wall-clock side of a training run with a time budget: elapsed time across resumes, schedule progress, stop,
and re-fitting the number of epochs to the step time actually measured."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from decathlete.train.distributed import World, all_reduce_sum

RECENT_EPOCHS = 3  # the refit's window: long enough to ride out one odd epoch, short enough to follow the machine
BUSY_RATIO = 1.5  # measured s/step this far above the probe's: the machine is busy (or the probe ran quiet)


class TrainingClock:
    """Seconds spent training (carried over ``--resume``), measured against an optional budget.

    With a budget the learning-rate schedule runs on ``max(step progress, time progress)``, so a run that the budget
    cuts short is still annealed at its end instead of stopping at a high learning rate; and that progress never goes
    back, so re-fitting the run to more epochs (fewer steps done out of more) does not raise the learning rate again.
    """

    def __init__(self, budget_s: float | None, already_s: float = 0.0,
                 anchor: tuple[float, float] | list[float] | None = None,
                 now: Callable[[], float] = time.perf_counter) -> None:
        self.budget_s, self.already_s, self.now = budget_s, already_s, now  # ``now``: a fake clock in tests
        self.start = now()
        self.anchor = anchor
        self._reached = 0.0

    def elapsed(self) -> float:
        return self.already_s + self.now() - self.start

    def progress(self, step: int, total: int) -> float:
        done = step / max(total, 1)
        if self.budget_s:
            done = max(done, self.elapsed() / self.budget_s, self._reached)
            self._reached = min(done, 1.0)
        return min(done, 1.0)

    def schedule_step(self, step: int, total: int) -> float:
        """The step a step-based schedule should be evaluated at: ``step`` itself, or the budget's progress, or on an
        extended run the position that continues its schedule (`schedule_position`)."""
        if self.budget_s:
            # not rounded down to a whole step: after a refit to more steps that would undo part of the progress
            return max(step, self.progress(step, total) * total)
        return schedule_position(step, total, self.anchor)

    def out_of_time(self, reserve_s: float = 0.0) -> bool:
        """True when what is left of the budget no longer covers ``reserve_s`` (the closing validation)."""
        return bool(self.budget_s) and self.elapsed() + reserve_s >= self.budget_s

    def epochs_that_fit(self, epochs_done: int, epoch_seconds: list[float]) -> int | None:
        """Total epochs the budget holds at the median time (training + validation) of the last
        ``RECENT_EPOCHS`` epochs, or None without a budget or a measurement.

        The plan's iteration count rests on a few probe steps, which on a busy machine are off by 20% either way;
        recounting from whole epochs lets a run use the budget it was given instead of ending early or being cut.
        Only recent epochs count, so a run slowed by other work early on widens back when the machine turns quiet
        (the median of all epochs would keep it narrow for as long again).
        """
        if not self.budget_s or not epoch_seconds:
            return None
        per_epoch = statistics.median(epoch_seconds[-RECENT_EPOCHS:])
        return epochs_done + max(0, round((self.budget_s - self.elapsed()) / max(per_epoch, 1e-6)))


def schedule_position(step: int, total: int, anchor: tuple[float, float] | list[float] | None) -> float:
    """Where a schedule over ``total`` steps stands at ``step``: ``step`` itself, or, for a run extended at step
    ``s0`` with its schedule at progress ``p0`` (``anchor``), the remaining progress spread over the remaining steps,
    ``(p0 + (1 - p0) * (step - s0) / (total - s0)) * total``: the learning rate continues from where it was and
    anneals to the end of the longer run instead of jumping back up."""
    if anchor is None:
        return step
    s0, p0 = anchor
    return (p0 + (1 - p0) * (step - s0) / max(total - s0, 1)) * total


def extended_anchor(schedule: Callable[[float, int], float], step: int, old_total: int, new_total: int,
                    anchor: tuple[float, float] | list[float] | None) -> list[float] | None:
    """The schedule anchor of a run resumed at ``step`` with ``new_total`` steps instead of ``old_total``.

    Unchanged unless the new length would raise the learning rate above the last one used, at ``step - 1`` (a poly
    or cosine schedule evaluated over more steps); then the run continues from that step's progress
    (`schedule_position`), so the rate goes on falling from where it was to the end of the longer run. Schedules
    that do not depend on the total (exponential, constant) and shortened runs keep theirs.
    """
    if new_total == old_total or step <= 0:
        return None if anchor is None else list(anchor)
    last = step - 1
    if schedule(schedule_position(step, new_total, anchor), new_total) <= schedule(
            schedule_position(last, old_total, anchor), old_total):
        return None if anchor is None else list(anchor)
    return [float(last), min(schedule_position(last, old_total, anchor) / max(old_total, 1), 1.0)]


def _decided_by_rank0(value: float, world: World, dev: torch.device) -> float:
    """Rank 0's ``value`` on every rank (each rank's own clock differs; under DDP they must agree)."""
    if world.size == 1:
        return value
    return float(all_reduce_sum(torch.tensor(value if world.is_main else 0.0, device=dev), world).item())


def budget_spent(clock: TrainingClock, reserve_s: float, world: World, dev: torch.device) -> bool:
    """Whether the budget is spent (False without one), the same answer on every rank."""
    if not clock.budget_s:
        return False
    return _decided_by_rank0(float(clock.out_of_time(reserve_s)), world, dev) > 0


def refit_epochs(clock: TrainingClock, epochs_done: int, epoch_seconds: list[float], planned: int, world: World,
                 dev: torch.device) -> int:
    """The run's new total epochs from its measured epoch time (``planned`` without a budget)."""
    fitted = clock.epochs_that_fit(epochs_done, epoch_seconds)
    if fitted is None:
        return planned
    return int(_decided_by_rank0(float(fitted), world, dev))


def achieved_vs_planned(steps: int, step_seconds: float | None, planned: dict[str, Any] | None) -> list[str]:
    """Lines for the log of a budgeted run's end: ``steps`` done against the plan's iterations, the measured
    ``step_seconds`` against the probe's, and whether the machine looked busy (``BUSY_RATIO``). Empty without a
    plan made for a budget or without a measurement."""
    if not planned or "step_seconds" not in planned or not step_seconds:
        return []
    probed = float(planned["step_seconds"])
    ratio = step_seconds / max(probed, 1e-9)
    lines = [f"achieved {steps} steps of the plan's {planned['iterations']}; measured {step_seconds:.3f} s/step "
             f"against the probe's {probed:.3f} s/step ({ratio:.2f}x)"]
    if round(ratio, 2) >= BUSY_RATIO:  # as printed: 0.6 s against 0.4 s is 1.5x, whatever the float says
        lines.append(f"the machine looks busy: steps took {ratio:.1f}x the probe's time (other work competing for "
                     "the cores?), so fewer steps fit the budget than planned")
    return lines
