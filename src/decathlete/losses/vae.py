"""Myronenko 2018's losses (https://arxiv.org/abs/1810.11654): a soft Dice with squared terms in the denominator,
summed over the outputs, and the VAE-regularised training loss ``L = L_dice + 0.1 * L_L2 + 0.1 * L_KL``.

Where the paper leaves a choice open:

* Dice: ``1 - (2 * sum(p * t) + eps) / (sum(p^2) + sum(t^2) + eps)`` per output channel and sample, summed over the
  channels (the paper "simply adds" the three region losses), averaged over the batch. The paper puts ``eps`` in the
  denominator only; we add it to the numerator too (MONAI's ``smooth_nr``), so that a crop without a region scores an
  empty prediction 1 instead of every prediction 0 and false positives there still get a gradient. The paper's crops
  hold most of the brain, where this never arises; the budget's smaller crops often miss the enhancing tumour.
* ``L_L2``: the squared error between the input and the reconstruction, averaged over voxels and channels (the
  paper writes the plain squared norm; a sum over ~4e6 voxels would drown the Dice term that 0.1 is balanced with).
* ``L_KL``: ``(1/N) * sum(mu^2 + sigma^2 - log sigma^2 - 1)`` over the latent dimensions with ``N`` the voxels of
  one input crop, as the paper writes it, averaged over the batch (the paper trains with batch 1).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from decathlete.losses.base import LossContext, TrainingBatch, TrainingLoss
from decathlete.losses.dice import probabilities
from decathlete.nets.base import NetOutput
from decathlete.registry import register_loss


@register_loss("squared_dice")
class SquaredDiceLoss(nn.Module):
    """The paper's soft Dice (squared denominator) per output channel, summed over channels, mean over the batch.

    Args:
        region_based: sigmoid outputs with one binary mask per channel (set by the framework); otherwise softmax
            classes with a label-map target, background left out unless ``include_background``.
        include_background: keep class 0 of softmax outputs.
        smooth: ``eps`` of the module docstring.
        ignore_index: target value of voxels that count nowhere (set by the framework for an ignore label).
    """

    def __init__(self, region_based: bool = True, include_background: bool = False, smooth: float = 1e-5,
                 ignore_index: int | None = None) -> None:
        super().__init__()
        self.region_based, self.include_background = region_based, include_background
        self.smooth, self.ignore_index = smooth, ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(logits.device.type, enabled=False):
            probs = probabilities(logits, "sigmoid" if self.region_based else "softmax")
            valid = None if self.ignore_index is None else (target != self.ignore_index)
            if self.region_based:
                ref = target.float()
            else:
                classes = torch.arange(logits.shape[1], device=logits.device).view(1, -1, *[1] * (logits.ndim - 2))
                ref = (target.long() == classes).float()
                if not self.include_background:
                    probs, ref = probs[:, 1:], ref[:, 1:]
            if valid is not None:
                probs, ref = probs * valid, ref * valid
            axes = tuple(range(2, probs.ndim))
            numerator = 2 * (probs * ref).sum(axes) + self.smooth
            denominator = (probs * probs).sum(axes) + (ref * ref).sum(axes) + self.smooth
            return (1 - numerator / denominator).sum(1).mean()


def kl_divergence(mean: torch.Tensor, log_variance: torch.Tensor, voxels: int) -> torch.Tensor:
    """The paper's KL term: ``sum(mu^2 + sigma^2 - log sigma^2 - 1) / N`` per sample, mean over the batch."""
    terms = mean.float() ** 2 + log_variance.float().exp() - log_variance.float() - 1
    return terms.sum(1).mean() / voxels


@register_loss("dice_vae")
class DiceVAELoss(TrainingLoss):
    """``L_dice + weight_l2 * L_L2 + weight_kl * L_KL`` (the paper's weights 0.1 and 0.1), see the module docstring.

    Without the network's VAE outputs (validation, in eval mode) only the Dice term is computed.

    Args:
        weight_l2: weight of the reconstruction error.
        weight_kl: weight of the KL divergence.
        smooth: the Dice's ``eps``.
        context: the run (set by the framework).
    """

    def __init__(self, weight_l2: float = 0.1, weight_kl: float = 0.1, smooth: float = 1e-5, *,
                 context: LossContext) -> None:
        super().__init__()
        self.weight_l2, self.weight_kl = weight_l2, weight_kl
        self.dice = context.logits_loss("squared_dice", {"smooth": smooth})

    def forward(self, output: NetOutput, batch: TrainingBatch) -> torch.Tensor:
        loss = self.dice(output, batch)
        if "reconstruction" not in output.aux:
            return loss
        image = batch.image.float()
        reconstruction = output.aux["reconstruction"].float()
        l2 = torch.mean((reconstruction - image) ** 2)
        kl = kl_divergence(output.aux["mean"], output.aux["log_variance"], math.prod(image.shape[2:]))
        return loss + self.weight_l2 * l2 + self.weight_kl * kl
