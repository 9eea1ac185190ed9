"""Isensee et al. 2017's 3D U-Net ("Brain tumor segmentation and radiomics survival prediction: contribution to the
BRATS 2017 challenge", https://arxiv.org/abs/1802.10508), the network van den Hork et al. trained for the Decathlon
pancreas task through Po-Yu Kao's PyTorch port, with its topology (stages, widths, kernels, strides) from the planner
like `decathlete.nets.unet.DynamicUNet`.

* **Context pathway.** Stage 0 is a convolution ``in_channels -> f0`` at stride 1, stage ``s > 0`` a convolution
  ``f[s-1] -> f[s]`` at the plan's stride ``strides[s]``; each is followed by ``n_blocks_per_stage[s]`` context
  modules, pre-activation residual blocks ``x + conv(drop(act(norm(conv(act(norm(x)))))))``, and then one norm and
  activation. That closing pair is in Isensee's code (``BatchNormLayer`` + ``NonlinearityLayer`` after every
  ``ElemwiseSumLayer``), not in the paper's text: a pre-activation stream is a raw sum, and the pair is the
  pre-activation of everything that reads it. Its output is the level's skip, the input of the next strided
  convolution and, at the deepest level, of the first upsampling module. Isensee's code leaves the norms out of the
  first level's context module and its skip; here every level is alike.
* **Kernels and strides per axis.** Every "3x3x3" convolution of level ``s`` uses the plan's ``kernel_sizes[s]`` (an
  axis with kernel 1 keeps 1; padding ``k // 2``), and down- and upsampling use ``strides[s]`` per axis, so an
  anisotropic plan keeps its per-axis choices. ``strides[0]`` must be all ones.
* **Dropout** between the two convolutions of every context module, channel-wise (``nn.Dropout3d``/``Dropout2d``)
  as in Kao's port, which the pancreas paper used; Isensee's Lasagne ``DropoutLayer`` drops single elements. The
  default rate 0.3 is Isensee's; Kao's port defaults to 0.6, the rate the pancreas paper's search settled on.
* **Localization pathway**, level ``s = n-2 .. 0``: the upsampling module (nearest-neighbour upsampling, the paper's
  "repeats the feature voxels twice", to the skip's grid, then a convolution ``f[s+1] -> f[s]``, norm, act),
  concatenation ``[skip, upsampled]`` (the skip first, as Isensee's ``ConcatLayer``), then for ``s > 0`` the
  localization module (a ``2f -> 2f`` convolution and a 1x1 ``2f -> f`` convolution, each with norm and act) and at
  ``s = 0`` a single ``2f0 -> 2f0`` convolution with norm and act. Upsampling to the skip's size, not by the
  stride, makes every input size work; for sizes that are multiples of the strides the two are identical. Isensee's
  code has one more 1x1 ``f -> f`` convolution after the deepest upsampling module, in neither paper; left out.
* **Segmentation layers** (1x1 convolutions with bias, to ``num_classes``) read the ``seg_levels`` highest levels
  (0, 1, 2 by default; fewer when the network has fewer levels). Which tensor of a level they read is the one point
  where the papers' figure and text leave a choice: we follow Isensee's and Kao's code (``ds2``, ``ds3``), i.e. the
  output of the level's ``2f -> 2f`` convolution, before the 1x1 halving, so every segmentation layer sees ``2 f[s]``
  channels. **Multi-level summation**: the deepest one's logits are upsampled (nearest, Isensee's ``Upscale3DLayer``
  repeats voxels) to the next level's grid, that level's logits are added, and so on down to level 0. The network
  returns this one summed tensor in training and in evaluation: the summation is Isensee's deep supervision, inside
  the network, so there is no list of outputs; `set_deep_supervision` is accepted and changes nothing, and the loss
  gets a single tensor (`decathlete.losses.deep_supervision.DeepSupervisionLoss` passes it straight on).
* **Norm, activation, bias.** Instance norm (affine) and leaky ReLU 0.01 by default, as the pancreas paper states;
  every feature convolution is bias-free (as in `DynamicUNet`) because a norm follows it on every path (the strided
  convolution's output reaches a norm through both branches of the residual and the stage's closing pair); Isensee's
  Lasagne layers had (zero-initialised) biases, which those norms cancel. Weights start Kaiming-normal for the
  activation's slope, zero biases (`decathlete.nets.layers.he_init`), as Lasagne's ``HeNormal``.
* **Widths** come from the planner (``features_per_stage``); Isensee 2017 trained 16, 32, 64, 128, 256 (its train
  script's ``base_n_filter=16``). The pancreas paper's "twice as many filters as the network of [4]" quotes
  Isensee's comparison with Kayalibay et al., not a change of its own; Kao's port defaults to a base of 8. A recipe
  that wants base 32 sets it through the planner; the network takes whatever the plan says.
* ``n_conv_per_stage_decoder`` is accepted because the planner always passes it, and ignored: the localization
  pathway's structure is fixed by the paper.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from decathlete.nets.base import SegmentationNet, check_topology
from decathlete.nets.layers import LayerSpec, conv_class, he_init, make_act, make_norm, split_spec, standard_conv
from decathlete.nets.unet import DEFAULT_ACT, DEFAULT_NORM, ConvNormAct
from decathlete.registry import register_net


class ContextModule(nn.Module):
    """Pre-activation residual block: ``x + conv2(act(norm2(drop(conv1(act(norm1(x)))))))``."""

    def __init__(self, dims: int, channels: int, kernel: Sequence[int], dropout: float, norm: LayerSpec,
                 act: LayerSpec) -> None:
        super().__init__()
        ones = [1] * dims
        self.norm1, self.act1 = make_norm(norm, channels, dims), make_act(act)
        self.conv1 = standard_conv(dims, channels, channels, kernel, ones)
        self.dropout = (nn.Dropout3d if dims == 3 else nn.Dropout2d)(dropout) if dropout > 0 else nn.Identity()
        self.norm2, self.act2 = make_norm(norm, channels, dims), make_act(act)
        self.conv2 = standard_conv(dims, channels, channels, kernel, ones)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(self.act1(self.norm1(x)))
        return x + self.conv2(self.act2(self.norm2(self.dropout(y))))


class ContextStage(nn.Module):
    """One level of the context pathway: (strided) convolution, context modules, closing norm and activation."""

    def __init__(self, dims: int, c_in: int, c_out: int, kernel: Sequence[int], stride: Sequence[int], blocks: int,
                 dropout: float, norm: LayerSpec, act: LayerSpec) -> None:
        super().__init__()
        self.conv = standard_conv(dims, c_in, c_out, kernel, stride)
        self.blocks = nn.Sequential(*[ContextModule(dims, c_out, kernel, dropout, norm, act) for _ in range(blocks)])
        self.exit = nn.Sequential(make_norm(norm, c_out, dims), make_act(act))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.exit(self.blocks(self.conv(x)))


class UpsamplingModule(nn.Module):
    """Nearest-neighbour upsampling to a given grid, then a convolution with norm and activation."""

    def __init__(self, dims: int, c_in: int, c_out: int, kernel: Sequence[int], norm: LayerSpec,
                 act: LayerSpec) -> None:
        super().__init__()
        self.conv = ConvNormAct(dims, c_in, c_out, kernel, [1] * dims, norm, act)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.conv(upsample(x, size))


def upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of ``x`` to the spatial ``size``: voxel repetition for integer factors."""
    return F.interpolate(x, size=tuple(int(n) for n in size), mode="nearest")


