"""The default planner: nnU-Net v2's rules, turning a fingerprint into ``2d``, ``3d_fullres``, ``3d_lowres`` and
``3d_cascade_fullres`` plans.

Rules (Isensee et al. 2021, https://doi.org/10.1038/s41592-020-01008-z, and nnU-Net v2's ExperimentPlanner):
target spacing is the median spacing, except that a strongly anisotropic axis takes the 10th percentile of its
spacings; an axis is pooled while its spacing is within 2x of the finest and its size stays >= 8 (bottleneck >= 4);
kernels are 1 on an axis much coarser than the others; features start at 32 and double, capped at 320 (3D) / 512
(2D); the patch starts with the aspect ratio of 1/spacing and ~256^3 voxels (2048^2 in 2D), clipped to the median
shape, and the axis with the largest patch/median ratio shrinks until the activation-memory estimate for the
minimum batch of 2 fits the budget; batch >= 2 and covers at most 5% of the dataset's voxels. When that patch covers
less than a quarter of the median image, a coarser ``3d_lowres`` stage is planned and, on top of it, the
``3d_cascade_fullres`` stage: 3d_fullres's plan with the low-resolution stage's prediction as extra input channels
(one-hot per foreground label; `decathlete.data.cascade`). A recipe's
``planning`` (`decathlete.recipes.base.Planning`) overrides any of these: spacing, patch, batch, widths, blocks,
normalisation, the 2D slice axis.

Axis order (nnU-Net v2's ``transpose_forward``): the axis of the largest target spacing moves first, the others
keep their order, and everything above is planned in that order, so the rules that treat axis 0 as the thick one
(kernels, the 2D slice axis, dummy-2D augmentation) also hold for sagittal and coronal stacks. The transposition
is decided by the data (the rule's target spacing, in the data's own array order); a recipe's spacing and patch
overrides are read in the planned order, coarse axis first, like the plans they override.

The memory estimate is ``feature_map_elements`` of the registered network built from the very kwargs written to
plans.json, times a bytes-per-element constant. The constants are calibrated on nnU-Net's reference points (a
network with 560e6 activation elements per sample trains with batch 2 in 8 GB in 3D; 85e6 with batch 12 in 2D), so
with the plain U-Net our plans match nnU-Net's, and any other registered network plans through the same seam. A plan
made for the CPU fits the same rules to a share of the machine's RAM with a CPU estimate instead
(`decathlete.planning.memory`); the plans' ``memory_target`` says which.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import replace
from typing import Any

import numpy as np

from decathlete.labels import LabelScheme
from decathlete.planning.memory import cpu_ram_gb, fits_batch, resolve_target
from decathlete.planning.plans import Configuration, MemoryTarget, NetworkSpec, Plans, inverse_permutation
from decathlete.recipes.base import Recipe
from decathlete.recipes.build import build_normalization
from decathlete.registry import get, register_planner

GIB = 1024**3
REFERENCE_GB = 8.0
# (activation elements per sample, batch size) that fit REFERENCE_GB, per spatial dimensionality (nnU-Net v2).
REFERENCE_POINTS = {3: (560_000_000, 2), 2: (85_000_000, 12)}
BYTES_PER_ELEMENT = {d: REFERENCE_GB * GIB / (e * b) for d, (e, b) in REFERENCE_POINTS.items()}
ANISOTROPY_THRESHOLD = 3.0
MIN_FEATURE_MAP_SIZE = 4
LOWRES_THRESHOLD = 0.25
LOWRES_SPACING_STEP = 1.03
# nnU-Net's resampling: third-order images, linear one-hot labels, a coarse axis resampled apart (nearest) when
# the spacing is more anisotropic than the threshold.
RESAMPLING = {"image_order": 3, "label_order": 1, "anisotropy_threshold": ANISOTROPY_THRESHOLD,
              "separate_axis_order": 0}


def target_spacing(spacings: np.ndarray, shapes: np.ndarray, threshold: float = ANISOTROPY_THRESHOLD) -> np.ndarray:
    """Median spacing, with the anisotropy rule for a coarse axis that also has few voxels (array order)."""
    target = np.median(spacings, axis=0)
    median_shape = np.median(shapes, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    aniso_spacing = target[worst] > threshold * max(target[others])
    aniso_voxels = median_shape[worst] * threshold < min(median_shape[others])
    if aniso_spacing and aniso_voxels:
        coarse = float(np.percentile(spacings[:, worst], 10))
        if coarse < max(target[others]):  # never finer than the other axes
            coarse = max(max(target[others]), coarse) + 1e-5
        target[worst] = coarse
    return target


def pool_and_conv_props(spacing: list[float], patch: list[float], min_size: int = MIN_FEATURE_MAP_SIZE,
                        max_stages: int | None = None, *, by_spacing: bool = True, lone_axis_factor: int = 3,
                        max_pools_per_axis: int | None = None, unpooled_kernel: int | None = None,
                        ) -> tuple[list[list[int]], list[list[int]], list[int], list[int]]:
    """Strides, kernel sizes, the patch padded to a valid size, and the divisor each axis must respect.

    nnU-Net's rule (the defaults): an axis is pooled while its size stays >= 2 * ``min_size`` and its current spacing
    is within 2x of the finest poolable axis; a lone poolable axis needs >= ``lone_axis_factor`` * ``min_size``; at
    most ``max_stages`` stages. Kernels are 3 on an axis once its spacing is within 2x of the finest, 1 before that;
    the bottleneck kernel is always 3.

    The keywords turn the same loop into other published rules: ``by_spacing=False`` pools by voxel counts alone
    (every axis counts as equally fine, kernels start at 3), ``max_pools_per_axis`` stops an axis after that many
    poolings, and ``unpooled_kernel`` gives an axis that is not pooled into a stage that kernel there (Rippel 2018:
    1, "strides as well as kernel size set to 1"), the bottleneck included.
    """
    dims = len(spacing)
    cur_spacing = list(map(float, spacing)) if by_spacing else [1.0] * dims
    cur_size = list(map(float, patch))
    strides, kernels, kernel, n_pool = [[1] * dims], [], [1] * dims, [0] * dims
    while max_stages is None or len(strides) < max_stages:
        valid = [i for i in range(dims) if cur_size[i] >= 2 * min_size
                 and (max_pools_per_axis is None or n_pool[i] < max_pools_per_axis)]
        if not valid:
            break
        finest = min(cur_spacing[i] for i in valid)
        valid = [i for i in valid if cur_spacing[i] / finest < 2]
        if len(valid) == 1 and cur_size[valid[0]] < lone_axis_factor * min_size:
            break
        for d in range(dims):
            if kernel[d] != 3 and cur_spacing[d] / min(cur_spacing) < 2:
                kernel[d] = 3
        stride = [1] * dims
        for v in valid:
            stride[v], n_pool[v] = 2, n_pool[v] + 1
            cur_spacing[v] *= 2
            cur_size[v] = np.ceil(cur_size[v] / 2)
        kernels.append(_stage_kernel(kernel, strides[-1], len(strides) - 1, unpooled_kernel))
        strides.append(stride)
    kernels.append(_stage_kernel([3] * dims, strides[-1], len(strides) - 1, unpooled_kernel))
    divisor = [2**n for n in n_pool]
    padded = [int(np.ceil(p / d) * d) for p, d in zip(patch, divisor)]
    return strides, kernels, padded, divisor


def _stage_kernel(kernel: list[int], stride: list[int], stage: int, unpooled_kernel: int | None) -> list[int]:
    """The kernel of one stage: ``unpooled_kernel`` on the axes its (first) stride leaves alone, past stage 0."""
    if unpooled_kernel is None or stage == 0:
        return list(kernel)
    return [k if s > 1 else unpooled_kernel for k, s in zip(kernel, stride)]


def network_kwargs(recipe: Recipe, dims: int, strides: list[list[int]], kernels: list[list[int]],
                   patch: list[int] | None = None) -> dict[str, Any]:
    """The network description written to plans.json, from the recipe's choices and the topology (and the patch,
    for networks that declare ``plan_patch_size``: a dense layer sized for the training crop)."""
    p = recipe.planning
    extra = {"train_patch_size": [int(v) for v in patch]} if patch is not None and getattr(
        get("nets", recipe.net.name), "plan_patch_size", False) else {}
    n_stages = len(strides)
    cap = p.max_features_3d if dims == 3 else p.max_features_2d
    blocks = p.n_blocks_per_stage
    if not isinstance(blocks, int):
        blocks = (list(blocks) + [blocks[-1]] * n_stages)[:n_stages]
    return {**recipe.net.kwargs, "spatial_dims": dims,
            "features_per_stage": [min(p.base_features * 2**i, cap) for i in range(n_stages)],
            "kernel_sizes": kernels, "strides": strides, "n_blocks_per_stage": blocks,
            "n_conv_per_stage_decoder": p.n_conv_per_stage_decoder, **extra}


def memory_gb(net_name: str, kwargs: dict[str, Any], patch: list[int], batch: int, n_in: int, n_out: int,
              kind: str = "gpu") -> float:
    """Training-memory estimate in GiB for ``batch`` samples of ``patch`` through the described network: on a GPU
    (``kind`` ``gpu``, nnU-Net's) or the CPU process's peak resident memory (``cpu_ram``)."""
    net = get("nets", net_name)
    elements = net.feature_map_elements(patch, n_in, n_out, **kwargs)
    if kind == "cpu_ram":
        parameters = _parameter_count(net, n_in, n_out, json.dumps(kwargs, sort_keys=True))
        return cpu_ram_gb(parameters, elements, batch, len(patch))
    return batch * elements * BYTES_PER_ELEMENT[len(patch)] / GIB


@functools.lru_cache(maxsize=1024)
def _parameter_count(net: type, n_in: int, n_out: int, kwargs_json: str) -> int:
    """``net.parameter_count`` remembered: the patch search asks it for the same few topologies hundreds of times,
    and each count builds the network (~50 ms). A pure function of the class and its kwargs, so nothing goes stale."""
    return net.parameter_count(n_in, n_out, **json.loads(kwargs_json))


def plan_configuration(spacing: list[float], median_shape: list[float], n_in: int, n_out: int, recipe: Recipe,
                       budget_gb: float, dataset_voxels: float, *, patch: list[int] | None = None,
                       topology: dict[str, Any] | None = None, memory_kind: str = "gpu", **extra: Any) -> Configuration:
    """Topology, patch and batch for one configuration at ``spacing`` (2 or 3 axes, array order), fitted to
    ``budget_gb`` of ``memory_kind`` memory (``gpu`` or ``cpu_ram``, see `memory_gb`).

    The recipe may fix the patch (``planning.patch_size_3d``/``_2d``: padded up to what the pooling needs, never
    shrunk) and the batch (``planning.batch_size``); the memory rule decides whatever it leaves open. Another
    planner may fix the ``patch`` itself (the recipe's still wins) and choose the topology rule: ``topology`` holds
    keywords of `pool_and_conv_props`.
    """
    dims = len(spacing)
    p = recipe.planning
    fixed_patch = (p.patch_size_3d if dims == 3 else p.patch_size_2d) or patch
    inv = 1.0 / np.asarray(spacing, dtype=float)
    start = 256**3 if dims == 3 else 2048**2
    patch = np.minimum(np.round(inv * (start / np.prod(inv)) ** (1 / dims)), median_shape).tolist()
    if fixed_patch is not None:
        patch = [float(v) for v in fixed_patch]
    net = recipe.net.name
    depth = {"max_stages": p.max_stages, **(topology or {})}
    strides, kernels, patch, divisor = pool_and_conv_props(spacing, patch, **depth)
    kwargs = network_kwargs(recipe, dims, strides, kernels, patch)
    smallest_batch = p.batch_size or p.min_batch_size
    while fixed_patch is None and memory_gb(net, kwargs, patch, smallest_batch, n_in, n_out, memory_kind) > budget_gb:
        ratios = np.asarray(patch) / np.asarray(median_shape)
        axis = int(len(ratios) - 1 - np.argmax(ratios[::-1]))  # the last of equally large axes, as nnU-Net
        trial = list(patch)
        trial[axis] -= divisor[axis]
        divisor = pool_and_conv_props(spacing, trial, **depth)[3]
        patch[axis] -= divisor[axis]
        strides, kernels, patch, divisor = pool_and_conv_props(spacing, patch, **depth)
        kwargs = network_kwargs(recipe, dims, strides, kernels, patch)
    fixed = memory_gb(net, kwargs, patch, 0, n_in, n_out, memory_kind)  # the CPU process and its weights; 0 on a GPU
    per_sample = memory_gb(net, kwargs, patch, 1, n_in, n_out, memory_kind) - fixed
    batch = fits_batch(budget_gb, fixed, per_sample, memory_kind)
    batch_cap = round(dataset_voxels * p.max_dataset_covered / float(np.prod(patch)))
    batch = p.batch_size or max(min(batch, batch_cap), p.min_batch_size)
    return Configuration(
        spacing=[float(s) for s in extra.pop("full_spacing", spacing)], patch_size=[int(p) for p in patch],
        batch_size=int(batch), strides=strides, kernel_sizes=kernels, features_per_stage=kwargs["features_per_stage"],
        normalization=extra.pop("normalization"), network=NetworkSpec(net, kwargs),
        median_shape=[int(round(m)) for m in median_shape], memory_estimate_gb=round(fixed + per_sample * batch, 3),
        parameters=get("nets", net).parameter_count(n_in, n_out, **kwargs), spatial_dims=dims, **extra)


def plan_cascade(fullres: Configuration, previous: str, n_in: int, n_previous: int, n_out: int,
                 memory_kind: str) -> Configuration:
    """nnU-Net's cascade stage: ``fullres``'s plan (same cache, patch, batch and network) taking ``previous``'s
    prediction as ``n_previous`` more input channels (one-hot per foreground label)."""
    cascade = copy.deepcopy(fullres)  # no list shared with 3d_fullres: a later edit of one must not reach the other
    net, kwargs, channels = cascade.network.name, cascade.network.kwargs, n_in + n_previous
    memory = memory_gb(net, kwargs, cascade.patch_size, cascade.batch_size, channels, n_out, memory_kind)
    cascade.notes.append(f"cascade: takes {previous}'s cross-validation predictions as {n_previous} more input "
                         "channels (one-hot per foreground label)")
    return replace(cascade, previous_stage=previous, memory_estimate_gb=round(memory, 3),
                   parameters=get("nets", net).parameter_count(channels, n_out, **kwargs))


def transpose_axes(spacing: np.ndarray | list[float]) -> tuple[list[int], list[int]]:
    """``(transpose_forward, transpose_backward)`` for a target spacing in the data's array order: the coarsest
    axis first, the others in their order (nnU-Net v2). ``argmax`` takes the first of equal maxima, so isotropic
    spacing and data whose axis 0 is already (one of) the coarsest keep the identity."""
    coarse = int(np.argmax(spacing))
    forward = [coarse] + [a for a in range(len(spacing)) if a != coarse]
    return forward, inverse_permutation(forward)


def median_shape_at(fingerprint: dict[str, Any], spacing: np.ndarray, cropped: bool = True,
                     order: list[int] | None = None) -> np.ndarray:
    """Median case shape after resampling to ``spacing``, both in the planned axis ``order`` (default: as stored)."""
    key = "shape_after_crop" if cropped else "shape"
    axes = list(range(len(spacing))) if order is None else order
    shapes = [np.round(np.asarray(c[key])[axes] * np.asarray(c["spacing"])[axes] / spacing)
              for c in fingerprint["cases"]]
    return np.median(shapes, axis=0)


@register_planner("nnunet")
def plan_nnunet(fingerprint: dict[str, Any], dataset: dict[str, Any], recipe: Recipe,
                gpu_memory_gb: float = REFERENCE_GB, memory: MemoryTarget | None = None) -> Plans:
    """nnU-Net v2's planning rules (the default planner), with the recipe's ``planning`` overrides, fitted to
    ``gpu_memory_gb`` of GPU memory or to ``memory`` (a CPU plan's share of RAM, `decathlete.planning.memory`)."""
    p = recipe.planning
    target = resolve_target(recipe, gpu_memory_gb, memory)
    spacings = np.array([c["spacing"] for c in fingerprint["cases"]])
    shapes = np.array([c["shape_after_crop" if p.crop_to_nonzero else "shape"] for c in fingerprint["cases"]])
    rule_spacing = target_spacing(spacings, shapes)
    forward, backward = transpose_axes(rule_spacing)
    # Planned in the transposed order from here on; a recipe's override is already in that order.
    full_spacing = rule_spacing[forward] if p.target_spacing is None else np.array(p.target_spacing, dtype=float)
    median_shape = median_shape_at(fingerprint, full_spacing, p.crop_to_nonzero, forward)
    n_in = len(fingerprint["channel_names"])
    scheme = LabelScheme.from_dataset({"label_values": fingerprint["label_values"], **dataset})
    n_out = scheme.num_outputs
    dataset_voxels = float(np.prod(median_shape)) * fingerprint["n_cases"]
    common = {"normalization": build_normalization(recipe, fingerprint, dataset), "resampling": dict(RESAMPLING),
              "crop_to_nonzero": p.crop_to_nonzero}
    configs = {"2d": _plan_2d(full_spacing, median_shape, n_in, n_out, recipe, target, dataset_voxels, common)}
    fullres = plan_configuration(full_spacing.tolist(), median_shape.tolist(), n_in, n_out, recipe,
                                 target.budget_gb, dataset_voxels, data_identifier="3d_fullres",
                                 memory_kind=target.kind, **common)
    configs["3d_fullres"] = fullres
    if np.prod(fullres.patch_size) / np.prod(median_shape) < LOWRES_THRESHOLD:
        lowres = _plan_lowres(full_spacing, median_shape, n_in, n_out, recipe, target, dataset_voxels, common)
        if lowres is not None:
            configs["3d_lowres"] = lowres
    # Batch Dice (nnU-Net): over the batch for 2D and for fullres when a lowres stage exists, else per sample.
    configs["2d"].batch_dice = True
    fullres.batch_dice = "3d_lowres" in configs
    if "3d_lowres" in configs:
        n_previous = len(scheme.foreground_values)
        configs["3d_cascade_fullres"] = plan_cascade(fullres, "3d_lowres", n_in, n_previous, n_out, target.kind)
    return Plans(dataset=dataset, fingerprint_summary=summarise(fingerprint), planner="nnunet", recipe=recipe.name,
                 gpu_memory_gb=target.budget_gb, configurations=configs, recipe_settings=recipe.to_dict(),
                 transpose_forward=forward, transpose_backward=backward, memory_target=target)


def _plan_2d(full_spacing: np.ndarray, median_shape: np.ndarray, n_in: int, n_out: int, recipe: Recipe,
             target: MemoryTarget, dataset_voxels: float, common: dict[str, Any]) -> Configuration:
    """Slices along the coarsest axis; that axis keeps each case's spacing (nnU-Net) or, as the recipe says, is
    resampled to the target spacing's or to the in-plane spacing (isotropic volumes)."""
    slice_axis = int(np.argmax(full_spacing)) if np.ptp(full_spacing) > 0 else 0
    in_plane = [i for i in range(3) if i != slice_axis]
    mode = recipe.planning.slice_axis_spacing_2d
    spacing = full_spacing.astype(float).copy()
    if mode == "in_plane":
        spacing[slice_axis] = float(spacing[in_plane].min())
    how = {"keep": "keeps each case's own spacing", "target": f"is resampled to {spacing[slice_axis]:.3g} mm",
           "in_plane": f"is resampled to the in-plane {spacing[slice_axis]:.3g} mm"}[mode]
    resampling = {**common["resampling"], "slice_axis": slice_axis, "keep_slice_axis_spacing": mode == "keep"}
    return plan_configuration(
        full_spacing[in_plane].tolist(), median_shape[in_plane].tolist(), n_in, n_out, recipe, target.budget_gb,
        dataset_voxels, memory_kind=target.kind, full_spacing=spacing.tolist(),
        data_identifier="2d" if mode == "keep" else f"2d_{mode}",
        notes=[f"slices along array axis {slice_axis}; the slice axis {how}"],
        **{**common, "resampling": resampling})


def _plan_lowres(full_spacing: np.ndarray, full_median: np.ndarray, n_in: int, n_out: int, recipe: Recipe,
                 target: MemoryTarget, dataset_voxels: float, common: dict[str, Any]) -> Configuration | None:
    """Coarsen the spacing (the finer axes first when anisotropic, 3% a step) until the patch covers >= 25% of the
    median image at that spacing; None when that stage would be barely coarser than fullres."""
    spacing = full_spacing.astype(float).copy()
    while True:
        fine = spacing.max() / spacing > 2
        spacing = np.where(fine, spacing * LOWRES_SPACING_STEP, spacing) if fine.any() \
            else spacing * LOWRES_SPACING_STEP
        scale = full_spacing / spacing
        median = np.round(full_median * scale)
        config = plan_configuration(spacing.tolist(), median.tolist(), n_in, n_out, recipe, target.budget_gb,
                                    dataset_voxels * float(np.prod(scale)), data_identifier="3d_lowres",
                                    memory_kind=target.kind, **common)
        if np.prod(config.patch_size) / np.prod(median) >= LOWRES_THRESHOLD:
            break
    # nnU-Net drops a lowres stage that is barely coarser than fullres: it would add training time for nothing.
    if np.prod(full_median) / np.prod(median) < 2:
        return None
    return config


def summarise(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The planner-relevant part of the fingerprint, copied into plans.json, with the voxels of each label value
    summed over the cases (class frequencies, e.g. for inverse-frequency loss weights)."""
    totals: dict[str, int] = {}
    for case in fingerprint["cases"]:
        for value, count in case.get("class_voxels", {}).items():
            totals[value] = totals.get(value, 0) + int(count)
    return {**{k: fingerprint[k] for k in ("n_cases", "median_spacing", "median_shape_after_crop",
                                           "median_crop_fraction", "foreground_intensity")},
            "class_voxels": dict(sorted(totals.items(), key=lambda kv: int(kv[0])))}
