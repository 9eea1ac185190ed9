"""Recipes: declarative bundles of network, loss, optimiser, schedule and planning overrides.

A recipe is data (a frozen dataclass written out as JSON with each model), so a model folder loads without the
recipe's source. The planner fills in everything that depends on the data. ``default`` is our best self-configuring
recipe; the papers' recipes derive from it with ``dataclasses.replace``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from decathlete.registry import get, register_recipe


@dataclass(frozen=True)
class Spec:
    """A registry key plus JSON kwargs."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


# Layer choices written into plans.json as data (name + kwargs), nnU-Net's conv-InstanceNorm-LeakyReLU.
UNET_LAYERS = {"norm": ["instance", {"affine": True, "eps": 1e-5}], "act": ["leakyrelu", {"negative_slope": 0.01}]}


@dataclass(frozen=True)
class Recipe:
    """Everything about training that does not depend on the data.

    Attributes:
        name: registry key of the recipe.
        net: network registry key + fixed kwargs (``block``, ``n_blocks_per_stage`` ...); the planner adds topology.
        loss: loss registry key + kwargs.
        optimizer: optimiser name + kwargs.
        schedule: learning-rate schedule name + kwargs.
        epochs: training epochs.
        iterations_per_epoch: optimiser steps per epoch.
        planning: planner overrides: ``base_features``, ``max_features_3d``, ``max_features_2d``,
            ``n_blocks_per_stage`` (list, repeated/truncated to the stage count), ``n_conv_per_stage_decoder``,
            ``gpu_memory_gb`` (a preset's own budget), ``max_dataset_covered`` (batch cap as a fraction of the
            dataset's voxels).
    """

    name: str
    net: Spec = Spec("unet", {"block": "plain", **UNET_LAYERS})
    loss: Spec = Spec("dice_ce", {"batch_dice": False, "include_background": False})
    optimizer: Spec = Spec("sgd", {"lr": 1e-2, "momentum": 0.99, "nesterov": True, "weight_decay": 3e-5})
    schedule: Spec = Spec("poly", {"power": 0.9})
    epochs: int = 1000
    iterations_per_epoch: int = 250
    planning: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@register_recipe("default")
def default() -> Recipe:
    """nnU-Net v2's self-configuring plain U-Net with its training defaults."""
    return Recipe(name="default")


@register_recipe("resenc_m")
def resenc_m() -> Recipe:
    """Residual-encoder U-Net, preset M ("nnU-Net Revisited", https://arxiv.org/abs/2404.09556): ~8 GB."""
    return replace(default(), name="resenc_m", net=Spec("unet", {"block": "residual", **UNET_LAYERS}),
                   planning={"n_blocks_per_stage": [1, 3, 4, 6, 6, 6, 6], "n_conv_per_stage_decoder": 1,
                             "gpu_memory_gb": 8, "max_dataset_covered": 1.0})


@register_recipe("resenc_l")
def resenc_l() -> Recipe:
    """Residual-encoder U-Net, preset L: the M topology planned for a 24 GB budget."""
    return replace(resenc_m(), name="resenc_l", planning={**resenc_m().planning, "gpu_memory_gb": 24})


@register_recipe("resenc_xl")
def resenc_xl() -> Recipe:
    """Residual-encoder U-Net, preset XL: the M topology planned for a 40 GB budget."""
    return replace(resenc_m(), name="resenc_xl", planning={**resenc_m().planning, "gpu_memory_gb": 40})


def get_recipe(name: str) -> Recipe:
    """Build the registered recipe ``name``."""
    return get("recipes", name)()


@register_recipe("tiny")
def tiny() -> Recipe:
    """A narrow U-Net (8 base features) for smoke tests and CPU demos: the default rules at a fraction of the cost."""
    return replace(default(), name="tiny", epochs=5, iterations_per_epoch=10,
                   planning={"base_features": 8, "max_features_3d": 64, "max_features_2d": 128})
