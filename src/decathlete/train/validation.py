"""Per-epoch validation on patches drawn for the epoch: loss and nnU-Net's pseudo-Dice (tp/fp/fn summed over
patches and ranks)."""

from __future__ import annotations

import torch

from decathlete.train.batches import ValidationBatches
from decathlete.train.distributed import World, all_reduce_sum
from decathlete.train.step import TrainStep


@torch.no_grad()
def validate(net: torch.nn.Module, step: TrainStep, batches: ValidationBatches, dev: torch.device,
             world: World, epoch: int) -> tuple[float, list[float]]:
    """Mean validation loss and per-class (or per-region) pseudo-Dice of ``net`` (put in eval mode) on epoch
    ``epoch``'s validation patches."""
    net.eval()
    counts, loss_sum, n = None, torch.zeros((), device=dev), 0
    for image, label in batches.iterate(dev, epoch):
        loss, logits = step.evaluate(image, label)
        loss_sum += loss
        batch_counts = step.labels.pseudo_dice_counts(logits, label)
        counts = batch_counts if counts is None else counts + batch_counts
        n += 1
    stats = all_reduce_sum(torch.cat([counts.flatten(), loss_sum.view(1), torch.tensor([float(n)], device=dev)]),
                           world)
    tp, fp, fn = stats[:-2].view(3, -1)
    dice = (2 * tp / (2 * tp + fp + fn).clamp_min(1e-8)).tolist()
    return float(stats[-2] / stats[-1].clamp_min(1)), dice
