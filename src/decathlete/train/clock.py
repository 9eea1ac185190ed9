"""The wall-clock side of a training run with a time budget: elapsed time across resumes, schedule progress, stop,
and re-fitting the number of epochs to the step time actually measured."""

from __future__ import annotations

import statistics
import time

import torch

from decathlete.train.distributed import World, all_reduce_sum


class TrainingClock:
    """Seconds spent training (carried over ``--resume``), measured against an optional budget.

    With a budget the learning-rate schedule runs on ``max(step progress, time progress)``, so a run that the budget
    cuts short is still annealed at its end instead of stopping at a high learning rate; and that progress never goes
    back, so re-fitting the run to more epochs (fewer steps done out of more) does not raise the learning rate again.
    """

    def __init__(self, budget_s: float | None, already_s: float = 0.0) -> None:
        self.budget_s, self.already_s, self.start = budget_s, already_s, time.perf_counter()
        self._reached = 0.0

    def elapsed(self) -> float:
        return self.already_s + time.perf_counter() - self.start

    def progress(self, step: int, total: int) -> float:
        done = step / max(total, 1)
        if self.budget_s:
            done = max(done, self.elapsed() / self.budget_s, self._reached)
            self._reached = min(done, 1.0)
        return min(done, 1.0)

    def schedule_step(self, step: int, total: int) -> int:
        """The step a step-based schedule should be evaluated at (``step`` itself without a budget)."""
        return step if not self.budget_s else max(step, int(self.progress(step, total) * total))

    def out_of_time(self, reserve_s: float = 0.0) -> bool:
        """True when what is left of the budget no longer covers ``reserve_s`` (the closing validation)."""
        return bool(self.budget_s) and self.elapsed() + reserve_s >= self.budget_s

    def epochs_that_fit(self, epochs_done: int, epoch_seconds: list[float]) -> int | None:
        """Total epochs the budget holds at the median measured epoch time (training + validation), or None
        without a budget or a measurement.

        The plan's iteration count rests on a few probe steps, which on a busy machine are off by 20% either way;
        recounting from whole epochs lets a run use the budget it was given instead of ending early or being cut.
        """
        if not self.budget_s or not epoch_seconds:
            return None
        per_epoch = statistics.median(epoch_seconds)
        return epochs_done + max(0, round((self.budget_s - self.elapsed()) / max(per_epoch, 1e-6)))


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
