"""Cross-entropy on label maps: plain, class-weighted and top-k.

Targets are label maps ``(B, 1, *spatial)`` (nnU-Net's convention) or ``(B, *spatial)``; voxels equal to
``ignore_index`` count nowhere, and without an ``ignore_index`` negative labels (the "outside" -1) are background,
as in ``decathlete.losses.dice``.

Class-weighted CE and top-k CE are the two losses of van den Hork et al., "Pancreas cancer segmentation with a 3D
U-Net" (Medical Segmentation Decathlon, 2019), who used weights [1, 10, 50] and k = 5 %; top-k CE is from Nikolov et
al. 2018 (https://arxiv.org/abs/1809.04430) and is nnU-Net's ``TopKLoss`` (k = 10 % by default).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from decathlete.losses.dice import split_labels
from decathlete.registry import register_loss

_IGNORE = -100  # torch's own ignore value, used internally once the caller's ignore_index has become a mask


def voxel_ce(
    logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None, weight: torch.Tensor | None
) -> torch.Tensor:
    """Per-voxel cross-entropy ``(B, *spatial)``: ``weight[y] * -log softmax(x)[y]``, 0 where not ``valid``."""
    target = labels if valid is None else labels.masked_fill(~valid, _IGNORE)
    weight = None if weight is None else weight.to(logits.dtype)
    return F.cross_entropy(logits, target, weight=weight, ignore_index=_IGNORE, reduction="none")


def mean_ce(
    logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None, weight: torch.Tensor | None
) -> torch.Tensor:
    """Cross-entropy averaged as ``F.cross_entropy`` does: divided by the summed class weights of the counted voxels.

    Unlike ``F.cross_entropy``, a batch in which every voxel is ignored gives 0 (and zero gradients), not NaN, and
    that without a host-device synchronisation.
    """
    losses = voxel_ce(logits, labels, valid, weight)
    # sums in float32 at least: float16 overflows at 65504
    dtype = torch.promote_types(losses.dtype, torch.float32)
    with torch.no_grad():
        if weight is None:
            total = losses.new_tensor(losses.numel(), dtype=dtype) if valid is None else valid.sum(dtype=dtype)
        else:
            counted = weight.to(dtype)[labels]
            total = (counted if valid is None else counted * valid).sum()
        total = total.clamp(min=1e-8)
    return losses.sum(dtype=dtype) / total


def _weight_tensor(weight: Sequence[float] | None) -> torch.Tensor | None:
    return None if weight is None else torch.as_tensor(list(weight), dtype=torch.float32)


@register_loss("ce")
class CrossEntropyLoss(nn.Module):
    """Cross-entropy on a label map, optionally class-weighted (van den Hork et al. 2019, see the module docstring).

    Equals ``F.cross_entropy(logits, target[:, 0], weight=weight, ignore_index=ignore_index)`` (mean reduction).

    Args:
        weight: one weight per class (a JSON list), or None. The mean divides by the summed weights of the counted
            voxels, as PyTorch does.
        ignore_index: label of voxels that count nowhere, or None.
    """

    def __init__(self, weight: Sequence[float] | None = None, ignore_index: int | None = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        # a buffer, so that ``.to(device)`` moves it with the module; not saved: it comes from the kwargs
        self.register_buffer("weight", _weight_tensor(weight), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean CE for logits ``(B, C, *spatial)`` and a label map; a scalar tensor."""
        return self.forward_labels(logits, *split_labels(target, logits.ndim, self.ignore_index))

    def forward_labels(self, logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Mean CE for a label map already split by `split_labels`."""
        return mean_ce(logits, labels, valid, self.weight)


@register_loss("topk_ce")
class TopKCrossEntropyLoss(nn.Module):
    """Mean of the ``k`` percent largest per-voxel cross-entropies (Nikolov et al. 2018, nnU-Net's TopKLoss).

    https://arxiv.org/abs/1809.04430; used for the MSD pancreas by van den Hork et al. 2019 (k = 5 %).

    Args:
        k: percentage of the hardest voxels to average, in (0, 100]; nnU-Net's default is 10.
        weight: optional class weights; each voxel's loss is multiplied by its class weight before the selection.
        ignore_index: label of voxels that count nowhere, or None. ``k`` percent is taken of the counted voxels
            (nnU-Net takes it of all voxels, ignored ones included with a loss of 0).
    """

    def __init__(self, k: float = 10.0, weight: Sequence[float] | None = None, ignore_index: int | None = None) -> None:
        super().__init__()
        if not 0 < k <= 100:
            raise ValueError(f"k is a percentage in (0, 100], got {k}")
        self.k = k
        self.ignore_index = ignore_index
        self.register_buffer("weight", _weight_tensor(weight), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Top-k mean CE for logits ``(B, C, *spatial)`` and a label map; a scalar tensor."""
        return self.forward_labels(logits, *split_labels(target, logits.ndim, self.ignore_index))

    def forward_labels(self, logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Top-k mean CE for a label map already split by `split_labels`."""
        losses = voxel_ce(logits, labels, valid, self.weight).reshape(-1)
        # counting the valid voxels synchronises with the device, but only when something can be ignored
        n = losses.numel() if valid is None else int(valid.sum())
        if n == 0:
            return losses.sum() * 0.0
        top, _ = torch.topk(losses, max(1, int(n * self.k / 100)), sorted=False)
        return top.mean()
