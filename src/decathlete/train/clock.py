"""The wall-clock side of a training run with a time budget: elapsed time across resumes, schedule progress, stop."""

from __future__ import annotations

import time


class TrainingClock:
    """Seconds spent training (carried over ``--resume``), measured against an optional budget.

    With a budget the learning-rate schedule runs on ``max(step progress, time progress)``, so a run that the budget
    cuts short is still annealed at its end instead of stopping at a high learning rate.
    """

    def __init__(self, budget_s: float | None, already_s: float = 0.0) -> None:
        self.budget_s, self.already_s, self.start = budget_s, already_s, time.perf_counter()

    def elapsed(self) -> float:
        return self.already_s + time.perf_counter() - self.start

    def progress(self, step: int, total: int) -> float:
        done = step / max(total, 1)
        if self.budget_s:
            done = max(done, self.elapsed() / self.budget_s)
        return min(done, 1.0)

    def schedule_step(self, step: int, total: int) -> int:
        """The step a step-based schedule should be evaluated at (``step`` itself without a budget)."""
        return step if not self.budget_s else max(step, int(self.progress(step, total) * total))

    def out_of_time(self, reserve_s: float = 0.0) -> bool:
        """True when what is left of the budget no longer covers ``reserve_s`` (the closing validation)."""
        return bool(self.budget_s) and self.elapsed() + reserve_s >= self.budget_s
