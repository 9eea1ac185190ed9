"""Overlap losses on logits: Avetisian's multi-class IoU (Jaccard) loss and Sudre's generalised Dice loss.

Both turn the logits into probabilities ``p`` (softmax over channels, or an element-wise sigmoid for region-based
training), take the reference ``r`` (one-hot of a label map, or the region masks) and compute per sample and channel
the soft overlap ``I = sum_n r p``, the predicted volume ``P = sum_n p`` and the reference volume ``R = sum_n r``
(`decathlete.losses.dice.dice_stats`). Both are returned as ``1 - score``: **0 for a perfect prediction** (unlike
`SoftDiceLoss`, which keeps nnU-Net's ``-Dice``), so the value reads as a distance.

* **IoU** (Avetisian, "Volumetric Medical Image Segmentation with Deep Convolutional Neural Networks", extending
  Rahman & Wang 2016 to several classes): over the foreground channels (the paper's ``y_{1:}``)::

      IoU = (sum y p + smooth) / (sum y + sum p - sum y p + smooth)        loss = 1 - IoU

  ``reduction="pooled"`` is the paper's formula: the sums run over every foreground channel *and* every voxel, one
  ratio (large classes weigh more). ``reduction="mean"`` averages one IoU per channel instead (every class weighs
  the same). ``batch`` decides whether the batch is summed before the ratio (default, the paper's single ratio) or
  one ratio is taken per sample and the ratios averaged; it applies to both reductions.
* **Generalised Dice** (Sudre et al. 2017, https://arxiv.org/abs/1707.03237)::

      GDL = 1 - (2 sum_l w_l I_l + smooth) / (sum_l w_l (P_l + R_l) + smooth)

  with ``w_l = 1`` (``uniform``, as Rippel et al. 2018 used it), ``1 / R_l`` (``inverse_volume``) or ``1 / R_l^2``
  (``inverse_square``, Sudre's). ``batch=True`` sums over the batch and takes one ratio, else one ratio per sample and
  the mean. The weights of one ratio are normalised to sum to 1. That leaves the score unchanged at ``smooth = 0``
  (a common factor cancels) but keeps ``smooth`` small against the sums: raw inverse-square weights make the sums
  ``~1 / R``, so a 1e-5 smooth would dominate a ratio for classes above ~1e5 voxels.

Ambiguities resolved:

* **Background.** With softmax outputs channel 0 is left out unless ``include_background``; with sigmoid outputs
  (``region_based``) every channel is a foreground region and the flag is ignored.
* **Targets.** ``region_based=True``: dense float region masks of the logits' shape. ``region_based=False``: an
  integer label map ``(B, 1, *spatial)`` or ``(B, *spatial)``; a dense one-hot of the logits' shape is accepted too.
* **Ignored voxels** count nowhere: with a label map, voxels equal to ``ignore_index`` (`split_labels`); with a dense
  target, elements equal to it, each channel on its own (the framework's targets hold -1 there). Without an
  ``ignore_index`` a label -1 ("outside") is background, as everywhere in the framework.
* **Empty classes.** Pooled IoU: a class absent from the reference only adds its predicted volume to the union, so
  predicting it is penalised and nothing divides by zero. Per-channel IoU (``mean``) of an absent class is
  ``smooth / (P + smooth)``: 1 when nothing is predicted, close to 0 as soon as anything is (harsh per sample, the
  behaviour of nnU-Net's per-sample Dice). Generalised Dice: an absent class's inverse weight is infinite; it gets the
  largest finite weight of the ratio's other classes (MONAI's rule) so that its false positives still count, and a
  ratio whose classes are all absent gets weight 1 everywhere. With a fully empty reference both losses are
  ``1 - smooth / (P + smooth)``: about 0 for a near-zero prediction, about 1 for any real one.
* **Precision and DDP.** The sums run in float32 with autocast off (float16 overflows at 65504); with a batch sum and
  ``ddp`` the statistics are summed over every rank first (`sum_over_ranks`), so the ratio is the global batch's.
"""

from __future__ import annotations

import torch
from torch import nn

from decathlete.losses.dice import overlap_stats, split_labels, sum_over_ranks
from decathlete.registry import register_loss

IOU_REDUCTIONS = ("pooled", "mean")
GDL_WEIGHTS = ("uniform", "inverse_volume", "inverse_square")


class _OverlapLoss(nn.Module):
    """Shared target handling: per-sample, per-channel ``(I, P, R)`` of the channels that count."""

    def __init__(self, region_based: bool, ignore_index: int | None, ddp: bool, smooth: float,
                 include_background: bool, batch: bool) -> None:
        super().__init__()
        self.region_based = region_based
        self.ignore_index = ignore_index
        self.ddp = ddp
        self.smooth = smooth
        self.include_background = include_background
        self.batch = batch

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss (a scalar tensor, 0 when perfect) for logits ``(B, C, *spatial)`` and a target (module docstring)."""
        if self.region_based and target.shape != logits.shape:
            raise ValueError(f"region-based training needs region masks of the logits' shape {tuple(logits.shape)}, "
                             f"got {tuple(target.shape)}")
        # autocast off: the sums must stay in float32 at least (`probabilities`)
        with torch.autocast(logits.device.type, enabled=False):
            stats = self._stats(logits, target)
            return self._reduce(*(self._batch_sums(*stats) if self.batch else stats))

    def _stats(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nonlin = "sigmoid" if self.region_based else "softmax"
        valid = None
        if target.shape != logits.shape:
            target, valid = split_labels(target, logits.ndim, self.ignore_index)
        return overlap_stats(logits, target, valid, nonlin, self.include_background, self.ignore_index)

    def _batch_sums(self, *stats: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(B, C)`` statistics summed over the batch (and over DDP ranks with ``ddp``) to ``(C,)``."""
        sums = tuple(s.sum(0) for s in stats)
        return sum_over_ranks(*sums) if self.ddp else sums

    def _reduce(self, tp: torch.Tensor, volume_pred: torch.Tensor, volume_ref: torch.Tensor) -> torch.Tensor:
        """The loss from ``(B, C)`` statistics, or ``(C,)`` ones already summed over the batch."""
        raise NotImplementedError  # pragma: no cover - abstract