def _init_slope(act: LayerSpec) -> float:
    """The negative slope Kaiming initialisation assumes: the leaky ReLU's, 0 for anything else."""
    name, kwargs = split_spec(act)
    return float(kwargs.get("negative_slope", 0.01)) if name == "leakyrelu" else 0.0


def _check_topology(dims: int, n_stages: int, kernel_sizes: Sequence[Sequence[int]],
                    strides: Sequence[Sequence[int]], blocks: int | Sequence[int], seg_levels: int) -> list[int]:
    """Validate the plan's topology; return the context modules per stage."""
    check_topology(dims, n_stages, kernel_sizes, strides)
    counts = [blocks] * n_stages if isinstance(blocks, int) else [int(b) for b in blocks]
    if len(counts) != n_stages:
        raise ValueError(f"{n_stages} stages need as many context-module counts, got {len(counts)}")
    if seg_levels < 1:
        raise ValueError(f"seg_levels must be at least 1, got {seg_levels}")
    return counts


@register_net("isensee2017")
class Isensee2017UNet(SegmentationNet):
    """Isensee et al. 2017's U-Net with context modules and multi-level summed segmentation (module docstring).

    Args:
        in_channels: image channels.
        num_classes: output channels (classes, or regions for sigmoid outputs).
        spatial_dims: 2 or 3.
        features_per_stage: width of each level (Isensee 2017: 16, 32, 64, 128, 256).
        kernel_sizes: per level, the kernel per axis in array order (z, y, x) or (y, x).
        strides: per level, the downsampling of its first convolution per axis; ``strides[0]`` all ones.
        n_blocks_per_stage: context modules per level (int or one per level; Isensee: 1).
        n_conv_per_stage_decoder: accepted for the planner's sake and ignored.
        dropout: channel-wise drop probability inside every context module (Isensee: 0.3).
        norm: normalisation as a layer spec (default instance norm, affine).
        act: activation as a layer spec (default leaky ReLU 0.01).
        seg_levels: levels with a segmentation layer, counted from full resolution (Isensee: 3).
        deep_supervision: accepted for the planner's sake; the network always returns one tensor.
    """

    plan_free_kwargs = ("dropout", "act")

    def __init__(self, in_channels: int, num_classes: int, *, spatial_dims: int, features_per_stage: Sequence[int],
                 kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                 n_blocks_per_stage: int | Sequence[int] = 1, n_conv_per_stage_decoder: int | Sequence[int] = 1,
                 dropout: float = 0.3, norm: LayerSpec = DEFAULT_NORM, act: LayerSpec = DEFAULT_ACT,
                 seg_levels: int = 3, deep_supervision: bool = False) -> None:
        super().__init__()
        dims, feats = spatial_dims, [int(f) for f in features_per_stage]
        blocks = _check_topology(dims, len(feats), kernel_sizes, strides, n_blocks_per_stage, seg_levels)
        kernels = [[int(v) for v in k] for k in kernel_sizes]
        self.context = nn.ModuleList(
            ContextStage(dims, in_channels if s == 0 else feats[s - 1], feats[s], kernels[s],
                         [int(v) for v in strides[s]], blocks[s], dropout, norm, act) for s in range(len(feats)))
        # decoder modules are indexed by the level they produce (0 = full resolution), like `context`
        self.upsampling = nn.ModuleList(UpsamplingModule(dims, feats[s + 1], feats[s], kernels[s], norm, act)
                                        for s in range(len(feats) - 1))
        self.localization = nn.ModuleList(ConvNormAct(dims, 2 * f, 2 * f, kernels[s], [1] * dims, norm, act)
                                          for s, f in enumerate(feats[:-1]))
        self.reduction = nn.ModuleList(
            nn.Identity() if s == 0 else ConvNormAct(dims, 2 * f, f, [1] * dims, [1] * dims, norm, act)
            for s, f in enumerate(feats[:-1]))
        n_seg = min(seg_levels, max(len(feats) - 1, 1))
        # a single-stage network has no localization pathway: its one segmentation layer reads the context output
        seg_in = [2 * f for f in feats[:n_seg]] if len(feats) > 1 else [feats[0]]
        self.seg_layers = nn.ModuleList(conv_class(dims)(c, num_classes, 1, bias=True) for c in seg_in)
        self.deep_supervision = deep_supervision
        self.apply(functools.partial(he_init, negative_slope=_init_slope(act)))

    def set_deep_supervision(self, enabled: bool) -> None:
        """Accepted and ignored: the segmentation levels are summed inside the network into one output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Summed logits ``(B, num_classes, *spatial)`` for an input ``(B, in_channels, *spatial)``."""
        skips = []
        for stage in self.context:
            x = stage(x)
            skips.append(x)
        if not self.upsampling:
            return self.seg_layers[0](x)
        seg_inputs: dict[int, torch.Tensor] = {}
        for s in range(len(self.upsampling) - 1, -1, -1):
            x = self.upsampling[s](x, skips[s].shape[2:])
            x = self.localization[s](torch.cat([skips[s], x], dim=1))
            if s < len(self.seg_layers):
                seg_inputs[s] = x
            x = self.reduction[s](x)
        return self._sum_levels(seg_inputs)

    def _sum_levels(self, seg_inputs: dict[int, torch.Tensor]) -> torch.Tensor:
        """Isensee's multi-level summation: deepest logits, upsampled to each finer level and added, to level 0."""
        deepest = len(self.seg_layers) - 1
        logits = self.seg_layers[deepest](seg_inputs[deepest])
        for s in range(deepest - 1, -1, -1):
            logits = upsample(logits, seg_inputs[s].shape[2:]) + self.seg_layers[s](seg_inputs[s])
        return logits
