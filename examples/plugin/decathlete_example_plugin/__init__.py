"""An example plugin: a recipe with its own network, loss, sampler and tile weighting, registered from outside.

``example_aux`` trains a U-Net with an auxiliary head that reconstructs the input image (a network output the loss
uses, the pattern of a VAE branch), on patches drawn from cases weighted by their foreground size, and predicts with
a pyramid tile weighting::

    PYTHONPATH=examples/plugin decathlete --plugin decathlete_example_plugin plan DATASET -o WORK --recipe example_aux

Every component is one decorated definition; nothing in decathlete is edited. The model folder records the plugin,
so ``predict`` imports it again by itself (it must still be importable: installed, or on ``PYTHONPATH``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from decathlete.data.sampling import PatchSampler
from decathlete.losses.base import LossContext, TrainingBatch, TrainingLoss
from decathlete.nets.base import NetOutput
from decathlete.nets.unet import DynamicUNet
from decathlete.recipes.base import Inference, Recipe, Spec
from decathlete.recipes.default import tiny
from decathlete.registry import register_loss, register_net, register_recipe, register_sampler, register_tile_weights


@register_net("unet_reconstruct")
class ReconstructingUNet(DynamicUNet):
    """The planned U-Net plus a 1x1 convolution that reconstructs the input from the full-resolution logits.

    In training the forward returns ``NetOutput(logits, {"reconstruction": ...})``; in eval mode just the logits,
    so prediction and the sliding window see an ordinary network.
    """

    def __init__(self, in_channels: int, num_classes: int, **kwargs: Any) -> None:
        super().__init__(in_channels, num_classes, **kwargs)
        conv = nn.Conv3d if kwargs["spatial_dims"] == 3 else nn.Conv2d
        self.reconstruct = conv(num_classes, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor] | NetOutput:
        logits = super().forward(x)
        if not self.training:
            return logits
        full = logits[0] if isinstance(logits, list) else logits
        return NetOutput(logits, {"reconstruction": self.reconstruct(full)})

    @classmethod
    def feature_map_elements(cls, patch_size: Sequence[int], in_channels: int, num_classes: int,
                             **kwargs: Any) -> int:
        """The U-Net's activations plus the reconstruction (what the planner fits to memory)."""
        unet = super().feature_map_elements(patch_size, in_channels, num_classes, **kwargs)
        return unet + in_channels * math.prod(patch_size)


@register_loss("segmentation_and_reconstruction")
class SegmentationAndReconstruction(TrainingLoss):
    """A segmentation loss on the logits plus ``weight`` x the mean squared error between the reconstruction and the
    input image; validation (eval mode, no auxiliary output) scores the segmentation term alone."""

    def __init__(self, segmentation: str = "dice_ce", segmentation_kwargs: dict[str, Any] | None = None,
                 weight: float = 0.1, *, context: LossContext) -> None:
        super().__init__()
        self.segmentation = context.logits_loss(segmentation, segmentation_kwargs)
        self.weight = weight

    def forward(self, output: NetOutput, batch: TrainingBatch) -> torch.Tensor:
        loss = self.segmentation(output, batch)
        reconstruction = output.aux.get("reconstruction")
        if reconstruction is None:
            return loss
        return loss + self.weight * F.mse_loss(reconstruction.float(), batch.image.float())


@register_sampler("foreground_weighted")
class ForegroundWeightedSampler(PatchSampler):
    """Cases drawn with probability proportional to (foreground voxels) ** ``power``; the rest as `PatchSampler`."""

    def __init__(self, *, power: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        sizes = []
        for case_id in self.case_ids:
            voxels = (self.case_properties(case_id) or {}).get("label_voxels", {})
            sizes.append(max(1, sum(n for value, n in voxels.items() if int(value) > 0)) ** power)
        self.weights = np.asarray(sizes, dtype=np.float64) / sum(sizes)

    def choose_case(self, rng: np.random.Generator) -> str:
        return self.case_ids[int(rng.choice(len(self.case_ids), p=self.weights))]


@register_tile_weights("pyramid")
def pyramid(patch_size: Sequence[int], floor: float = 0.05) -> torch.Tensor:
    """Weights falling linearly from 1 at a tile's centre to ``floor`` at its border, per axis, multiplied."""
    weights = torch.ones(())
    for p in patch_size:
        tent = 1 - (torch.arange(p, dtype=torch.float32) - (p - 1) / 2).abs() / max(p / 2, 1)
        weights = weights[..., None] * tent.clamp_min(floor)
    return weights


@register_recipe("example_aux")
def example_aux() -> Recipe:
    """The ``tiny`` recipe with the components above."""
    base = tiny()
    return replace(base, name="example_aux", net=Spec("unet_reconstruct", dict(base.net.kwargs)),
                   loss=Spec("segmentation_and_reconstruction", {"segmentation": "dice_ce", "weight": 0.1}),
                   sampler=Spec("foreground_weighted", {"power": 1.0, "oversample_foreground": 0.33}),
                   inference=Inference(tile_weighting=Spec("pyramid", {"floor": 0.05})))
