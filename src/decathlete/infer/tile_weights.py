"""How much each voxel of a sliding-window tile counts where tiles overlap (registry kind ``tile_weights``).

A weighting is ``(patch_size, **kwargs) -> tensor of patch_size``, positive everywhere (a voxel that only one tile's
border covers must still get a value: the sliding window divides by the summed weights). A recipe names one in
``inference.tile_weighting``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from decathlete.infer.sliding_window import gaussian_importance
from decathlete.registry import register_tile_weights

BORDER_WEIGHT = 1e-6  # ``center``: outside the centre a tile still counts a little, so image borders get a value


@register_tile_weights("gaussian")
def gaussian(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8) -> torch.Tensor:
    """nnU-Net's Gaussian importance map, sigma = ``sigma_scale`` x the patch size per axis."""
    return gaussian_importance(patch_size, sigma_scale)


@register_tile_weights("constant")
def constant(patch_size: Sequence[int]) -> torch.Tensor:
    """Every voxel of a tile counts alike: the plain mean over overlapping tiles (MONAI's ``mode="constant"``)."""
    return torch.ones(tuple(int(p) for p in patch_size))


@register_tile_weights("center")
def center(patch_size: Sequence[int], fraction: float = 0.5) -> torch.Tensor:
    """Centre stitching (van den Hork 2019): the central ``fraction`` of the tile along each axis counts fully, the
    rest ``BORDER_WEIGHT``, so a voxel inside a tile's centre takes that tile's output (to ~1e-6 of the others'), and
    the image's rim, which no centre covers, the mean of the tiles that reach it. With ``fraction`` = the step (0.5)
    the centres of interior tiles tile the image."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    weights = torch.full(tuple(int(p) for p in patch_size), BORDER_WEIGHT)
    inner = []
    for p in patch_size:
        size = max(1, round(int(p) * fraction))
        start = (int(p) - size) // 2
        inner.append(slice(start, start + size))
    weights[tuple(inner)] = 1.0
    return weights
