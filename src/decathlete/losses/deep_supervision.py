"""Deep supervision: one loss per decoder resolution, weighted, as in nnU-Net.

nnU-Net (Isensee et al. 2021, https://doi.org/10.1038/s41592-020-01008-z) weights the outputs, full resolution
first, by 1/2^i, sets the weight of the lowest resolution to 0 and normalises the weights to sum to 1. Targets for
the lower resolutions are the full-resolution target sampled onto each output's grid (`downsample_target`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from decathlete.registry import build, register_loss


def ds_weights(n_outputs: int, last_weight: float = 0.0) -> list[float]:
    """Deep-supervision weights ∝ 1/2^i for i = 0..n-1, the lowest resolution set to ``last_weight``, summing to 1.

    Args:
        n_outputs: number of network outputs, full resolution first.
        last_weight: raw weight of the lowest resolution before normalising. nnU-Net uses 0, and 1e-6 under DDP so
            that the lowest head still receives a gradient (DDP fails on parameters without one); pass 1e-6 there,
            or let DDP find unused parameters.

    Returns:
        ``n_outputs`` weights, e.g. ``[2/3, 1/3, 0]`` for 3 outputs. A single output gets ``[1.0]``.

    Raises:
        ValueError: when ``n_outputs`` < 1.
    """
    if n_outputs < 1:
        raise ValueError(f"n_outputs must be at least 1, got {n_outputs}")
    if n_outputs == 1:
        return [1.0]  # nnU-Net would zero its only weight and divide by 0
    raw = [1 / 2**i for i in range(n_outputs)]
    raw[-1] = last_weight
    total = sum(raw)
    return [w / total for w in raw]


def ds_factors(strides: Sequence[Sequence[int]]) -> list[list[int]]:
    """Downsampling factor per axis of each deep-supervision output, full resolution first.

    The network has one head per stage but the lowest: output ``s`` lives on the grid of encoder stage ``s``, whose
    factor is the product of the strides of stages ``0..s`` (nnU-Net's ``deep_supervision_scales``, as integers).

    Args:
        strides: per-stage strides per axis (z, y, x), as in plans.json.

    Returns:
        ``len(strides) - 1`` integer factors per axis, e.g. ``[[1, 1, 1], [1, 2, 2]]`` for
        ``[[1, 1, 1], [1, 2, 2], [2, 2, 2]]``.
    """
    cumulative = np.cumprod(np.asarray(strides, dtype=np.int64), axis=0)
    return [[int(f) for f in row] for row in cumulative[:-1]]


def _nearest_exact(n: int, f: int) -> slice | torch.Tensor:
    """Input indices of ``ceil(n / f)`` outputs sampled as ``F.interpolate(mode="nearest-exact")``:
    ``floor((i + 0.5) * n / out)``, the voxel nearest each output's centre; a strided slice when ``f`` divides ``n``."""
    out = -(-n // f)
    if n % f == 0:
        return slice(f // 2, None, f)
    return ((torch.arange(out, dtype=torch.float64) + 0.5) * n / out).floor().long().clamp_(max=n - 1)


def downsample_target(target: torch.Tensor, factors: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """The target on each output's grid by nearest-neighbour sampling aligned as nnU-Net's: ``nearest-exact``.

    nnU-Net v2 (batchgeneratorsv2's DownsampleSegForDSTransform) resizes the target with
    ``F.interpolate(mode="nearest-exact")``, which for a factor ``f`` dividing the size keeps voxel
    ``f * i + f // 2`` (the centre of each ``f``-block, rounded up), i.e. ``target[..., f//2::f]``; a stride-``f``
    convolution's output ``i`` is centred on voxel ``f * i`` instead, half a block earlier. We follow nnU-Net (its
    accuracy is the reference; mirroring in training makes the half-block offset symmetric on average). The grid is
    the convolution's, ``ceil(n / f)`` voxels; divisible sizes (all nnU-Net plans) give views, others an index copy.
    Labels are never invented and an ignore value (-1) stays as it is. Label maps and region masks, 2D and 3D.

    Args:
        target: ``(B, C, *spatial)`` target (label map with C = 1, or region masks).
        factors: per output, one integer factor per spatial axis (see `ds_factors`).

    Returns:
        One tensor per entry of ``factors``.

    Raises:
        ValueError: when a factor's length differs from the number of spatial axes.
    """
    spatial = target.ndim - 2
    results = []
    for factor in factors:
        if len(factor) != spatial:
            raise ValueError(f"factor {list(factor)} has {len(factor)} axes, the target {spatial} spatial axes")
        out = target
        for axis, f in enumerate(factor):
            index = _nearest_exact(target.shape[2 + axis], int(f))
            if isinstance(index, slice):
                out = out[(slice(None),) * (2 + axis) + (index,)]
            else:
                out = out.index_select(2 + axis, index.to(target.device))
        results.append(out)
    return results


LossSpec = nn.Module | str | Sequence[Any] | Mapping[str, Any]


def _build_loss(loss: LossSpec) -> nn.Module:
    """A module as it is; a registry key, a ``(key, kwargs)`` pair or a ``{"name", "kwargs"}`` mapping, built."""
    if isinstance(loss, nn.Module):
        return loss
    if isinstance(loss, str):
        return build("losses", loss)
    if isinstance(loss, Mapping):  # a recipe ``Spec`` written out as JSON
        return build("losses", loss["name"], **dict(loss.get("kwargs") or {}))
    name, kwargs = loss
    return build("losses", name, **dict(kwargs or {}))


@register_loss("deep_supervision")
class DeepSupervisionLoss(nn.Module):
    """Weighted sum of one loss over the outputs of a deep-supervised network, full resolution first.

    Args:
        loss: the loss applied at every resolution: a module, a registry key, a ``(key, kwargs)`` pair
            (JSON-friendly, e.g. ``["dice_ce", {"batch_dice": true}]``) or a recipe ``Spec`` as a dict.
        weights: one weight per output, or None for ``ds_weights(len(outputs))``.
            Terms with weight 0 are not computed.
    """

    def __init__(self, loss: LossSpec = "dice_ce", weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.loss = _build_loss(loss)
        self.weights = None if weights is None else [float(w) for w in weights]

    def forward(
        self, outputs: torch.Tensor | Sequence[torch.Tensor], targets: torch.Tensor | Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Weighted sum of ``loss(outputs[i], targets[i])``; a scalar tensor.

        Args:
            outputs: network outputs, full resolution first; a single tensor is passed straight to the loss.
            targets: one target per output on that output's grid (see `downsample_target`).

        Raises:
            ValueError: when the numbers of outputs, targets and weights differ.
        """
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, targets if isinstance(targets, torch.Tensor) else targets[0])
        if isinstance(targets, torch.Tensor):
            raise ValueError("deep supervision needs one target per output; build them with downsample_target")
        weights = self.weights if self.weights is not None else ds_weights(len(outputs))
        if not len(outputs) == len(targets) == len(weights):
            raise ValueError(f"{len(outputs)} outputs, {len(targets)} targets and {len(weights)} weights must agree")
        terms = [w * self.loss(o, t) for w, o, t in zip(weights, outputs, targets) if w != 0]
        return torch.stack(terms).sum() if terms else outputs[0].sum() * 0.0
