"""SegResNet (Myronenko 2018, https://arxiv.org/abs/1810.11654): an asymmetric residual encoder-decoder, with the
variational auto-encoder branch that regularises its encoder in training.

Encoder: a 3x3x3 convolution to the first width, spatial dropout, then per level a strided 3x3x3 convolution (not on
the first level) and ``n_blocks_per_stage`` pre-activation residual blocks (GroupNorm, ReLU, conv, twice, identity
added). Decoder, one level per encoder level below the first: a 1x1x1 convolution halving the features, linear
upsampling to the skip's grid, the encoder's output at that level **added**, ``n_conv_per_stage_decoder`` residual
blocks; the head is GroupNorm, ReLU and a 1x1x1 convolution to the outputs. No deep supervision.

VAE branch (``vae=True``, training mode only): GroupNorm, ReLU, a stride-2 convolution to 16 channels, GroupNorm,
ReLU, one dense layer to ``2 * latent`` values (means and log-variances), a sample, a dense layer back, ReLU, reshape,
a 1x1x1 convolution to the bottleneck width, upsampling, GroupNorm, ReLU, then the decoder's levels again (own
weights, no skips) and a head to the input channels. The dense layers are sized for the training patch
(``train_patch_size``, written into the plan); in eval mode the branch is not run, so the sliding window may use any
tile size.

Where the paper's Table 1 is silent we follow MONAI's ``SegResNetVAE``, the reference implementation most users know:
convolutions without bias except the heads and the VAE's strided convolution, a GroupNorm + ReLU after the VAE's
strided convolution and after its first upsampling, and linear (not trainable) upsampling. Two choices differ from
MONAI and follow the paper: the VAE decoder has its own weights (MONAI reuses the segmentation decoder's), and it
estimates the standard deviation (MONAI's default is a fixed 0.3); the parameter-count test states the difference
exactly. Upsampling goes to the grid of the level it joins, so sizes that are not a multiple of 16 work too.

Topology comes from the plan like the U-Net's (strides and kernels per level, features per level), so anisotropic
data keeps the planner's per-axis choices; a recipe asks for the paper's four levels with ``planning.max_stages``.
GroupNorm uses 8 groups, or the largest divisor of the channel count below 8 (`decathlete.nets.layers.group_norm`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from decathlete.nets import layers
from decathlete.nets.base import NetOutput, SegmentationNet
from decathlete.registry import register_net

VAE_CHANNELS = 16  # the paper's "Conv (16) stride 2" before the dense layer


def group_norm(channels: int) -> nn.GroupNorm:
    return layers.group_norm(channels, 0, groups=8)


def _conv(dims: int, c_in: int, c_out: int, kernel: Sequence[int] | int = 3, stride: Sequence[int] | int = 1,
          bias: bool = False) -> nn.Module:
    kernel = [kernel] * dims if isinstance(kernel, int) else list(kernel)
    stride = [stride] * dims if isinstance(stride, int) else list(stride)
    return layers.standard_conv(dims, c_in, c_out, kernel, stride, bias=bias)


class PreActBlock(nn.Module):
    """GroupNorm, ReLU, conv, GroupNorm, ReLU, conv, plus the input (the paper's ResNet block)."""

    def __init__(self, dims: int, channels: int, kernel: Sequence[int]) -> None:
        super().__init__()
        self.norm1, self.conv1 = group_norm(channels), _conv(dims, channels, channels, kernel)
        self.norm2, self.conv2 = group_norm(channels), _conv(dims, channels, channels, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(y))) + x


def _head(dims: int, channels: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(group_norm(channels), nn.ReLU(), _conv(dims, channels, outputs, 1, bias=True))


def _upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    mode = "trilinear" if x.ndim == 5 else "bilinear"
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)


