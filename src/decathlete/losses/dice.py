"""Soft Dice loss on softmax (label maps) or sigmoid (regions) probabilities, as nnU-Net's MemoryEfficientSoftDiceLoss.

nnU-Net (Isensee et al. 2021, https://doi.org/10.1038/s41592-020-01008-z) computes, per sample and class (or per
class over the whole batch with ``batch_dice``)::

    dc = (2 * tp + smooth) / clip(2 * tp + fp + fn + smooth, 1e-8)       loss = -mean(dc)

so a perfect prediction gives -1, not 0; only the gradient matters to the optimiser, and keeping nnU-Net's sign keeps
logged loss curves comparable with its own.

Targets come in two forms:

* a label map ``(B, 1, *spatial)`` (or ``(B, *spatial)``) of integer classes, turned into a bool one-hot
  (1 byte per element; see `one_hot_reference` for why not something leaner).
* a dense tensor of the logits' shape: one-hot or region masks (region-based training, sigmoid outputs).

Ignoring voxels: with a label map, voxels equal to ``ignore_index`` are left out of every sum. Without an
``ignore_index``, negative labels (the ``-1`` that preprocessing writes outside the nonzero mask) count as background,
which is what nnU-Net does (its ``RemoveLabelTransform(-1, 0)``). With a dense target, elements equal to
``ignore_index`` (e.g. ``-1``) are left out, each channel on its own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn

from decathlete.registry import register_loss

NONLINEARITIES = ("softmax", "sigmoid", None)


def split_labels(
    target: torch.Tensor, logits_ndim: int, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Turn a label-map target into class indices plus a mask of the voxels that count.

    Args:
        target: integer label map ``(B, 1, *spatial)`` or ``(B, *spatial)``.
        logits_ndim: number of dimensions of the logits ``(B, C, *spatial)``.
        ignore_index: label of voxels to leave out, or None.

    Returns:
        ``labels``: int64 ``(B, *spatial)``, every entry a valid class index (ignored and other negative labels are
        set to 0, so they can index a one-hot); ``valid``: bool ``(B, *spatial)``, or None when ``ignore_index`` is
        None (then every voxel counts).

    Raises:
        ValueError: when the target's shape cannot be a label map for these logits.
    """
    if target.ndim == logits_ndim:
        if target.shape[1] != 1:
            raise ValueError(f"a label-map target needs one channel, got shape {tuple(target.shape)}")
        target = target[:, 0]
    elif target.ndim != logits_ndim - 1:
        raise ValueError(f"target of shape {tuple(target.shape)} does not fit logits with {logits_ndim} dimensions")
    valid = None if ignore_index is None else target != ignore_index
    # clamp: the "outside" label -1 is background unless ignored; ignored voxels get 0, masked out by ``valid``.
    labels = target.long().clamp(min=0)
    if valid is not None:
        labels = labels.masked_fill(~valid, 0)  # an ignore value >= the class count must not index the one-hot
    return labels, valid


def probabilities(logits: torch.Tensor, nonlin: str | None) -> torch.Tensor:
    """Softmax over channels, element-wise sigmoid, or the input itself, in float32 at least (float64 stays).

    Never in half precision: the Dice sums run over millions of voxels and float16 (autocast) overflows at 65504.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    if nonlin == "softmax":
        return torch.softmax(logits, 1, dtype=dtype)
    x = logits.to(dtype)
    if nonlin == "sigmoid":
        # in place on the float32 copy when ``.to`` made one, to avoid a second full-size buffer
        return x.sigmoid_() if x is not logits else torch.sigmoid(x)
    if nonlin is not None:
        raise ValueError(f"apply_nonlin must be one of {NONLINEARITIES}, got {nonlin!r}")
    return x


def one_hot_reference(labels: torch.Tensor, valid: torch.Tensor | None, n_classes: int) -> torch.Tensor:
    """Bool one-hot ``(B, C, *spatial)`` of a label map, all False at voxels that are not ``valid``.

    Bool (1 byte per element) and built with ``scatter_``, as nnU-Net does. A one-hot-free alternative (gather the
    true-class probability, ``scatter_add`` it per class) had the same peak memory on an H100 (the backward pass
    dominates) but ran 1.6-8x slower (C = 14 to 3): millions of atomic adds into C bins.
    """
    shape = (labels.shape[0], n_classes, *labels.shape[1:])
    ref = torch.zeros(shape, dtype=torch.bool, device=labels.device).scatter_(1, labels[:, None], True)
    if valid is not None:
        ref &= valid[:, None]
    return ref


def dice_stats(
    probs: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel ``tp``, predicted volume and reference volume, each ``(B, C)``.

    Args:
        probs: ``(B, C, *spatial)`` float probabilities.
        ref: ``(B, C, *spatial)`` bool one-hot or region masks, already 0 wherever not ``valid``.
        valid: bool mask broadcastable to ``probs`` (``(B, 1, ...)`` or ``(B, C, ...)``), or None for all.
    """
    axes = tuple(range(2, probs.ndim))
    if ref.is_floating_point():
        ref = ref.to(probs.dtype)
    tp = (probs * ref).sum(axes)  # ref is 0 where ignored, so ignored probabilities add nothing
    volume_pred = probs.sum(axes) if valid is None else (probs * valid).sum(axes)
    with torch.no_grad():
        volume_ref = ref.sum(axes, dtype=probs.dtype)
    return tp, volume_pred, volume_ref


