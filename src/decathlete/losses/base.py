"""The training-loss protocol: the training step calls ``loss(output, batch)`` and nothing else.

``output`` is the network's `decathlete.nets.base.NetOutput` (logits, a tensor or the deep-supervision list, plus a
dict of auxiliary tensors) and ``batch`` a `TrainingBatch` (the augmented image, its label map and the targets on
every output's grid). A recipe's ``loss`` names one of two kinds of registered loss:

* a loss on logits, ``loss(logits, target)`` (``dice_ce``, ``ce``, ``topk_ce`` ...): the framework applies it to
  every deep-supervision output with nnU-Net's weights (`LossContext.logits_loss`); one whose constructor takes
  ``region_based`` is told whether the outputs are sigmoid regions (the target is then region masks, not a map),
  and one that takes ``ddp`` whether the run has several DDP ranks;
* a `TrainingLoss` subclass, built with the recipe's kwargs plus ``context`` (a `LossContext`), which sees the whole
  output and batch: a reconstruction or KL term of a VAE branch, or a term on the input image, needs no change of
  the loop. It composes the segmentation part with ``context.logits_loss(...)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from decathlete.labels import LabelScheme
from decathlete.losses.deep_supervision import DeepSupervisionLoss
from decathlete.nets.base import NetOutput
from decathlete.registry import get


@dataclass
class TrainingBatch:
    """One augmented training (or validation) batch as the loss sees it.

    Attributes:
        image: network input ``(B, C, *patch)``.
        label: label map ``(B, 1, *patch)``, -1 outside the image.
        targets: per deep-supervision output, the target on its grid, full resolution first (`LabelScheme.targets`,
            downsampled): int64 label maps, or float region masks for region-based training.
    """

    image: torch.Tensor
    label: torch.Tensor
    targets: list[torch.Tensor]


class TrainingLoss(nn.Module):
    """Base of losses called as ``loss(output, batch) -> scalar`` (see the module docstring)."""

    def forward(self, output: NetOutput, batch: TrainingBatch) -> torch.Tensor:  # pragma: no cover - protocol
        raise NotImplementedError


class LogitsLoss(TrainingLoss):
    """A loss on ``(logits, target)`` over every deep-supervision output (weighted) and the batch's targets."""

    def __init__(self, loss: nn.Module, weights: Sequence[float]) -> None:
        super().__init__()
        self.deep_supervision = DeepSupervisionLoss(loss, weights)

    def forward(self, output: NetOutput, batch: TrainingBatch) -> torch.Tensor:
        return self.deep_supervision(output.logits, batch.targets)


@dataclass(frozen=True)
class LossContext:
    """What a loss may need to know about the run.

    Attributes:
        labels: the outputs' meaning (softmax classes or sigmoid regions).
        deep_supervision_weights: one weight per network output, full resolution first.
        batch_dice: the plan's choice of Dice over the batch, the default of Dice-based logits losses.
        class_voxels: voxels of each label value in the training data (the fingerprint's), for frequency weights;
            empty for plans made before it was recorded.
        distributed: the run has several DDP ranks (a batch Dice then sums over all of them).
    """

    labels: LabelScheme
    deep_supervision_weights: list[float]
    batch_dice: bool
    class_voxels: dict[int, int] = field(default_factory=dict)
    distributed: bool = False

    def class_weights(self, rule: str) -> list[float]:
        """One weight per softmax output from the training data's label frequencies (``class_voxels``), for a loss's
        ``weight`` given by name: ``inverse_frequency`` = background voxels / class voxels (background 1; a class 50
        times rarer, 50). A class absent from the training data gets the largest weight of the others.

        Raises:
            ValueError: an unknown rule, sigmoid regions (no classes to weigh), or plans without label frequencies.
        """
        if rule != "inverse_frequency":
            raise ValueError(f"a loss weight given by name must be 'inverse_frequency' (or a list), got {rule!r}")
        if self.labels.region_based:
            raise ValueError("class weights need softmax classes; this run trains sigmoid regions")
        counts = [self.class_voxels.get(int(v), 0) for v in self.labels.output_values]
        if not self.class_voxels or counts[0] <= 0:
            raise ValueError("the plans record no label frequencies (class_voxels): plan the dataset again, or give "
                             "the weights as a list, e.g. --set 'loss.weight=[1, 10, 50]'")
        weights = [counts[0] / c if c > 0 else 0.0 for c in counts]
        return [w if w > 0 else max(weights) for w in weights]

    def logits_loss(self, name: str, kwargs: dict[str, Any] | None = None) -> LogitsLoss:
        """The registered logits loss ``name`` for this run, deep-supervised. A ``weight`` given by name (``inverse_
        frequency``) becomes `class_weights`.

        For region-based (sigmoid) outputs, ``dice_ce`` becomes nnU-Net's ``dice_bce`` with the kwargs that apply.
        With an ignore label, a loss that takes ``ignore_index`` leaves the ignored voxels out.
        """
        kwargs = dict(kwargs or {})
        if kwargs.get("weight") == "inverse_frequency":  # other named weights are the loss's own (GDL's "uniform")
            kwargs["weight"] = self.class_weights(kwargs["weight"])
        if self.labels.region_based and name == "dice_ce":
            name, kwargs = "dice_bce", {k: v for k, v in kwargs.items() if k in ("weight_ce", "weight_dice", "smooth")}
        if name in ("dice_ce", "dice_bce"):
            kwargs.setdefault("batch_dice", self.batch_dice)
        loss = get("losses", name)
        parameters = inspect.signature(loss).parameters
        if "region_based" in parameters:
            kwargs.setdefault("region_based", self.labels.region_based)
        if "ddp" in parameters:
            kwargs.setdefault("ddp", self.distributed)
        if self.labels.ignore_label is not None and "ignore_index" in parameters:
            # The targets mark ignored voxels with this value (`LabelScheme.targets`): no other value would work.
            kwargs["ignore_index"] = self.labels.loss_ignore_index
        return LogitsLoss(loss(**kwargs), self.deep_supervision_weights)
