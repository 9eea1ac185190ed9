"""Learning-rate schedules as pure functions of the step, so a resumed run continues exactly where it stopped."""

from __future__ import annotations

import math
from collections.abc import Callable

from decathlete.registry import register_schedule

Schedule = Callable[[int, int], float]


@register_schedule("poly")
def poly(power: float = 0.9) -> Schedule:
    """nnU-Net's polynomial decay: factor ``(1 - step / total) ** power``."""
    return lambda step, total: max(1.0 - step / max(total, 1), 0.0) ** power


@register_schedule("cosine")
def cosine(final_factor: float = 0.0) -> Schedule:
    """Cosine annealing from 1 to ``final_factor`` over ``total`` steps."""
    def factor(step: int, total: int) -> float:
        progress = min(step / max(total, 1), 1.0)
        return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@register_schedule("exponential")
def exponential(gamma: float = 0.985, every: int = 250) -> Schedule:
    """Step decay: factor ``gamma ** (step // every)`` (e.g. x0.985 per epoch of 250 steps, van den Hork 2019;
    x0.984 every 100 steps, Rippel 2018)."""
    if every < 1:
        raise ValueError(f"every must be at least 1 step, got {every}")
    return lambda step, total: gamma ** (step // every)


@register_schedule("constant")
def constant() -> Schedule:
    """No decay."""
    return lambda step, total: 1.0


def warmup(schedule: Schedule, warmup_steps: int) -> Schedule:
    """Linear warm-up over ``warmup_steps`` before ``schedule`` (used by the Adam-based recipes)."""
    return lambda step, total: schedule(step, total) * min(1.0, (step + 1) / max(warmup_steps, 1))
