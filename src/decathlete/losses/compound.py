"""Compound losses: Dice + cross-entropy for label maps, Dice + binary cross-entropy for regions.

Both are nnU-Net's defaults (Isensee et al. 2021, https://doi.org/10.1038/s41592-020-01008-z): ``DC_and_CE_loss``
for softmax outputs and ``DC_and_BCE_loss`` for region-based (sigmoid) training, weighted 1:1. A term whose weight
is 0 is not computed at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from decathlete.losses.ce import CrossEntropyLoss, TopKCrossEntropyLoss
from decathlete.losses.dice import SoftDiceLoss, split_labels
from decathlete.registry import register_loss


@register_loss("dice_ce")
class DiceCELoss(nn.Module):
    """``weight_ce * CE + weight_dice * SoftDice`` on a label map; nnU-Net's DC_and_CE_loss.

    The Dice term is negative (see `SoftDiceLoss`), so a perfect prediction scores ``-weight_dice``.

    Args:
        weight_ce: weight of the cross-entropy term.
        weight_dice: weight of the soft Dice term.
        batch_dice: Dice over the whole batch instead of per sample.
        include_background: keep class 0 in the Dice mean (nnU-Net: False).
        smooth: Dice smoothing (nnU-Net: 1e-5).
        ignore_index: label of voxels left out of both terms, or None (then negative labels are background).
        weight: optional CE class weights, one per class.
        topk: when set, the CE term is the top-k CE over this percentage of voxels (nnU-Net's DC_and_topk_loss).
        ddp: batch Dice over every DDP rank's batch (`SoftDiceLoss`); set by the framework.
    """

    def __init__(
        self,
        weight_ce: float = 1.0,
        weight_dice: float = 1.0,
        batch_dice: bool = False,
        include_background: bool = False,
        smooth: float = 1e-5,
        ignore_index: int | None = None,
        weight: Sequence[float] | None = None,
        topk: float | None = None,
        ddp: bool = False,
    ) -> None:
        super().__init__()
        self.weight_ce, self.weight_dice, self.ignore_index = weight_ce, weight_dice, ignore_index
        self.dice = SoftDiceLoss("softmax", batch_dice, include_background, smooth, ignore_index, ddp)
        self.ce = (
            CrossEntropyLoss(weight, ignore_index) if topk is None else TopKCrossEntropyLoss(topk, weight, ignore_index)
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss for logits ``(B, C, *spatial)`` and a label map ``(B, 1, *spatial)``; a scalar tensor."""
        labels, valid = split_labels(target, logits.ndim, self.ignore_index)  # once, for both terms
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.weight_dice != 0:
            loss = loss + self.weight_dice * self.dice.forward_labels(logits, labels, valid)
        if self.weight_ce != 0:
            loss = loss + self.weight_ce * self.ce.forward_labels(logits, labels, valid)
        return loss


@register_loss("dice_bce")
class DiceBCELoss(nn.Module):
    """``weight_ce * BCEWithLogits + weight_dice * sigmoid SoftDice`` for region-based training; nnU-Net's
    DC_and_BCE_loss.

    The target is ``(B, R, *spatial)``, one binary mask per region, the logits' shape. Ignored voxels are marked by
    the *value* ``ignore_index`` (e.g. -1) in the target, not by nnU-Net's extra last channel: the target then keeps
    the logits' shape, and each region channel can be ignored on its own. Ignored elements count in neither term.

    Args:
        weight_ce: weight of the binary cross-entropy term.
        weight_dice: weight of the soft Dice term (every channel counts; there is no background channel).
        batch_dice: Dice over the whole batch instead of per sample.
        smooth: Dice smoothing (nnU-Net: 1e-5).
        ignore_index: target value of ignored elements, or None (then the target must lie in [0, 1]).
        ddp: batch Dice over every DDP rank's batch (`SoftDiceLoss`); set by the framework.
    """

    def __init__(
        self,
        weight_ce: float = 1.0,
        weight_dice: float = 1.0,
        batch_dice: bool = False,
        smooth: float = 1e-5,
        ignore_index: float | None = None,
        ddp: bool = False,
    ) -> None:
        super().__init__()
        self.weight_ce, self.weight_dice, self.ignore_index = weight_ce, weight_dice, ignore_index
        self.dice = SoftDiceLoss("sigmoid", batch_dice, True, smooth, ignore_index, ddp)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss for logits and region masks, both ``(B, R, *spatial)``; a scalar tensor."""
        if target.shape != logits.shape:
            raise ValueError(f"region target {tuple(target.shape)} must have the logits' shape {tuple(logits.shape)}")
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.weight_dice != 0:
            loss = loss + self.weight_dice * self.dice(logits, target)
        if self.weight_ce != 0:
            loss = loss + self.weight_ce * self._bce(logits, target)
        return loss

    def _bce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # float32 at least: a float16 sum of the weights overflows at 65504 elements
        dtype = torch.promote_types(logits.dtype, torch.float32)
        target = target.to(dtype)
        if self.ignore_index is None:
            return F.binary_cross_entropy_with_logits(logits.to(dtype), target)
        valid = (target != self.ignore_index).to(dtype)
        # ignored elements get weight 0, whatever their target value; the mean runs over the counted elements only
        # (nnU-Net divides the channel-summed loss by the counted voxels, which scales it by the region count)
        total = F.binary_cross_entropy_with_logits(logits.to(dtype), target, weight=valid, reduction="sum")
        return total / valid.sum().clamp(min=1.0)
