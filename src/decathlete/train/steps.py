"""The trainer's helpers for data and metrics: training/validation batch sources, targets, pseudo-Dice counts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from decathlete.data.loader import BatchStream
from decathlete.data.sampling import PatchSampler
from decathlete.planning.plans import Configuration

VALIDATION_SEED_OFFSET = 1_000_003  # validation patches never coincide with training ones


def _sampler_args(config: Configuration) -> dict:
    return {"spatial_dims": config.spatial_dims, "slice_axis": int(config.resampling.get("slice_axis", 0))}


class TrainBatches:
    """Augmentation-ready training crops from background workers, batch ``i`` a pure function of (seed, rank, i)."""

    def __init__(self, cases_dir: Path, case_ids: Sequence[str], config: Configuration, input_size: Sequence[int],
                 batch_size: int, seed: int, rank: int, start_batch: int, num_workers: int, pin_memory: bool) -> None:
        sampler = PatchSampler(cases_dir, list(case_ids), input_size, patch_size=config.patch_size,
                               **_sampler_args(config))
        self.stream = BatchStream(sampler, batch_size, seed, rank, start_batch, num_workers, pin_memory)

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(self.stream)
        return batch.image.to(device, non_blocking=True), batch.label.to(device, non_blocking=True)

    def close(self) -> None:
        self.stream.close()


class ValidationBatches:
    """The same ``n`` un-augmented validation patches every epoch (foreground oversampled as in training)."""

    def __init__(self, cases_dir: Path, case_ids: Sequence[str], config: Configuration, batch_size: int, seed: int,
                 rank: int, n_batches: int) -> None:
        self.sampler = PatchSampler(cases_dir, list(case_ids), config.patch_size, **_sampler_args(config))
        self.batch_size, self.seed, self.rank, self.n_batches = batch_size, seed, rank, n_batches

    def iterate(self, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(self.n_batches):
            rng = np.random.default_rng([self.seed + VALIDATION_SEED_OFFSET, self.rank, i])
            image, label, _ = self.sampler.sample_batch(self.batch_size, rng)
            yield torch.from_numpy(image).to(device), torch.from_numpy(label).to(device)


def to_targets(label: torch.Tensor, regions: dict[str, Sequence[int]] | None) -> torch.Tensor:
    """Training targets from a ``(B, 1, ...)`` label map: "outside" (-1) becomes background, as in nnU-Net; for
    region-based data one binary float mask per region, ``(B, R, ...)``."""
    label = label.long().clamp_min(0)
    if not regions:
        return label
    values = list(regions.values())
    masks = [torch.isin(label, torch.as_tensor(v, device=label.device)) for v in values]
    return torch.cat(masks, dim=1).float()


@torch.no_grad()
def pseudo_dice_counts(logits: torch.Tensor, label: torch.Tensor,
                       regions: dict[str, Sequence[int]] | None) -> torch.Tensor:
    """Per foreground class (or region): ``(3, K)`` true positives, false positives, false negatives.

    Voxels labelled -1 ("outside") count nowhere. Predictions are the argmax (softmax outputs) or > 0.5 (regions).
    """
    valid = label >= 0
    if regions:
        target = to_targets(label, regions).bool()
        pred = logits.float().sigmoid() > 0.5
    else:
        classes = torch.arange(1, logits.shape[1], device=logits.device).view(1, -1, *[1] * (logits.ndim - 2))
        pred = logits.argmax(1, keepdim=True) == classes
        target = label.long() == classes
    pred, target = pred & valid, target & valid
    dims = [0, *range(2, logits.ndim)]
    tp = (pred & target).sum(dims)
    fp = (pred & ~target).sum(dims)
    fn = (~pred & target).sum(dims)
    return torch.stack([tp, fp, fn]).float()
