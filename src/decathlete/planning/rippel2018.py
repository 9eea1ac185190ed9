"""Planner ``rippel2018``: the per-axis depth rule of Rippel, Weninger & Merhof 2018 ("AutoML segmentation for 3D
medical image data", Medical Segmentation Decathlon).

* **Spacing**: the median voxel spacing of the training cases, every axis (no anisotropy rule).
* **Depth per axis** from the median shape at that spacing: an axis is downsampled only while its feature map stays
  at least ``MIN_FEATURE_MAP`` (8) voxels, at most ``MAX_DEPTH`` (4) times, ``d = min(floor(log2(shape / 8)), 4)``
  (the paper's equation 1, ``min(shape / 2^3, 4)``, read as the number of halvings it describes). An axis shorter
  than 16 voxels is never downsampled.
* **Patch**: ``2^(3 + d)`` per axis, capped at 256 in plane and 128 through plane (axis 0 after the planner's
  transposition, the coarsest; with four halvings at most, ``2^7 = 128`` never reaches either cap). A patch larger
  than the scan is filled by the sampler's reflection (``reflect_patch``).
* **Topology**: nnU-Net's ``pool_and_conv_props`` with the paper's parameters: pooling by voxel counts alone
  (spacing ignored), a feature map of at least 8, four poolings per axis, and stride *and* kernel 1 on an axis that
  has stopped ("realized by setting strides as well as kernel size to 1"); stage 0 has kernel 3 on every axis.
  The stages are ``max(d) + 1``, so the network has ``max(d)`` decoder outputs; the lowest one's deep-supervision
  weight is 0 (nnU-Net's weights), which leaves the paper's ``max(d) - 1`` supervised predictions.
* **Batch** is the recipe's (4); the memory estimate is recorded, not used to shrink the patch (the paper fixes it).

Only ``3d_fullres`` is planned: the paper has no 2D or low-resolution stage. Normalisation follows the recipe (the
paper gives none; the recipe keeps nnU-Net's rule by channel name).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from decathlete.labels import LabelScheme
from decathlete.planning.memory import resolve_target
from decathlete.planning.plans import MemoryTarget, Plans
from decathlete.planning.rules import (
    REFERENCE_GB,
    RESAMPLING,
    median_shape_at,
    plan_configuration,
    summarise,
    transpose_axes,
)
from decathlete.recipes.base import Recipe
from decathlete.recipes.build import build_normalization
from decathlete.registry import register_planner

MIN_FEATURE_MAP = 8
MAX_DEPTH = 4
PATCH_CAP_IN_PLANE = 256
PATCH_CAP_THROUGH_PLANE = 128
TOPOLOGY = {"min_size": MIN_FEATURE_MAP, "by_spacing": False, "lone_axis_factor": 2,
            "max_pools_per_axis": MAX_DEPTH, "unpooled_kernel": 1}


def axis_depths(median_shape: list[float] | np.ndarray) -> list[int]:
    """Downsamplings per axis: halve while the feature map stays >= 8 voxels, at most 4 times."""
    return [int(min(max(math.floor(math.log2(max(float(n), 1.0) / MIN_FEATURE_MAP)), 0), MAX_DEPTH))
            for n in median_shape]


def rippel_patch(depths: list[int]) -> list[int]:
    """``2^(3 + d)`` per axis, capped at 128 through plane (axis 0) and 256 in plane."""
    caps = [PATCH_CAP_THROUGH_PLANE] + [PATCH_CAP_IN_PLANE] * (len(depths) - 1)
    return [min(2 ** (3 + d), cap) for d, cap in zip(depths, caps)]


@register_planner("rippel2018")
def plan_rippel2018(fingerprint: dict[str, Any], dataset: dict[str, Any], recipe: Recipe,
                    gpu_memory_gb: float = REFERENCE_GB, memory: MemoryTarget | None = None) -> Plans:
    """Rippel 2018's rules (module docstring), with the recipe's ``planning`` overrides of spacing and patch."""
    p = recipe.planning
    spacings = np.array([c["spacing"] for c in fingerprint["cases"]], dtype=float)
    median_spacing = np.median(spacings, axis=0)
    forward, backward = transpose_axes(median_spacing)
    spacing = median_spacing[forward] if p.target_spacing is None else np.array(p.target_spacing, dtype=float)
    median_shape = median_shape_at(fingerprint, spacing, p.crop_to_nonzero, forward)
    depths = axis_depths(median_shape)
    n_in = len(fingerprint["channel_names"])
    n_out = LabelScheme.from_dataset({"label_values": fingerprint["label_values"], **dataset}).num_outputs
    target = resolve_target(recipe, gpu_memory_gb, memory)
    config = plan_configuration(
        spacing.tolist(), median_shape.tolist(), n_in, n_out, recipe, target.budget_gb,
        float(np.prod(median_shape)) * fingerprint["n_cases"], patch=rippel_patch(depths), topology=TOPOLOGY,
        memory_kind=target.kind, data_identifier="3d_fullres",
        normalization=build_normalization(recipe, fingerprint, dataset), resampling=dict(RESAMPLING),
        crop_to_nonzero=p.crop_to_nonzero,
        notes=[f"Rippel 2018: median spacing {np.round(spacing, 4).tolist()} mm, median shape "
               f"{median_shape.astype(int).tolist()}, depth per axis {depths}"])
    config.batch_dice = False
    return Plans(dataset=dataset, fingerprint_summary=summarise(fingerprint), planner="rippel2018",
                 recipe=recipe.name, gpu_memory_gb=target.budget_gb, configurations={"3d_fullres": config},
                 recipe_settings=recipe.to_dict(), transpose_forward=forward, transpose_backward=backward,
                 memory_target=target)
