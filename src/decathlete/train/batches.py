"""The trainer's batch sources: training crops from background workers and each epoch's validation patches."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from decathlete.data.loader import BatchStream

VALIDATION_SEED_OFFSET = 1_000_003  # validation patches never coincide with training ones


def default_workers(dev: torch.device) -> int:
    """Loader processes: none on a CPU (measured on 2 cores: moving a batch between processes costs ~80 ms, sampling
    it in-process ~20 ms, and the workers would compete with the training threads), several feeding a GPU."""
    if dev.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


class TrainBatches:
    """Augmentation-ready training crops from background workers, batch ``i`` a pure function of (seed, rank, i).

    Args:
        sampler: the recipe's sampler (`decathlete.recipes.build.build_sampler`), crops of the augmentation's size.
        batch_size, seed, rank, start_batch, num_workers, pin_memory: see `decathlete.data.loader.BatchStream`.
    """

    def __init__(self, sampler: Any, batch_size: int, seed: int, rank: int, start_batch: int, num_workers: int,
                 pin_memory: bool) -> None:
        self.stream = BatchStream(sampler, batch_size, seed, rank, start_batch, num_workers, pin_memory)

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(self.stream)
        return batch.image.to(device, non_blocking=True), batch.label.to(device, non_blocking=True)

    def close(self) -> None:
        self.stream.close()


class ValidationBatches:
    """``n`` un-augmented validation patches per epoch, drawn afresh each epoch as nnU-Net's validation loader does
    (foreground oversampled as in training): over a run the pseudo-Dice sees many patches, not the same few, while
    epoch ``e``'s patches stay a pure function of (seed, rank, e) so that a resumed run validates identically.

    Args:
        sampler: the recipe's sampler over the validation cases, crops of the patch size.
    """

    def __init__(self, sampler: Any, batch_size: int, seed: int, rank: int, n_batches: int) -> None:
        self.sampler = sampler
        self.batch_size, self.seed, self.rank, self.n_batches = batch_size, seed, rank, n_batches

    def iterate(self, device: torch.device, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(self.n_batches):
            rng = np.random.default_rng([self.seed + VALIDATION_SEED_OFFSET, self.rank, epoch, i])
            image, label, _ = self.sampler.sample_batch(self.batch_size, rng)
            yield torch.from_numpy(image).to(device), torch.from_numpy(label).to(device)