def overlap_stats(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None, nonlin: str | None,
    include_background: bool, ignore_index: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dice_stats` of ``logits`` against a dense target (one-hot or regions, of the logits' shape; elements equal to
    ``ignore_index`` count nowhere) or a label map already split by `split_labels` (``valid`` its mask), channel 0
    left out unless ``include_background`` or sigmoid outputs. Shared by every overlap loss (Dice, IoU, generalised
    Dice)."""
    probs = probabilities(logits, nonlin)
    if target.shape == logits.shape:  # dense: one-hot or regions, ignored elements hold ``ignore_index``
        if ignore_index is not None:
            valid = target != ignore_index
            target = target.masked_fill(~valid, 0)
        ref = target
    else:
        ref = one_hot_reference(target, valid, logits.shape[1])
        valid = None if valid is None else valid[:, None]
    if not include_background and nonlin != "sigmoid":
        probs, ref = probs[:, 1:], ref[:, 1:]
        valid = valid if valid is None or valid.shape[1] == 1 else valid[:, 1:]
    return dice_stats(probs, ref, valid)


def sum_over_ranks(*stats: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor summed over the DDP ranks, with gradients (a no-op outside a process group of several ranks).

    The backward pass sums every rank's gradient of the global sums, as nnU-Net's all-gather of tp/fp/fn does: each
    rank's loss is the global batch Dice, and DDP's gradient average over ranks then gives exactly the gradient of
    one process training on the whole global batch.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return stats
    return tuple(dist_nn.all_reduce(s.contiguous(), op=dist.ReduceOp.SUM) for s in stats)


def soft_dice(
    tp: torch.Tensor, volume_pred: torch.Tensor, volume_ref: torch.Tensor, *, batch_dice: bool, smooth: float,
    ddp: bool = False,
) -> torch.Tensor:
    """nnU-Net's negative mean soft Dice from ``(B, C)`` statistics (already stripped of background if wanted).

    With ``batch_dice`` and ``ddp`` the batch sums cover the global batch: every rank's statistics are summed.
    """
    if batch_dice:
        tp, volume_pred, volume_ref = tp.sum(0), volume_pred.sum(0), volume_ref.sum(0)
        if ddp:
            tp, volume_pred, volume_ref = sum_over_ranks(tp, volume_pred, volume_ref)
    # volume_pred + volume_ref = 2 tp + fp + fn
    dc = (2 * tp + smooth) / torch.clip(volume_pred + volume_ref + smooth, min=1e-8)
    return -dc.mean()


@register_loss("soft_dice")
class SoftDiceLoss(nn.Module):
    """Soft Dice loss, returned as **negative** mean Dice (nnU-Net's convention: -1 for a perfect prediction).

    nnU-Net's MemoryEfficientSoftDiceLoss (https://doi.org/10.1038/s41592-020-01008-z); see the module docstring for
    the formula, the target forms and the handling of ignored voxels.

    Args:
        apply_nonlin: ``"softmax"`` (label maps), ``"sigmoid"`` (regions) or None (the input already holds
            probabilities).
        batch_dice: sum tp/fp/fn over the batch before the ratio (nnU-Net's ``batch_dice``) instead of averaging
            per-sample Dice scores.
        ddp: with ``batch_dice``, sum over every DDP rank's batch too (the framework sets it for runs of several
            ranks), so the Dice is the global batch's as in nnU-Net; without a process group it changes nothing.
        include_background: keep channel 0 in the mean. Ignored with ``"sigmoid"``, where every channel is a region.
        smooth: added to numerator and denominator (nnU-Net: 1e-5).
        ignore_index: label (label map) or value (dense target) of voxels that count nowhere, or None.
    """

    def __init__(
        self,
        apply_nonlin: str | None = "softmax",
        batch_dice: bool = False,
        include_background: bool = False,
        smooth: float = 1e-5,
        ignore_index: int | None = None,
        ddp: bool = False,
    ) -> None:
        super().__init__()
        if apply_nonlin not in NONLINEARITIES:
            raise ValueError(f"apply_nonlin must be one of {NONLINEARITIES}, got {apply_nonlin!r}")
        self.apply_nonlin = apply_nonlin
        self.batch_dice = batch_dice
        self.include_background = include_background
        self.smooth = smooth
        self.ignore_index = ignore_index
        self.ddp = ddp

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss for ``logits`` ``(B, C, *spatial)`` and a label-map or dense ``target``; a scalar tensor."""
        if target.shape == logits.shape:
            return self._loss(logits, target, None)
        labels, valid = split_labels(target, logits.ndim, self.ignore_index)
        return self._loss(logits, labels, valid)

    def forward_labels(self, logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Loss for a label map already split by `split_labels` (lets compound losses split it once)."""
        return self._loss(logits, labels, valid)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        # autocast off: the sums must stay in float32 at least, see ``probabilities``
        with torch.autocast(logits.device.type, enabled=False):
            stats = overlap_stats(logits, target, valid, self.apply_nonlin, self.include_background, self.ignore_index)
            return soft_dice(*stats, batch_dice=self.batch_dice, smooth=self.smooth, ddp=self.ddp)
