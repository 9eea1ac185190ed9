"""Per-epoch validation on patches drawn for the epoch: loss, nnU-Net's pseudo-Dice (tp/fp/fn summed over all the
epoch's patches and ranks, so one Dice per class over the whole validation draw, not a mean over batches) and the
confusion matrix of the argmax (van den Hork 2019's report)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from decathlete.train.batches import ValidationBatches
from decathlete.train.distributed import World, all_reduce_sum
from decathlete.train.step import TrainStep


class Validation(NamedTuple):
    """One epoch's validation: mean loss, pooled Dice per class (or region), confusion counts (rows reference,
    columns predicted; None for regions)."""

    loss: float
    dice: list[float]
    confusion: list[list[int]] | None


@torch.no_grad()
def validate(net: torch.nn.Module, step: TrainStep, batches: ValidationBatches, dev: torch.device,
             world: World, epoch: int, progress: bool = False) -> Validation:
    """Validate ``net`` (put in eval mode) on epoch ``epoch``'s validation patches; ``progress``: a bar over the
    batches (the caller passes it on rank 0 only)."""
    net.eval()
    counts, confusion, loss_sum, n = None, None, torch.zeros((), device=dev), 0
    # 50 batches of large patches take minutes: without a bar the run looks stuck after the epoch's bar. Not kept.
    bar = tqdm(batches.iterate(dev, epoch), total=batches.n_batches, desc=f"validation {epoch}", unit="batch",
               leave=False, disable=not progress)
    for image, label in bar:
        loss, logits = step.evaluate(image, label)
        label = label[:, :1]  # a cascade stage's second channel is its input (the previous stage's labels)
        loss_sum += loss
        batch_counts = step.labels.pseudo_dice_counts(logits, label)
        counts = batch_counts if counts is None else counts + batch_counts
        batch_confusion = step.labels.confusion_counts(logits, label)
        if batch_confusion is not None:
            confusion = batch_confusion if confusion is None else confusion + batch_confusion
        n += 1
    parts = [counts.flatten(), loss_sum.view(1), torch.tensor([float(n)], device=dev)]
    stats = all_reduce_sum(torch.cat(parts + ([] if confusion is None else [confusion.flatten()])), world)
    k = counts.shape[1]
    tp, fp, fn = stats[:3 * k].view(3, -1)
    dice = (2 * tp / (2 * tp + fp + fn).clamp_min(1e-8)).tolist()
    matrix = None if confusion is None else stats[3 * k + 2:].view(confusion.shape).round().long().tolist()
    return Validation(float(stats[3 * k] / stats[3 * k + 1].clamp_min(1)), dice, matrix)
