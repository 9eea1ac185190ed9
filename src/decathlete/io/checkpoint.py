"""Checkpoints: written atomically, loaded with ``weights_only=True`` (no pickled code is ever executed).

A checkpoint holds the model and optimiser state, the step counters, the EMA pseudo-Dice, the best value so far,
the training history and the resolved run settings (JSON-safe). Random streams need no state: every batch and every
augmentation is drawn from a generator seeded by ``(seed, rank, step)``, so a resumed run replays them exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from decathlete.io.atomic import write_atomic

LATEST, BEST, FINAL = "checkpoint_latest.pth", "checkpoint_best.pth", "checkpoint_final.pth"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary in the same folder, then rename over ``path``."""
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``).

    Raises:
        FileNotFoundError: naming the file (callers that know why it is missing check first and say so).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP and/or torch.compile wrappers (their state-dict keys carry prefixes)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