class Decoder(nn.Module):
    """Per level, deepest first: 1x1 conv halving the features, upsampling to the level's grid, optional skip added,
    residual blocks; then the head."""

    def __init__(self, dims: int, features: Sequence[int], kernels: Sequence[Sequence[int]], blocks: int,
                 outputs: int) -> None:
        super().__init__()
        levels = range(len(features) - 1, 0, -1)
        self.reduce = nn.ModuleList(_conv(dims, features[i], features[i - 1], 1) for i in levels)
        self.blocks = nn.ModuleList(nn.Sequential(*[PreActBlock(dims, features[i - 1], kernels[i - 1])
                                                    for _ in range(blocks)]) for i in levels)
        self.head = _head(dims, features[0], outputs)

    def forward(self, x: torch.Tensor, sizes: Sequence[Sequence[int]],
                skips: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """``sizes`` (and ``skips``) per level, finest first, without the deepest."""
        for j, (reduce, blocks) in enumerate(zip(self.reduce, self.blocks)):
            level = len(sizes) - 1 - j
            x = _upsample(reduce(x), sizes[level])
            if skips is not None:
                x = x + skips[level]
            x = blocks(x)
        return self.head(x)


@register_net("segresnet")
class SegResNet(SegmentationNet):
    """SegResNet with an optional VAE branch (see the module docstring).

    Args:
        in_channels, num_classes: input channels and outputs (classes or regions).
        spatial_dims: 2 or 3.
        features_per_stage: width of each level (the paper: 32, 64, 128, 256).
        kernel_sizes: per level, the kernel per axis (3 on every axis in the paper).
        strides: per level, the stride per axis; the first level's is ignored (the paper: 2 on every axis).
        n_blocks_per_stage: residual blocks per encoder level (the paper: 1, 2, 2, 4).
        n_conv_per_stage_decoder: residual blocks per decoder level (the paper: 1).
        vae: build the VAE branch (run in training mode only).
        train_patch_size: the training patch, which sizes the VAE's dense layers (from the plan).
        latent: latent dimensions (the paper: 128 means and 128 log-variances).
        dropout: spatial (channel) dropout after the first convolution (the paper: 0.2).
    """

    plan_patch_size = True

    plan_free_kwargs = ("dropout",)

    def __init__(self, in_channels: int, num_classes: int, spatial_dims: int = 3,
                 features_per_stage: Sequence[int] = (32, 64, 128, 256),
                 kernel_sizes: Sequence[Sequence[int]] | None = None, strides: Sequence[Sequence[int]] | None = None,
                 n_blocks_per_stage: int | Sequence[int] = (1, 2, 2, 4), n_conv_per_stage_decoder: int = 1,
                 vae: bool = False, train_patch_size: Sequence[int] | None = None, latent: int = 128,
                 dropout: float = 0.2) -> None:
        super().__init__()
        dims, features = spatial_dims, [int(f) for f in features_per_stage]
        n = len(features)
        kernels = [list(k) for k in kernel_sizes] if kernel_sizes is not None else [[3] * dims] * n
        strides = [list(s) for s in strides] if strides is not None else [[1] * dims] + [[2] * dims] * (n - 1)
        blocks = [n_blocks_per_stage] * n if isinstance(n_blocks_per_stage, int) else list(n_blocks_per_stage)
        if not len(kernels) == len(strides) == len(blocks) == n:
            raise ValueError(f"SegResNet needs one kernel, stride and block count per level ({n} levels), got "
                             f"{len(kernels)}, {len(strides)} and {len(blocks)}")
        if vae and train_patch_size is None:
            raise ValueError("SegResNet(vae=True) needs train_patch_size: its dense layers are sized for the patch")
        self.dims, self.vae = dims, vae
        self.stem = _conv(dims, in_channels, features[0], kernels[0])
        self.dropout = (nn.Dropout3d if dims == 3 else nn.Dropout2d)(dropout) if dropout > 0 else nn.Identity()
        self.down = nn.ModuleList(nn.Identity() if i == 0 else _conv(dims, features[i - 1], features[i],
                                                                     kernels[i], strides[i]) for i in range(n))
        self.encoder = nn.ModuleList(nn.Sequential(*[PreActBlock(dims, features[i], kernels[i])
                                                     for _ in range(blocks[i])]) for i in range(n))
        self.decoder = Decoder(dims, features, kernels, n_conv_per_stage_decoder, num_classes)
        if vae:
            self._build_vae(in_channels, features, kernels, strides, n_conv_per_stage_decoder,
                            [int(s) for s in train_patch_size], latent)

    def _build_vae(self, in_channels: int, features: list[int], kernels: list[list[int]],
                   strides: list[list[int]], blocks: int, patch: list[int], latent: int) -> None:
        dims, deepest = self.dims, features[-1]
        grid = list(patch)
        for stride in strides[1:]:
            grid = [math.ceil(g / s) for g, s in zip(grid, stride)]
        self.vae_grid = [math.ceil(g / 2) for g in grid]  # after the stride-2 convolution (padding 1, kernel 3)
        flat = VAE_CHANNELS * math.prod(self.vae_grid)
        self.vae_down = nn.Sequential(group_norm(deepest), nn.ReLU(), _conv(dims, deepest, VAE_CHANNELS, 3, 2, True),
                                      group_norm(VAE_CHANNELS), nn.ReLU())
        self.vae_encode = nn.Linear(flat, 2 * latent)
        self.vae_decode = nn.Linear(latent, flat)
        self.vae_expand = _conv(dims, VAE_CHANNELS, deepest, 1)
        self.vae_expand_norm = nn.Sequential(group_norm(deepest), nn.ReLU())
        self.vae_decoder = Decoder(dims, features, kernels, blocks, in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor | NetOutput:
        """Logits ``(B, K, *spatial)``; in training mode with the VAE, a `NetOutput` whose auxiliaries hold the
        ``reconstruction`` of the input and the latent ``mean`` and ``log_variance``."""
        sizes, skips = [], []
        h = self.dropout(self.stem(x))
        for down, blocks in zip(self.down, self.encoder):
            h = blocks(down(h))
            sizes.append(h.shape[2:])
            skips.append(h)
        logits = self.decoder(h, sizes[:-1], skips[:-1])
        if not (self.vae and self.training):
            return logits
        return NetOutput(logits, self._vae(h, sizes))

    def _vae(self, h: torch.Tensor, sizes: list[torch.Size]) -> dict[str, torch.Tensor]:
        code = self.vae_encode(self.vae_down(h).flatten(1))
        mean, log_variance = code.chunk(2, dim=1)
        sample = mean + torch.exp(0.5 * log_variance) * torch.randn_like(mean)
        v = F.relu(self.vae_decode(sample)).view(-1, VAE_CHANNELS, *self.vae_grid)
        v = self.vae_expand_norm(_upsample(self.vae_expand(v), sizes[-1]))
        reconstruction = self.vae_decoder(v, sizes[:-1])
        return {"reconstruction": reconstruction, "mean": mean, "log_variance": log_variance}

    @classmethod
    def feature_map_elements(cls, patch_size: Sequence[int], in_channels: int, num_classes: int,
                             **kwargs: Any) -> int:
        """Activation elements of one training sample, measured on the meta device (the VAE sized for the patch)."""
        if kwargs.get("vae"):
            kwargs = {**kwargs, "train_patch_size": list(patch_size)}
        return super().feature_map_elements(patch_size, in_channels, num_classes, **kwargs)
