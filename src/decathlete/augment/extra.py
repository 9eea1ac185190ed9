"""Augmentation of the papers' recipes that nnU-Net's pipeline lacks: Myronenko 2018's per-channel intensity shift and
scale (a batch transform, registry kind ``transforms``) and its mirror-only preset, and Rippel 2018's preset with an
elastic field isotropic in millimetres (kind ``augmentations``)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from decathlete.augment.pipeline import AugmentConfig
from decathlete.augment.presets import no_augmentation
from decathlete.registry import register_augmentation, register_transform

if TYPE_CHECKING:
    from decathlete.planning.plans import Configuration


@register_transform("shift_scale")
def shift_scale(image: torch.Tensor, label: torch.Tensor, generator: torch.Generator, *, shift: float = 0.1,
                scale: tuple[float, float] = (0.9, 1.1), p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample and channel, ``x -> (x + u * std) * s`` with ``u ~ U(-shift, shift)`` and ``s ~ U(scale)``.

    ``std`` is the channel's standard deviation inside the image (label >= 0); voxels outside it (label -1: outside
    the nonzero mask, or padding) keep their value, so masked channels stay 0 there as at inference. Each sample is
    changed with probability ``p`` (the paper: always).
    """
    b, c = image.shape[:2]
    draws = torch.rand((3, b, c), generator=generator).to(image.device)  # the CPU generator: a few numbers
    chosen = (draws[0] < p).to(image.dtype)
    shifts = (2 * draws[1] - 1) * shift * chosen
    scales = 1 + (scale[0] + (scale[1] - scale[0]) * draws[2] - 1) * chosen
    inside = (label >= 0).to(image.dtype)  # (B, 1, ...)
    axes = tuple(range(2, image.ndim))
    count = inside.sum(axes).clamp_min(1)
    mean = (image * inside).sum(axes) / count
    std = (((image - mean.view(b, c, *[1] * len(axes))) ** 2 * inside).sum(axes) / count).sqrt()
    view = (b, c, *[1] * len(axes))
    changed = (image + (shifts * std).view(view)) * scales.view(view)
    return torch.where(inside.bool(), changed, image), label


@register_augmentation("mirror_only")
def mirror_only(configuration: Configuration) -> AugmentConfig:
    """A random flip of every axis with probability 0.5, nothing else (Myronenko 2018)."""
    return replace(no_augmentation(configuration), p_mirror=0.5)


@register_augmentation("rippel2018")
def rippel2018(configuration: Configuration) -> AugmentConfig:
    """Rippel 2018: Gaussian noise, rotation, scaling and elastic deformation, nothing else, with the elastic field
    scaled inversely by the configuration's spacing (the median spacing under the ``rippel2018`` planner), so it is
    isotropic in millimetres. The paper sets its batchgenerators parameters "globally for all tasks" without giving
    them: nnU-Net's probabilities and ranges for noise, rotation (+-30 degrees) and scaling, and elastic deformation
    with probability 0.2 and the pipeline's default ranges."""
    spacing = list(configuration.spacing)
    if configuration.spatial_dims == 2:
        axis = int(configuration.resampling.get("slice_axis", 0))
        spacing = [s for a, s in enumerate(spacing) if a != axis]
    nnunet = AugmentConfig()
    return replace(no_augmentation(configuration), p_noise=nnunet.p_noise, p_rotation=nnunet.p_rotation,
                   p_scaling=nnunet.p_scaling, p_elastic=0.2, elastic_spacing=tuple(float(v) for v in spacing))