@register_loss("iou")
class IoULoss(_OverlapLoss):
    """``1 - IoU`` over the foreground channels, Avetisian's multi-class IoU loss (see the module docstring).

    Args:
        region_based: sigmoid outputs and region-mask targets (set by the framework) instead of softmax and a map.
        ignore_index: label (map) or value (dense target) of voxels that count nowhere, or None.
        ddp: with ``batch``, sum the statistics over every DDP rank (set by the framework).
        smooth: added to intersection and union.
        include_background: keep channel 0 (softmax only).
        reduction: ``pooled`` (one ratio over every foreground channel, the paper's) or ``mean`` (mean of per-channel
            IoUs).
        batch: sum over the batch before the ratio (default) instead of averaging per-sample ratios.
    """

    def __init__(self, region_based: bool = False, ignore_index: int | None = None, ddp: bool = False,
                 smooth: float = 1e-5, include_background: bool = False, reduction: str = "pooled",
                 batch: bool = True) -> None:
        super().__init__(region_based, ignore_index, ddp, smooth, include_background, batch)
        if reduction not in IOU_REDUCTIONS:
            raise ValueError(f"reduction must be one of {IOU_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction

    def _reduce(self, tp: torch.Tensor, volume_pred: torch.Tensor, volume_ref: torch.Tensor) -> torch.Tensor:
        if self.reduction == "pooled":
            tp, volume_pred, volume_ref = tp.sum(-1), volume_pred.sum(-1), volume_ref.sum(-1)
        union = volume_pred + volume_ref - tp
        # clip: with smooth = 0 an empty union would divide by zero; rounding can also push it a hair below 0
        iou = (tp + self.smooth) / torch.clip(union + self.smooth, min=1e-8)
        return 1 - iou.mean()


def generalized_dice_weights(volume_ref: torch.Tensor, weight: str) -> torch.Tensor:
    """Class weights of the generalised Dice from reference volumes ``(..., C)``, normalised to sum 1 over ``C``.

    An absent class (volume 0) gets the largest finite weight of its row, or every class 1 when none is finite.
    """
    if weight not in GDL_WEIGHTS:
        raise ValueError(f"weight must be one of {GDL_WEIGHTS}, got {weight!r}")
    with torch.no_grad():
        if weight == "uniform":
            w = torch.ones_like(volume_ref)
        else:
            w = 1 / (volume_ref if weight == "inverse_volume" else volume_ref**2)
            finite = torch.isfinite(w)
            largest = torch.where(finite, w, torch.zeros_like(w)).amax(-1, keepdim=True)
            largest = torch.where(finite.any(-1, keepdim=True), largest, torch.ones_like(largest))
            w = torch.where(finite, w, largest)
        return w / w.sum(-1, keepdim=True)


@register_loss("generalized_dice")
class GeneralizedDiceLoss(_OverlapLoss):
    """Sudre et al.'s generalised Dice loss ``1 - GDS`` (see the module docstring).

    Args:
        region_based: sigmoid outputs and region-mask targets (set by the framework) instead of softmax and a map.
        ignore_index: label (map) or value (dense target) of voxels that count nowhere, or None.
        ddp: with ``batch``, sum the statistics over every DDP rank (set by the framework).
        smooth: added to numerator and denominator.
        include_background: keep channel 0 (softmax only).
        weight: class weights, ``uniform``, ``inverse_volume`` or ``inverse_square`` (Sudre's).
        batch: one ratio over the whole batch instead of the mean of per-sample ratios.
    """

    def __init__(self, region_based: bool = False, ignore_index: int | None = None, ddp: bool = False,
                 smooth: float = 1e-5, include_background: bool = False, weight: str = "uniform",
                 batch: bool = False) -> None:
        super().__init__(region_based, ignore_index, ddp, smooth, include_background, batch)
        if weight not in GDL_WEIGHTS:
            raise ValueError(f"weight must be one of {GDL_WEIGHTS}, got {weight!r}")
        self.weight = weight

    def _reduce(self, tp: torch.Tensor, volume_pred: torch.Tensor, volume_ref: torch.Tensor) -> torch.Tensor:
        w = generalized_dice_weights(volume_ref, self.weight)
        numerator = 2 * (w * tp).sum(-1) + self.smooth
        denominator = (w * (volume_pred + volume_ref)).sum(-1) + self.smooth
        return 1 - (numerator / torch.clip(denominator, min=1e-8)).mean()
