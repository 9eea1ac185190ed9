"""Sliding-window inference with Gaussian importance weighting (nnU-Net v2's ``predict_sliding_window_return_logits``).

The image is covered by patch-sized tiles overlapping by ``1 - step`` (0.5 of the patch by default). Each tile's
logits are weighted by a Gaussian centred on the tile (sigma = patch / 8), added into a volume, and the sum is
divided by the summed weights: voxels near a tile border, where the network sees little context, count less. A
recipe may choose another weighting (``inference.tile_weighting``, `decathlete.infer.tile_weights`).

Details:

* An image smaller than the patch along an axis is padded with zeros (half before, half after, as nnU-Net's
  ``pad_nd_image``) and the result cropped back. When the padded image equals the patch (hippocampus cases are
  smaller than the patch) there is exactly one tile: one forward pass, no weighting.
* Tiles are batched (``batch_tiles``); mirroring TTA (`decathlete.infer.tta`) runs per batch of tiles, with the
  flipped copies in the same forward pass while the batch stays under ``TILE_BATCH_VOXELS``. nnU-Net runs one tile
  and one flip per pass; on an H100 (default U-Net, 32x48x32 patch, 96x160x128 image) the automatic batch took
  0.75 s with TTA against 7.3 s for one tile per pass (0.14 s vs 0.92 s without TTA).
* Whole-volume inference (``whole_volume_divisor``): when an image needs several tiles but padding it up to the
  network's divisibility holds fewer voxels than those tiles together (hippocampus cases a little larger than the
  patch need 2-8 heavily overlapping tiles), the network runs once on the padded image instead.
  A convolutional network accepts any input divisible by its total stride. Measured on 2 cores
  (``benchmarks/whole_volume_inference.py``, 40 fold-0 held-out hippocampus cases, 7 of them larger than the
  40x56x40 patch, 15-minute budget model, TTA): 0.584 vs 0.658 s/case, mean Dice 0.7280 vs 0.7283; so the
  `Predictor` does it by default (``--no-whole-volume`` tiles always).
* 2D configurations (a 2-axis patch on a 3-axis image) predict slice by slice along ``slice_axis``; slices are
  batched like tiles.
* On CUDA the forward runs under fp16 autocast; accumulation is always float32, on the compute device or, for
  volumes that do not fit there, on the CPU (``accumulate_device="cpu"``).

Deviation from nnU-Net: the Gaussian is centred at ``(p - 1) / 2`` rather than voxel ``p // 2``, so it is exactly
symmetric for even patch sizes (a mirrored tile gets mirrored weights), and it is not truncated at 4 sigma.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from decathlete.devices import autocast
from decathlete.infer.tta import flip_combinations, mirrored_forward

TILE_BATCH_VOXELS = 1 << 19  # automatic batch: tiles per forward pass so that a batch holds about this many voxels
WHOLE_VOLUME_MAX_PATCHES = 4  # whole-volume inference only up to this many patch volumes (activation memory)


def gaussian_importance(
    patch_size: Sequence[int],
    sigma_scale: float = 1.0 / 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Gaussian weight map of one tile, maximum 1 at the centre, no zeros.

    Args:
        patch_size: tile shape in array order ((z, y, x) or (y, x) for 2D).
        sigma_scale: sigma per axis as a fraction of the patch size along it (nnU-Net: 1/8).
        device: where to create the map.
        dtype: dtype of the map (zeros after the cast, e.g. fp16 underflow, become the smallest positive value).

    Returns:
        Tensor of shape ``patch_size``.
    """
    axes = []
    for i, p in enumerate(patch_size):
        sigma = max(p * sigma_scale, 1e-6)
        coord = (torch.arange(p, dtype=torch.float64) - (p - 1) / 2) / sigma
        shape = [1] * len(patch_size)
        shape[i] = p
        axes.append(torch.exp(-0.5 * coord**2).view(shape))
    weights = math.prod(axes) if len(axes) > 1 else axes[0]
    weights = (weights / weights.max()).to(device=device, dtype=dtype)
    # A zero weight would divide by zero where only that voxel of a tile covers the image (nnU-Net's guard).
    zero = weights == 0
    if zero.any():
        weights[zero] = weights[~zero].min()
    return weights


def tile_starts(image_shape: Sequence[int], patch_size: Sequence[int], step: float = 0.5) -> list[list[int]]:
    """First voxel of every tile along each axis (nnU-Net's ``compute_steps_for_sliding_window``).

    Per axis ``ceil((n - p) / (p * step)) + 1`` tiles, evenly spaced from 0 to ``n - p`` (rounded). An axis no longer
    than the patch gets the single start 0 (the caller pads it to the patch size first).

    Args:
        image_shape: image shape in array order.
        patch_size: tile shape, same order.
        step: distance between tiles as a fraction of the patch (0 < step <= 1; 0.5 = half overlap).

    Returns:
        One list of start indices per axis.
    """
    if not 0 < step <= 1:
        raise ValueError(f"step must lie in (0, 1], got {step}")
    starts = []
    for n, p in zip(image_shape, patch_size):
        if n <= p:
            starts.append([0])
            continue
        count = math.ceil((n - p) / (p * step)) + 1
        stride = (n - p) / (count - 1)
        starts.append([int(round(stride * i)) for i in range(count)])
    return starts


