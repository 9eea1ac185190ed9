"""Losses: soft Dice, cross-entropy (plain, weighted, top-k), their compounds and the deep-supervision wrapper.

Each loss registers itself under a key (``soft_dice``, ``ce``, ``topk_ce``, ``dice_ce``, ``dice_bce``,
``deep_supervision``) when its module is imported; build one with ``registry.build("losses", key, **kwargs)``.
"""

from __future__ import annotations

from decathlete.losses.ce import CrossEntropyLoss, TopKCrossEntropyLoss
from decathlete.losses.compound import DiceBCELoss, DiceCELoss
from decathlete.losses.deep_supervision import DeepSupervisionLoss, downsample_target, ds_factors, ds_weights
from decathlete.losses.dice import SoftDiceLoss

__all__ = [
    "CrossEntropyLoss",
    "DeepSupervisionLoss",
    "DiceBCELoss",
    "DiceCELoss",
    "SoftDiceLoss",
    "TopKCrossEntropyLoss",
    "downsample_target",
    "ds_factors",
    "ds_weights",
]
