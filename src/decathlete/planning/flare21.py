"""Planner ``flare21_2d``: nnU-Net's 2D configuration on z-isotropic volumes (Witanto et al. 2021, FLARE21).

The paper resamples every CT to isotropic voxels before nnU-Net sees it ("Z-Isotropification": the depth of one scan
grows from 93 to 269 slices) and trains nnU-Net's 2D U-Net on the slices. Here that is one planner:

* **Slice axis**: the acquisition axis, the axis whose median spacing lies farthest from the other two (abdominal
  CT: z at 2.5-5 mm against 0.7-0.9 mm in plane; the head-and-neck Task106: its 2.5 mm axis against 4.7 mm), moved to
  array axis 0 by the plan's transposition. Isotropic data have no such axis and keep their order.
* **Spacing**: every axis at the in-plane spacing (the finer of the two in-plane medians, so no in-plane detail is
  lost), or the recipe's ``planning.target_spacing``. Along the slice axis the volume is interpolated linearly
  (``separate_axis_order`` 1) where nnU-Net's rule for anisotropic data would repeat the nearest slice (order 0): new
  slices that only copy their neighbours would add nothing. In plane the order is nnU-Net's (3 for images, linear
  for labels), and predictions go back to each case's own grid the same way.
* **Patch, batch and topology**: nnU-Net's 2D rules at that spacing (on 0.8 mm abdominal CT they give the paper's
  512 x 512 at batch 12 for an 8 GB budget), so a smaller memory or time budget decides for itself.
* **No cropping** ("Cropping strategy: None"): the recipe sets ``planning.crop_to_nonzero = False``; the planner
  follows it.
* **Batch Dice**: over the batch, nnU-Net's choice for 2D.

Only the 2D configuration is planned, under the data identifier ``2d_isotropic``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from decathlete.labels import LabelScheme
from decathlete.planning.memory import resolve_target
from decathlete.planning.plans import MemoryTarget, Plans, inverse_permutation
from decathlete.planning.rules import REFERENCE_GB, RESAMPLING, median_shape_at, plan_configuration, summarise
from decathlete.recipes.base import Recipe
from decathlete.recipes.build import build_normalization
from decathlete.registry import register_planner


def acquisition_axis(spacing: np.ndarray | list[float]) -> int:
    """The axis whose spacing lies farthest from the median of the three (0 when all are equal)."""
    spacing = np.asarray(spacing, dtype=float)
    return int(np.argmax(np.abs(spacing - np.median(spacing))))


def isotropic_spacing(spacing: np.ndarray | list[float], axis: int) -> float:
    """The finer of the two spacings across ``axis`` (the in-plane spacing)."""
    return float(min(s for a, s in enumerate(spacing) if a != axis))


@register_planner("flare21_2d")
def plan_flare21_2d(fingerprint: dict[str, Any], dataset: dict[str, Any], recipe: Recipe,
                    gpu_memory_gb: float = REFERENCE_GB, memory: MemoryTarget | None = None) -> Plans:
    """The 2D configuration on isotropic volumes sliced along the acquisition axis (module docstring)."""
    p = recipe.planning
    median_spacing = np.median(np.array([c["spacing"] for c in fingerprint["cases"]], dtype=float), axis=0)
    axis = acquisition_axis(median_spacing)
    forward = [axis, *(a for a in range(3) if a != axis)]
    if p.target_spacing is None:
        spacing = np.full(3, isotropic_spacing(median_spacing, axis))
    else:
        spacing = np.array(p.target_spacing, dtype=float)
    median_shape = median_shape_at(fingerprint, spacing, p.crop_to_nonzero, forward)
    n_in = len(fingerprint["channel_names"])
    n_out = LabelScheme.from_dataset({"label_values": fingerprint["label_values"], **dataset}).num_outputs
    target = resolve_target(recipe, gpu_memory_gb, memory)
    resampling = {**RESAMPLING, "separate_axis_order": 1, "slice_axis": 0, "keep_slice_axis_spacing": False}
    config = plan_configuration(
        spacing[1:].tolist(), median_shape[1:].tolist(), n_in, n_out, recipe, target.budget_gb,
        float(np.prod(median_shape)) * fingerprint["n_cases"], memory_kind=target.kind, full_spacing=spacing.tolist(),
        data_identifier="2d_isotropic", normalization=build_normalization(recipe, fingerprint, dataset),
        resampling=resampling, crop_to_nonzero=p.crop_to_nonzero,
        notes=[f"Witanto 2021: z-isotropic at {np.round(spacing, 4).tolist()} mm (median spacing "
               f"{np.round(median_spacing, 4).tolist()} mm), sliced along the acquisition axis (input axis {axis}), "
               f"median shape {median_shape.astype(int).tolist()}"])
    config.batch_dice = True
    return Plans(dataset=dataset, fingerprint_summary=summarise(fingerprint), planner="flare21_2d",
                 recipe=recipe.name, gpu_memory_gb=target.budget_gb, configurations={"2d": config},
                 recipe_settings=recipe.to_dict(), transpose_forward=forward,
                 transpose_backward=inverse_permutation(forward), memory_target=target)