def whole_volume_patch(shape: Sequence[int], patch: Sequence[int], divisor: Sequence[int],
                       step: float = 0.5) -> tuple[int, ...] | None:
    """The input shape for one forward pass over the whole image, or None when tiling costs less.

    ``shape`` padded up to the patch and then to a multiple of ``divisor`` per axis; chosen when tiling would need
    more than one tile, the padded image holds fewer voxels than the tiles together, and it is at most
    ``WHOLE_VOLUME_MAX_PATCHES`` patches large.
    """
    target = tuple(max(int(p), -(-int(n) // int(d)) * int(d)) for n, p, d in zip(shape, patch, divisor))
    padded = [max(int(n), int(p)) for n, p in zip(shape, patch)]
    tiles = math.prod(len(s) for s in tile_starts(padded, patch, step))
    voxels, patch_voxels = math.prod(target), math.prod(int(p) for p in patch)
    if tiles > 1 and voxels < tiles * patch_voxels and voxels <= WHOLE_VOLUME_MAX_PATCHES * patch_voxels:
        return target
    return None


def _padding(shape: Sequence[int], patch: Sequence[int]) -> list[tuple[int, int]]:
    """(before, after) zero padding per axis that brings ``shape`` up to at least ``patch`` (half on each side)."""
    missing = [max(p - n, 0) for n, p in zip(shape, patch)]
    return [(m // 2, m - m // 2) for m in missing]


def _auto_batch(patch: Sequence[int]) -> int:
    return max(1, TILE_BATCH_VOXELS // int(np.prod(patch)))


@torch.inference_mode()
def sliding_window_predict(
    net: torch.nn.Module,
    image: torch.Tensor | np.ndarray,
    patch_size: Sequence[int],
    num_classes: int,
    step: float = 0.5,
    batch_tiles: int | None = None,
    mirror_axes: Sequence[int] = (),
    device: torch.device | str = "cpu",
    accumulate_device: torch.device | str | None = None,
    slice_axis: int = 0,
    whole_volume_divisor: Sequence[int] | None = None,
    tile_weights: Callable[[Sequence[int]], torch.Tensor] | None = None,
    progress: bool = False,
    desc: str = "sliding window",
) -> torch.Tensor:
    """Logits for a whole preprocessed image by Gaussian-weighted sliding-window inference.

    Args:
        net: network on ``device`` in eval mode, ``(B, C, *patch)`` -> ``(B, K, *patch)`` logits (a deep-supervision
            list is reduced to its first, full-resolution entry).
        image: ``(C, z, y, x)`` preprocessed image (any device; tiles are moved to ``device``).
        patch_size: tile shape: (z, y, x) for a 3D network, or the two in-plane axes (in array order) for a 2D one.
        num_classes: output channels ``K`` of the network.
        step: tile distance as a fraction of the patch (nnU-Net: 0.5).
        batch_tiles: tiles (or 2D slices) per forward pass; None = about ``TILE_BATCH_VOXELS`` voxels per batch.
        mirror_axes: patch axes for mirroring TTA (see `decathlete.infer.tta`); empty = no TTA.
        device: compute device of ``net``.
        accumulate_device: where the logits are summed; None = ``device``. "cpu" for volumes too large for it.
        slice_axis: 2D networks only: the image axis (0 = z) predicted slice by slice.
        whole_volume_divisor: per patch axis, what the network's input must be divisible by (the product of its
            strides); given, a small image runs as one forward pass when that is cheaper (`whole_volume_patch`).
        tile_weights: ``patch -> weight map`` of a tile (`decathlete.infer.tile_weights`); None = the Gaussian.
        progress: a bar (not kept) counting tile passes: tiles (2D: tiles of every slice) x mirror flips, each one
            tile through the network once; ``desc`` leads its label.

    Returns:
        float32 logits ``(K, z, y, x)`` on ``accumulate_device``, made under ``torch.inference_mode`` (clone before
        modifying it in place outside that mode).
    """
    image = torch.as_tensor(image)
    device = torch.device(device)
    acc = torch.device(accumulate_device) if accumulate_device is not None else device
    dims, spatial = len(patch_size), image.ndim - 1
    if dims == spatial:
        stack = image[None]  # (1, C, z, y, x): one "slice", the whole volume
    elif dims == 2 and spatial == 3:
        stack = image.movedim(1 + slice_axis, 0)  # (S, C, a, b): slices along slice_axis, in-plane axes in order
    else:
        raise ValueError(f"patch {tuple(patch_size)} does not fit an image of shape {tuple(image.shape)} (C, z, y, x)")
    # Keep the input beside the accumulator: on the GPU when it fits there, else tiles travel one batch at a time.
    stack = stack.to(acc)
    patch = tuple(int(p) for p in patch_size)
    if whole_volume_divisor is not None and dims == spatial:
        patch = whole_volume_patch(stack.shape[2:], patch, whole_volume_divisor, step) or patch
    batch = batch_tiles or _auto_batch(patch)
    weights = tile_weights or gaussian_importance
    bar = _TileBar(progress, desc, len(flip_combinations(mirror_axes)))
    try:
        logits = _predict_stack(net, stack, patch, num_classes, step, batch, tuple(mirror_axes), device, acc,
                                weights, bar)
    finally:  # also when the GPU ran out of memory and the caller retries: no stale bar on the console
        bar.close()
    return logits[0] if dims == spatial else logits.movedim(0, 1 + slice_axis).contiguous()


def _predict_stack(
    net: torch.nn.Module,
    stack: torch.Tensor,
    patch: tuple[int, ...],
    num_classes: int,
    step: float,
    batch: int,
    mirror_axes: tuple[int, ...],
    device: torch.device,
    acc: torch.device,
    tile_weights: Callable[[Sequence[int]], torch.Tensor],
    bar: _TileBar,
) -> torch.Tensor:
    """Sliding window over each of the N images of ``stack`` ``(N, C, *spatial)``; returns ``(N, K, *spatial)``."""
    pads = _padding(stack.shape[2:], patch)
    padded = any(sum(p) for p in pads)
    if padded:
        # F.pad lists the last axis first.
        stack = F.pad(stack, [v for p in reversed(pads) for v in p], mode="constant", value=0.0)
    shape = tuple(stack.shape[2:])
    positions = list(itertools.product(*tile_starts(shape, patch, step)))
    single = len(positions) == 1  # the whole (padded) image is one tile: no weighting, no overlap
    n = stack.shape[0]
    out = torch.zeros((n, num_classes, *shape), dtype=torch.float32, device=acc)
    tile_map = None if single else tile_weights(patch).to(device=acc, dtype=torch.float32)
    items = [(i, pos) for pos in positions for i in range(n)]  # neighbouring 2D slices at one position batch together
    bar.start(len(items))
    for b in range(0, len(items), batch):
        chunk = items[b : b + batch]
        tiles = [_tile(pos, patch) for _, pos in chunk]
        x = torch.stack([stack[i][(slice(None), *sl)] for (i, _), sl in zip(chunk, tiles)]).to(device)
        # Few tiles (one, for a hippocampus case): spend the unused batch on flips, one pass instead of 2^k.
        flips = max(1, TILE_BATCH_VOXELS // (len(chunk) * int(np.prod(patch))))
        with autocast(device):
            y = mirrored_forward(net, x, mirror_axes, flips)
        if y.shape[1] != num_classes or tuple(y.shape[2:]) != patch:
            raise ValueError(f"network output {tuple(y.shape)} does not match {num_classes} classes x patch {patch}")
        y = y.to(acc)
        for (i, _), sl, tile_logits in zip(chunk, tiles, y):
            if single:
                out[i] = tile_logits
            else:
                out[i][(slice(None), *sl)] += tile_logits * tile_map
        bar.done(len(chunk))
    if not single:
        weight = torch.zeros(shape, dtype=torch.float32, device=acc)
        for pos in positions:
            weight[_tile(pos, patch)] += tile_map
        out /= weight
    if not padded:
        return out
    crop = tuple(slice(lo, s - hi) for (lo, hi), s in zip(pads, shape))
    return out[(slice(None), slice(None), *crop)].contiguous()  # a compact copy, not a view into the padding


class _TileBar:
    """The progress of one sliding window in tile passes (a tile through the network once: a tile's mirror flips
    are passes of their own), so a large case shows it is moving long before its case bar does."""

    def __init__(self, enabled: bool, desc: str, flips: int) -> None:
        self.enabled, self.desc, self.flips, self.bar = enabled, desc, flips, None

    def start(self, tiles: int) -> None:
        if not self.enabled:
            return
        what = f"{tiles} tile{'s' * (tiles != 1)}" + (f" x {self.flips} flips" if self.flips > 1 else "")
        self.bar = tqdm(total=tiles * self.flips, desc=f"{self.desc} ({what})",
                        unit="tile" if self.flips == 1 else "tile-flip", leave=False)

    def done(self, tiles: int) -> None:
        if self.bar is not None:
            self.bar.update(tiles * self.flips)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _tile(start: Sequence[int], patch: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(s, s + p) for s, p in zip(start, patch))
