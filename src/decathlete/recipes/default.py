"""The built-in self-configuring recipes: nnU-Net v2's default, its residual-encoder presets, and ``tiny``.

The papers' recipes derive from ``default`` with ``dataclasses.replace`` (see `decathlete.recipes.base.Recipe`).
"""

from __future__ import annotations

from dataclasses import replace

from decathlete.recipes.base import UNET_LAYERS, Planning, Recipe, Spec
from decathlete.registry import register_recipe


@register_recipe("default")
def default() -> Recipe:
    """nnU-Net v2's self-configuring plain U-Net with its training defaults."""
    return Recipe(name="default")


@register_recipe("resenc_m")
def resenc_m() -> Recipe:
    """Residual-encoder U-Net, preset M ("nnU-Net Revisited", https://arxiv.org/abs/2404.09556): ~8 GB."""
    return replace(default(), name="resenc_m", net=Spec("unet", {"block": "residual", **UNET_LAYERS}),
                   planning=Planning(n_blocks_per_stage=(1, 3, 4, 6, 6, 6, 6), n_conv_per_stage_decoder=1,
                                     gpu_memory_gb=8, max_dataset_covered=1.0))


@register_recipe("resenc_l")
def resenc_l() -> Recipe:
    """Residual-encoder U-Net, preset L: the M topology planned for a 24 GB budget."""
    return replace(resenc_m(), name="resenc_l", planning=replace(resenc_m().planning, gpu_memory_gb=24))


@register_recipe("resenc_xl")
def resenc_xl() -> Recipe:
    """Residual-encoder U-Net, preset XL: the M topology planned for a 40 GB budget."""
    return replace(resenc_m(), name="resenc_xl", planning=replace(resenc_m().planning, gpu_memory_gb=40))


@register_recipe("tiny")
def tiny() -> Recipe:
    """A narrow U-Net (8 base features) for smoke tests: the default rules at a fraction of the cost.

    The fraction includes the memory budget: at nnU-Net's 8 GiB a quarter-width network takes the whole image
    (brain-MR-like 140x170x140 at 1 mm: patch 160x192x160, batch 3). 0.5 GiB of GPU memory (1/16 of 8) gives about a
    quarter of the default plan's voxels (80x96x80 against 128x128x128, batch 2), and 1.5 GiB of RAM, what that plan
    needs in a CPU process (`decathlete.planning.memory`), gives the same on the CPU. Images that fit whole plan as
    before (hippocampus: 40x56x40, batch 9). A budget rather than a patch cap, because under a cap the batch would
    still grow to fill 8 GiB.
    """
    return replace(default(), name="tiny", epochs=5, iterations_per_epoch=10,
                   planning=Planning(base_features=8, max_features_3d=64, max_features_2d=128, gpu_memory_gb=0.5,
                                     ram_gb=1.5))
