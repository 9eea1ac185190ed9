"""Dynamic U-Net built from a plan: per-stage kernel sizes and strides per axis, 2D or 3D, plain or residual encoder.

The architecture follows nnU-Net's generic U-Net (Isensee et al. 2021, https://doi.org/10.1038/s41592-020-01008-z)
and its residual-encoder variant ("nnU-Net Revisited", Isensee et al. 2024, https://arxiv.org/abs/2404.09556):
conv–InstanceNorm–LeakyReLU(0.01) blocks, strided convolutions for downsampling, transposed convolutions for
upsampling, and a 1×1 segmentation head at every decoder level but the lowest for deep supervision. Weights start
as nnU-Net's do: Kaiming-normal convolutions (`decathlete.nets.layers.he_init`) and, in residual blocks, a zeroed
last norm (`zero_last_norm`).

``feature_map_elements`` counts the activations the network produces for a patch *from the same description* that
builds the module; the planner uses it to fit patch and batch to a memory budget (``planning/rules.py``), and a test
checks it against forward hooks on a real instance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from decathlete.nets.base import SegmentationNet
from decathlete.nets.layers import LayerSpec, conv_class, he_init, make_act, make_conv, make_norm
from decathlete.registry import register_net

DEFAULT_NORM: LayerSpec = ("instance", {"affine": True, "eps": 1e-5})
DEFAULT_ACT: LayerSpec = ("leakyrelu", {"negative_slope": 0.01})
INITS = ("he", "torch")


class ConvNormAct(nn.Sequential):
    """Convolution (no bias: the norm removes it), normalisation, activation; ``conv`` is a layer spec."""

    def __init__(self, dims: int, c_in: int, c_out: int, kernel: Sequence[int], stride: Sequence[int],
                 norm: LayerSpec, act: LayerSpec | None, conv: LayerSpec = "conv") -> None:
        super().__init__(make_conv(conv, dims, c_in, c_out, kernel, stride), make_norm(norm, c_out, dims),
                         make_act(act) if act is not None else nn.Identity())


class ResidualBlock(nn.Module):
    """Basic residual block (two convs) with an average-pool + 1×1 projection shortcut, as nnU-Net's BasicBlockD."""

    def __init__(self, dims: int, c_in: int, c_out: int, kernel: Sequence[int], stride: Sequence[int],
                 norm: LayerSpec, act: LayerSpec, conv: LayerSpec = "conv") -> None:
        super().__init__()
        self.conv1 = ConvNormAct(dims, c_in, c_out, kernel, stride, norm, act, conv)
        self.conv2 = ConvNormAct(dims, c_out, c_out, kernel, [1] * dims, norm, None, conv)
        shortcut: list[nn.Module] = []
        if any(s != 1 for s in stride):
            pool = nn.AvgPool3d if dims == 3 else nn.AvgPool2d
            shortcut.append(pool(tuple(stride), tuple(stride)))
        if c_in != c_out:
            shortcut += [conv_class(dims)(c_in, c_out, 1, bias=False), make_norm(norm, c_out, dims)]
        self.shortcut = nn.Sequential(*shortcut)
        self.act = make_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


def zero_last_norm(module: nn.Module) -> None:
    """nnU-Net ResEnc's ``init_last_bn_before_add_to_0``: a residual block's last norm starts at weight and bias 0,
    so every block starts as its shortcut; use as ``net.apply(zero_last_norm)``."""
    if isinstance(module, ResidualBlock):
        norm = module.conv2[1]
        if getattr(norm, "weight", None) is not None:
            nn.init.zeros_(norm.weight)
        if getattr(norm, "bias", None) is not None:
            nn.init.zeros_(norm.bias)


def _stage(block: str, dims: int, c_in: int, c_out: int, kernel: Sequence[int], stride: Sequence[int], n: int,
           norm: LayerSpec, act: LayerSpec, conv: LayerSpec) -> nn.Sequential:
    """``n`` blocks; the first one carries the stride and the change of width."""
    layers: list[nn.Module] = []
    for i in range(n):
        first = i == 0
        args = (dims, c_in if first else c_out, c_out, kernel, stride if first else [1] * dims, norm, act, conv)
        layers.append(ResidualBlock(*args) if block == "residual" else ConvNormAct(*args))
    return nn.Sequential(*layers)


