"""Mirroring test-time augmentation: the mean of the logits over every combination of flips.

For ``k`` mirror axes the network runs ``2**k`` times (8 in 3D with all axes) on flipped copies of the batch, each
output is flipped back, and the LOGITS are averaged, as nnU-Net v2 does (``_internal_maybe_mirror_and_predict``).
Averaging logits rather than softmax probabilities is the geometric mean of the flips' class distributions: a
flip that is confidently right is not diluted by one that is unsure. It is applied per batch of tiles inside the
sliding window (`decathlete.infer.sliding_window`), also as in nnU-Net, so a tile is never held more than once.

Axes are spatial axes of the patch: 0 = z in 3D (or the first in-plane axis in 2D); the batch and channel axes of
the input ``(B, C, *spatial)`` are not counted.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch


def flip_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of ``mirror_axes``, the empty one (no flip) first: ``2**len(mirror_axes)`` tuples."""
    axes = sorted(set(int(a) for a in mirror_axes))
    return [combo for n in range(len(axes) + 1) for combo in itertools.combinations(axes, n)]


def forward_logits(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The full-resolution logits of ``net`` on ``x``: the first output of a deep-supervision list or tuple."""
    out = net(x)
    if isinstance(out, (list, tuple)):
        out = out[0]
    return out


def mirrored_forward(
    net: torch.nn.Module, x: torch.Tensor, mirror_axes: Sequence[int] = (), flips_per_pass: int = 1
) -> torch.Tensor:
    """Logits of ``net`` on ``x`` averaged over all flips along ``mirror_axes``.

    Args:
        net: segmentation network mapping ``(B, C, *spatial)`` to ``(B, K, *spatial)`` logits (or a list of them,
            full resolution first).
        x: input batch ``(B, C, *spatial)``.
        mirror_axes: spatial axes to mirror (0-based over ``*spatial``); empty = a single plain forward pass.
        flips_per_pass: flipped copies concatenated into one forward pass (batch ``B * flips_per_pass``); the
            result is the same for any network that treats the samples of a batch independently, as networks in
            eval mode do. Measured for one 32x48x32 hippocampus tile, 8 flips: H100, default U-Net, 6.7 ms
            batched vs 38.8 ms one by one; CPU (1 thread), tiny U-Net 0.40 s vs 1.80 s, default U-Net 3.66 s
            vs 3.46 s (6% slower, within this VM's noise).

    Returns:
        float32 logits ``(B, K, *spatial)``.

    Raises:
        ValueError: an axis outside the spatial axes of ``x``.
    """
    spatial = x.ndim - 2
    if any(not 0 <= int(a) < spatial for a in mirror_axes):
        raise ValueError(f"mirror axes {tuple(mirror_axes)} do not fit an input with {spatial} spatial axes")
    combos = flip_combinations(mirror_axes)
    total: torch.Tensor | None = None
    per_pass = max(1, flips_per_pass)
    for g in range(0, len(combos), per_pass):
        group = [[a + 2 for a in combo] for combo in combos[g : g + per_pass]]
        flipped = [torch.flip(x, dims) if dims else x for dims in group]
        batch = flipped[0] if len(flipped) == 1 else torch.cat(flipped)
        outs = forward_logits(net, batch).float().split(x.shape[0])  # fp16 under autocast: sum in float32
        for dims, out in zip(group, outs):
            out = torch.flip(out, dims) if dims else out
            total = out.clone() if total is None else total.add_(out)
    assert total is not None
    return total.div_(len(combos)) if len(combos) > 1 else total
