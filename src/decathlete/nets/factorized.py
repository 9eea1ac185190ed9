"""Avetisian's U-Net with factorised convolutions: every 3D convolution becomes a series of 2D ones.

Avetisian, "Volumetric Medical Image Segmentation with Deep Convolutional Neural Networks" (Lomonosov Moscow State
University): a U-Net whose convolutional block is "four 2D convolutions along different axis", each followed by a
ReLU and a dropout, with max-pool downsampling, "upconvolutions" with a 1x1 kernel, concatenated skips, no batch
normalisation (it "is not beneficial ... and leads to numerical instabilities") and a dropout (keep probability 0.85)
right before the output layer. The topology (stages, widths, kernels, strides) comes from the planner, exactly as for
`decathlete.nets.unet.DynamicUNet`, so the network plugs into any plan.

What the paper leaves open, and what we chose:

* **The four convolutions.** 3D has only three axis pairs, so one pair must repeat. With the plan's kernel
  ``(kz, ky, kx)`` the block's kernels are, in array order, ``(1, ky, kx)``, ``(kz, 1, kx)``, ``(kz, ky, 1)``,
  ``(1, ky, kx)``: the in-plane pair ``(y, x)`` comes twice. After the planner's axis transposition axis 0 is the
  coarsest, so the in-plane axes carry the finest detail, and the block then starts and ends in the plane. An axis
  the plan gives kernel 1 (nnU-Net's anisotropic ``(1, 3, 3)`` stages) keeps kernel 1, so there the two through-plane
  convolutions become 1D ones along ``x`` and ``y``. In 2D there is a single plane: four ``(ky, kx)`` convolutions.
  The first convolution changes the width ``c_in -> c_out``, the other three keep ``c_out``.
* **Weights per block.** For ``c`` channels in and out four 3x3 convolutions hold ``36 c^2`` weights against
  ``27 c^2`` for one 3x3x3 convolution (the paper's "36 vs 27") and ``54 c^2`` for nnU-Net's stage of two;
  `block_weight_counts` measures these on real modules.
* **Dropout** is element-wise (``nn.Dropout``) after every activation, at the head's rate 0.15 by default
  (keep 0.85, the paper's only dropout value). No normalisation, so every convolution has a bias.
* **Downsampling**: max-pooling with kernel = stride = the plan's stride of the stage, per axis (the paper's 2x2x2
  when the plan is isotropic; an axis with stride 1 is not pooled).
* **The "1x1 up-convolution that upscales"**: a 1x1(x1) convolution ``features[s+1] -> features[s]`` followed by
  nearest-neighbour upsampling by the stage's stride. A literal 1x1 transposed convolution at stride 2 would write
  one voxel in 8 and leave the other 7 at the bias. Convolution-then-nearest equals a transposed convolution whose
  stride-sized kernel shares one weight over all its taps (a test checks it): the paper's 1x1 parameter count, and
  the convolution runs at the low resolution, ``prod(stride)`` times cheaper.
* **Skips**: ``cat([upsampled, skip])`` (skip second, as `DynamicUNet`), then the decoder's blocks ``2f -> f``.
* **Any input size.** The paper needed sizes ``2^3 * n`` so that upsampled maps match their skips. `forward` pads
  the input with zeros at the high end of every axis up to a multiple of the product of that axis' strides and crops
  the logits back. Zeros are what the "same" convolutions already see beyond every border; padding only the high end
  keeps input and output voxel indices aligned, so cropping is a slice.
* **No deep supervision**: the network has one head; `set_deep_supervision` is accepted and changes nothing, and
  the loss gets a single tensor (`decathlete.losses.deep_supervision.DeepSupervisionLoss` passes it straight on).
* **Initialisation**: Kaiming-normal convolutions for the activation's slope (0 for ReLU) and zero biases
  (`decathlete.nets.layers.he_init`). The paper's L2 regularisation of the filters is the optimiser's weight decay,
  not part of the network.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from decathlete.nets.base import SegmentationNet, check_topology
from decathlete.nets.layers import LayerSpec, conv_class, he_init, make_act, split_spec
from decathlete.registry import register_net

_POOLS = {2: nn.MaxPool2d, 3: nn.MaxPool3d}


def factorized_kernels(kernel: Sequence[int]) -> list[tuple[int, ...]]:
    """The four kernels of a factorised block for the plan's kernel ``(kz, ky, kx)`` or ``(ky, kx)``, in order.

    3D: ``(1, ky, kx)``, ``(kz, 1, kx)``, ``(kz, ky, 1)``, ``(1, ky, kx)`` (the in-plane pair twice, see the module
    docstring); 2D: ``(ky, kx)`` four times.
    """
    k = tuple(int(v) for v in kernel)
    if len(k) == 2:
        return [k] * 4
    if len(k) != 3:
        raise ValueError(f"a kernel needs 2 or 3 axes, got {list(kernel)}")
    kz, ky, kx = k
    return [(1, ky, kx), (kz, 1, kx), (kz, ky, 1), (1, ky, kx)]


class FactorizedBlock(nn.Sequential):
    """Four convolutions over axis pairs (`factorized_kernels`), each with bias, activation and element-wise dropout.

    Args:
        dims: 2 or 3 spatial axes.
        c_in: input channels (of the first convolution).
        c_out: output channels of every convolution.
        kernel: the plan's kernel per axis, array order.
        dropout: drop probability of the ``nn.Dropout`` after every activation.
        act: activation as a layer spec (default ReLU, the paper's).
    """

    def __init__(self, dims: int, c_in: int, c_out: int, kernel: Sequence[int], dropout: float,
                 act: LayerSpec = "relu") -> None:
        if len(kernel) != dims:
            raise ValueError(f"kernel {list(kernel)} has {len(kernel)} axes, expected {dims}")
        layers: list[nn.Module] = []
        for i, k in enumerate(factorized_kernels(kernel)):
            conv = conv_class(dims)(c_in if i == 0 else c_out, c_out, k, padding=tuple(v // 2 for v in k), bias=True)
            layers += [conv, make_act(act), nn.Dropout(dropout)]
        super().__init__(*layers)


def block_weight_counts(c_in: int, c_out: int, dims: int = 3) -> dict[str, int]:
    """Convolution weights (biases left out) of one factorised block against the 3D convolutions it replaces.

    Counted on modules built on the meta device (no memory), so the numbers follow the code.

    Args:
        c_in: input channels.
        c_out: output channels.
        dims: spatial axes of the factorised block (2D: four 3x3 convolutions; same count as 3D).

    Returns:
        ``factorized_block``: the block with plan kernel 3 on every axis (``36 c^2`` for ``c`` in and out);
        ``conv3x3x3``: one 3x3x3 convolution (``27 c_in c_out``); ``nnunet_stage``: nnU-Net's two 3x3x3 convolutions
        ``c_in -> c_out -> c_out``.
    """
    with torch.device("meta"):
        block = FactorizedBlock(dims, c_in, c_out, (3,) * dims, 0.0)
        first, second = nn.Conv3d(c_in, c_out, 3), nn.Conv3d(c_out, c_out, 3)
    convs = [m for m in block.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    return {
        "factorized_block": sum(m.weight.numel() for m in convs),
        "conv3x3x3": first.weight.numel(),
        "nnunet_stage": first.weight.numel() + second.weight.numel(),
    }


class UpConv(nn.Sequential):
    """The paper's 1x1 up-convolution: a 1x1 convolution, then nearest-neighbour upsampling by ``stride``.

    Equal to a transposed convolution with kernel = stride whose taps all share the 1x1 weight (module docstring).
    """

    def __init__(self, dims: int, c_in: int, c_out: int, stride: Sequence[int]) -> None:
        super().__init__(conv_class(dims)(c_in, c_out, 1, bias=True),
                         nn.Upsample(scale_factor=tuple(float(s) for s in stride), mode="nearest"))


def _counts(n_stages: int, n_blocks: int | Sequence[int], n_dec: int | Sequence[int]) -> tuple[list[int], list[int]]:
    """Blocks per encoder stage and per decoder stage, each at least 1 (a stage's first block changes the width)."""
    blocks = [n_blocks] * n_stages if isinstance(n_blocks, int) else [int(b) for b in n_blocks]
    dec = [n_dec] * (n_stages - 1) if isinstance(n_dec, int) else [int(b) for b in n_dec]
    if len(blocks) != n_stages or len(dec) != n_stages - 1:
        raise ValueError(f"need {n_stages} encoder block counts and {n_stages - 1} decoder block counts, "
                         f"got {len(blocks)} and {len(dec)}")
    if min(blocks + dec) < 1:
        raise ValueError("every stage needs at least one factorised block")
    return blocks, dec


def _init_slope(act: LayerSpec) -> float:
    """Negative slope for Kaiming initialisation: LeakyReLU's own, 0 for every other activation (ReLU's)."""
    name, kwargs = split_spec(act)
    return float(kwargs.get("negative_slope", 0.01)) if name == "leakyrelu" else 0.0


@register_net("factorized_unet")
class FactorizedUNet(SegmentationNet):
    """Avetisian's U-Net of factorised 2D convolutions, topology from a plan (see the module docstring).

    Args:
        in_channels: image channels.
        num_classes: output channels (classes, or regions for sigmoid outputs).
        spatial_dims: 2 or 3.
        features_per_stage: width of each encoder stage.
        kernel_sizes: per stage, the plan's kernel per axis in array order; each block factorises it.
        strides: per stage, the max-pool kernel and stride per axis before the stage; the first must be all ones.
        n_blocks_per_stage: factorised blocks per encoder stage (int or one per stage).
        n_conv_per_stage_decoder: factorised blocks per decoder stage (int or one per stage but the lowest).
        dropout: drop probability after every activation.
        head_dropout: drop probability right before the 1x1 output convolution (paper: 1 - 0.85).
        act: activation as a layer spec (paper: ReLU).
        deep_supervision: accepted for the planner's sake; the network always returns one tensor.
    """

    plan_free_kwargs = ("dropout", "head_dropout", "act")

    def __init__(self, in_channels: int, num_classes: int, *, spatial_dims: int, features_per_stage: Sequence[int],
                 kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                 n_blocks_per_stage: int | Sequence[int] = 1, n_conv_per_stage_decoder: int | Sequence[int] = 1,
                 dropout: float = 0.15, head_dropout: float = 0.15, act: LayerSpec = "relu",
                 deep_supervision: bool = False) -> None:
        super().__init__()
        dims, feats = spatial_dims, [int(f) for f in features_per_stage]
        check_topology(dims, len(feats), kernel_sizes, strides)
        blocks, dec_blocks = _counts(len(feats), n_blocks_per_stage, n_conv_per_stage_decoder)
        self.strides = [tuple(int(v) for v in s) for s in strides]
        # per axis, the product of the strides: input sizes that are multiples of it need no padding
        self.divisor = [math.prod(axis) for axis in zip(*self.strides)]
        self.encoder = nn.ModuleList()
        c_in = in_channels
        for s, c_out in enumerate(feats):
            layers: list[nn.Module] = [_POOLS[dims](self.strides[s], self.strides[s])] if s > 0 else []
            layers += [FactorizedBlock(dims, c_in if i == 0 else c_out, c_out, kernel_sizes[s], dropout, act)
                       for i in range(blocks[s])]
            self.encoder.append(nn.Sequential(*layers))
            c_in = c_out
        self.upsample, self.decoder = nn.ModuleList(), nn.ModuleList()
        for s in range(len(feats) - 2, -1, -1):
            self.upsample.append(UpConv(dims, feats[s + 1], feats[s], self.strides[s + 1]))
            self.decoder.append(nn.Sequential(*[
                FactorizedBlock(dims, 2 * feats[s] if i == 0 else feats[s], feats[s], kernel_sizes[s], dropout, act)
                for i in range(dec_blocks[s])]))
        self.head = nn.Sequential(nn.Dropout(head_dropout), conv_class(dims)(feats[0], num_classes, 1, bias=True))
        self.apply(functools.partial(he_init, negative_slope=_init_slope(act)))

    def set_deep_supervision(self, enabled: bool) -> None:
        """Accepted and ignored: the network has a single full-resolution output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, *spatial)`` for an input ``(B, in_channels, *spatial)`` of any spatial size."""
        size = x.shape[2:]
        pad = [(-n) % d for n, d in zip(size, self.divisor)]
        if any(pad):
            # F.pad lists (low, high) pairs from the last axis backwards
            x = F.pad(x, [v for p in reversed(pad) for v in (0, p)])
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        for i, (up, dec) in enumerate(zip(self.upsample, self.decoder)):
            x = dec(torch.cat([up(x), skips[-(i + 2)]], dim=1))
        logits = self.head(x)
        return logits[(..., *(slice(0, n) for n in size))] if any(pad) else logits