@register_net("unet")
class DynamicUNet(SegmentationNet):
    """U-Net whose topology comes from a plan.

    Args:
        in_channels: image channels.
        num_classes: output channels (classes, or regions for sigmoid outputs).
        spatial_dims: 2 or 3.
        features_per_stage: output width of each encoder stage, e.g. [32, 64, 128, 256, 320, 320].
        kernel_sizes: per stage, one kernel size per spatial axis in array order (z, y, x) or (y, x).
        strides: per stage, the downsampling of its first block per axis; the first is usually all ones.
        n_blocks_per_stage: encoder blocks per stage (convs for ``plain``, residual blocks for ``residual``).
        n_conv_per_stage_decoder: convs per decoder stage (len = stages - 1).
        block: ``plain`` or ``residual`` (residual encoder; nnU-Net ResEnc puts a stem conv before it).
        norm: normalisation as a name or ``(name, kwargs)``.
        act: activation as a name or ``(name, kwargs)``.
        deep_supervision: when True, ``forward`` returns a list of logits, full resolution first.
        conv: the convolution of every block, a layer spec (registry kind ``convs``; default a plain one).
        init: initial weights: ``he`` (nnU-Net's: Kaiming-normal convolutions, zero biases, residual blocks' last norm
            zeroed) or ``torch`` (PyTorch's defaults: ~2.4x smaller convolution weights, which before a norm layer
            means a ~6x larger effective learning rate at the start; a budget plan's short schedule learns faster
            with it, see `decathlete.planning.budget`).
    """

    def __init__(self, in_channels: int, num_classes: int, *, spatial_dims: int, features_per_stage: Sequence[int],
                 kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                 n_blocks_per_stage: int | Sequence[int] = 2, n_conv_per_stage_decoder: int | Sequence[int] = 2,
                 block: str = "plain", norm: LayerSpec = DEFAULT_NORM, act: LayerSpec = DEFAULT_ACT,
                 deep_supervision: bool = True, conv: LayerSpec = "conv", init: str = "he") -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got '{init}'")
        cfg = _normalise_args(len(features_per_stage), n_blocks_per_stage, n_conv_per_stage_decoder, block)
        blocks, dec_convs = cfg
        dims, feats = spatial_dims, list(features_per_stage)
        self.deep_supervision = deep_supervision
        self.stem = ConvNormAct(dims, in_channels, feats[0], kernel_sizes[0], [1] * dims, norm, act, conv) \
            if block == "residual" else None
        self.encoder = nn.ModuleList()
        c_in = feats[0] if self.stem is not None else in_channels
        for s, c_out in enumerate(feats):
            self.encoder.append(_stage(block, dims, c_in, c_out, kernel_sizes[s], strides[s], blocks[s], norm, act,
                                       conv))
            c_in = c_out
        self.upsample, self.decoder, self.heads = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for s in range(len(feats) - 2, -1, -1):
            self.upsample.append(conv_class(dims, transposed=True)(
                feats[s + 1], feats[s], tuple(strides[s + 1]), tuple(strides[s + 1]), bias=False))
            self.decoder.append(_stage("plain", dims, 2 * feats[s], feats[s], kernel_sizes[s], [1] * dims,
                                       dec_convs[s], norm, act, conv))
            self.heads.append(conv_class(dims)(feats[s], num_classes, 1, bias=True))
        if init == "he":
            self.apply(he_init)
            self.apply(zero_last_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.stem is not None:
            x = self.stem(x)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        outputs = []
        for i, (up, dec) in enumerate(zip(self.upsample, self.decoder)):
            x = dec(torch.cat([up(x), skips[-(i + 2)]], dim=1))
            if self.deep_supervision or i == len(self.decoder) - 1:
                outputs.append(self.heads[i](x))
        outputs.reverse()  # full resolution first
        return outputs if self.deep_supervision else outputs[0]

    @classmethod
    def feature_map_elements(cls, patch_size: Sequence[int], in_channels: int, num_classes: int,
                             **kwargs: Any) -> int:
        """Activation elements per sample: summed output sizes of every convolution, transposed convolution and head.

        A closed form for plain convolutions (planning calls it for every candidate patch); with another ``conv``
        spec the generic meta-device count of `SegmentationNet` is used. Args are the constructor's.
        """
        if kwargs.get("conv", "conv") != "conv":
            return super().feature_map_elements(patch_size, in_channels, num_classes, **kwargs)
        return _closed_form_elements(patch_size, in_channels, num_classes, **kwargs)


def _closed_form_elements(patch_size: Sequence[int], in_channels: int, num_classes: int, *,
                          features_per_stage: Sequence[int], strides: Sequence[Sequence[int]],
                          n_blocks_per_stage: int | Sequence[int] = 2,
                          n_conv_per_stage_decoder: int | Sequence[int] = 2, block: str = "plain",
                          deep_supervision: bool = True, **_: Any) -> int:
    """`DynamicUNet.feature_map_elements` for plain convolutions, counted stage by stage."""
    blocks, dec_convs = _normalise_args(len(features_per_stage), n_blocks_per_stage, n_conv_per_stage_decoder,
                                        block)
    feats = list(features_per_stage)
    size = np.array(patch_size, dtype=np.int64)
    residual = block == "residual"
    total = int(feats[0] * size.prod()) if residual else 0  # stem
    c_in = feats[0] if residual else in_channels
    sizes = []
    for s, c in enumerate(feats):
        size = size // np.array(strides[s])
        sizes.append(size.copy())
        voxels = int(size.prod())
        total += c * voxels * blocks[s] * (2 if residual else 1)
        if residual and c_in != c:
            total += c * voxels  # 1x1 projection on the shortcut of the first block
        c_in = c
    for s in range(len(feats) - 2, -1, -1):
        voxels = int(sizes[s].prod())
        total += feats[s] * voxels * (1 + dec_convs[s])  # transposed conv + decoder convs
        if deep_supervision or s == 0:
            total += num_classes * voxels
    return total


def _normalise_args(n_stages: int, n_blocks: int | Sequence[int], n_dec: int | Sequence[int],
                    block: str) -> tuple[list[int], list[int]]:
    if block not in ("plain", "residual"):
        raise ValueError(f"block must be 'plain' or 'residual', got '{block}'")
    blocks = [n_blocks] * n_stages if isinstance(n_blocks, int) else list(n_blocks)
    dec = [n_dec] * (n_stages - 1) if isinstance(n_dec, int) else list(n_dec)
    if len(blocks) != n_stages or len(dec) != n_stages - 1:
        raise ValueError(f"need {n_stages} encoder block counts and {n_stages - 1} decoder conv counts, "
                         f"got {len(blocks)} and {len(dec)}")
    return blocks, dec
