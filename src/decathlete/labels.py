"""What the network's outputs mean: one class per label value (softmax), or one nested region per output (sigmoid).

nnU-Net's region-based training (Isensee et al. 2021, https://doi.org/10.1038/s41592-020-01008-z) trains one sigmoid
output per region (BraTS: whole tumour = {1, 2, 3}, tumour core = {2, 3}, enhancing = {3}) and paints the label
map back in ``regions_class_order``, later regions over earlier ones. Regions come from an nnU-Net dataset.json or
from a recipe (``Recipe.regions``), which the planner writes into plans.json; everything downstream (targets,
pseudo-Dice, the loss's nonlinearity, inference painting, scoring) asks this one object.

nnU-Net v2's ignore label (sparse annotations): a dataset.json label named ``"ignore"``, the largest value, marks
unannotated voxels. It is no class: the network has no output for it, `targets` marks its voxels with
`IGNORE_TARGET` (the ``ignore_index`` `decathlete.losses.base.LossContext.logits_loss` hands the loss), and
pseudo-Dice and scoring leave them out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_NAME = "ignore"
IGNORE_TARGET = -1  # target value of ignored voxels: below every class index and outside the {0, 1} of region masks


@dataclass(frozen=True)
class LabelScheme:
    """Label values of the dataset and, for region-based training, the regions.

    Attributes:
        label_values: every class value of the dataset, background 0 first (the ignore label is no class).
        label_names: value -> name for the label values.
        regions: region name -> label values it unites, in output order; None for softmax classes.
        regions_class_order: per region, the label painted where it is predicted; None for softmax classes.
        ignore_label: the value of unannotated voxels (dataset.json's ``"ignore"``), or None.
    """

    label_values: tuple[int, ...]
    label_names: Mapping[int, str]
    regions: Mapping[str, tuple[int, ...]] | None = None
    regions_class_order: tuple[int, ...] | None = None
    ignore_label: int | None = None

    @classmethod
    def from_dataset(cls, dataset: Mapping[str, Any]) -> LabelScheme:
        """From the ``dataset`` part of plans.json (``label_values``, ``labels``, ``regions``, ...)."""
        labels = dict(dataset.get("labels") or {})
        ignore = labels.pop(IGNORE_NAME, None)
        ignore = int(ignore) if isinstance(ignore, int) else None  # a list is refused by validation
        names = {int(v): str(k) for k, v in labels.items() if not isinstance(v, list)}
        regions = {str(k): tuple(int(x) for x in v) for k, v in (dataset.get("regions") or {}).items()
                   if k != IGNORE_NAME}
        order = dataset.get("regions_class_order")
        return cls(tuple(int(v) for v in dataset["label_values"] if int(v) != ignore), names, regions or None,
                   None if not regions or order is None else tuple(int(x) for x in order), ignore)

    @property
    def region_based(self) -> bool:
        return bool(self.regions)

    @property
    def num_outputs(self) -> int:
        """Network output channels: one per region, else one per label value."""
        return len(self.regions) if self.regions else len(self.label_values)

    @property
    def loss_ignore_index(self) -> int | None:
        """The target value the loss must leave out (`targets` marks ignored voxels with it), or None."""
        return None if self.ignore_label is None else IGNORE_TARGET

    @property
    def nonlinearity(self) -> str:
        return "sigmoid" if self.region_based else "softmax"

    @property
    def output_values(self) -> list[int]:
        """The label each output channel paints: ``regions_class_order``, or the label values."""
        return list(self.regions_class_order if self.region_based else self.label_values)

    @property
    def foreground_values(self) -> list[int]:
        """The label values other than background (0), in order: what a cascade's one-hot input channels stand for."""
        return [v for v in self.label_values if v != 0]

    def evaluation_labels(self) -> dict[str, int | list[int]]:
        """What `decathlete.evaluate` scores: every region, or every foreground label, by name (never the ignore
        label, which `evaluate` gets separately to leave its voxels out)."""
        if self.regions:
            return {name: list(values) for name, values in self.regions.items()}
        return {self.label_names.get(v, str(v)): v for v in self.label_values if v != 0}

    def targets(self, label: torch.Tensor) -> torch.Tensor:
        """Training targets from a ``(B, 1, ...)`` label map: "outside" (-1) becomes background, as in nnU-Net; for
        region-based data one binary float mask per region, ``(B, R, ...)``. Voxels of the ignore label hold
        `IGNORE_TARGET` (in every region), which `loss_ignore_index` tells the loss to leave out."""
        label = label.long()
        ignored = None if self.ignore_label is None else label == self.ignore_label
        label = label.clamp_min(0)
        if self.regions:
            masks = [torch.isin(label, torch.as_tensor(v, device=label.device)) for v in self.regions.values()]
            label = torch.cat(masks, dim=1).float()
        # -1 rather than the ignore value: `split_labels` turns only negative labels into a valid class index, and
        # the ignore value (one past the last class) would index past the losses' one-hot.
        return label if ignored is None else label.masked_fill(ignored, IGNORE_TARGET)

    @torch.no_grad()
    def pseudo_dice_counts(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Per foreground class (or region): ``(3, K)`` true positives, false positives, false negatives.

        Voxels labelled -1 ("outside") or with the ignore label count nowhere. Predictions are the argmax (softmax)
        or > 0.5 (regions).
        """
        valid = label >= 0
        if self.ignore_label is not None:
            valid &= label != self.ignore_label
        if self.regions:
            target = self.targets(label) > 0
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

    @torch.no_grad()
    def confusion_counts(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor | None:
        """``(K, K)`` voxel counts, rows the reference class, columns the predicted one (argmax), over the counted
        voxels (as `pseudo_dice_counts`); None for sigmoid regions, which overlap and have no single class."""
        if self.regions:
            return None
        valid = (label >= 0) if self.ignore_label is None else (label >= 0) & (label != self.ignore_label)
        k = logits.shape[1]
        pairs = label.long().clamp(0, k - 1) * k + logits.argmax(1, keepdim=True)
        return torch.bincount(pairs[valid], minlength=k * k).view(k, k).float()

    def activate_(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities from logits ``(K, ...)`` in place: softmax over axis 0, or a sigmoid per region."""
        if self.region_based:
            return logits.sigmoid_()
        logits -= logits.amax(0, keepdim=True)
        logits.exp_()
        return logits.div_(logits.sum(0, keepdim=True))


def check_regions(regions: Mapping[str, Sequence[int]], class_order: Sequence[int],
                  label_values: Sequence[int]) -> list[str]:
    """Problems of a region definition against the dataset's label values (empty when it is fine)."""
    problems = []
    if len(class_order) != len(regions):
        problems.append(f"regions_class_order has {len(class_order)} entries for {len(regions)} regions")
    known = set(int(v) for v in label_values)
    for (name, values), painted in zip(regions.items(), class_order):
        unknown = sorted(set(int(v) for v in values) - known)
        if unknown or not values or 0 in values:
            problems.append(f"region '{name}' {list(values)}: needs foreground label values of the dataset "
                            f"({sorted(known - {0})})")
        if int(painted) not in values:
            problems.append(f"region '{name}' paints label {painted}, which it does not contain")
    return problems
