"""`decathlete.nets.isensee2017`: shapes with anisotropic plans, the multi-level summation, the pre-activation context
module, parameter and activation counts against hand arithmetic, determinism and gradient flow."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from decathlete.nets.isensee2017 import ContextModule, Isensee2017UNet
from decathlete.registry import get

ANISO_3D: dict[str, Any] = dict(spatial_dims=3, features_per_stage=[4, 8, 12, 16],
                                kernel_sizes=[[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]],
                                strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], n_conv_per_stage_decoder=2)
ANISO_2D: dict[str, Any] = dict(spatial_dims=2, features_per_stage=[4, 8, 12], kernel_sizes=[[3, 3], [3, 3], [3, 1]],
                                strides=[[1, 1], [2, 1], [2, 2]], n_conv_per_stage_decoder=2)
TINY: dict[str, Any] = dict(spatial_dims=3, features_per_stage=[2, 4], kernel_sizes=[[3, 3, 3], [3, 3, 3]],
                            strides=[[1, 1, 1], [2, 2, 2]], n_conv_per_stage_decoder=1)


def build(kwargs: dict[str, Any], in_channels: int = 2, num_classes: int = 3, **extra: Any) -> Isensee2017UNet:
    torch.manual_seed(0)
    return Isensee2017UNet(in_channels, num_classes, **kwargs, **extra)


@pytest.mark.parametrize("kwargs, size", [(ANISO_3D, (4, 16, 24)), (ANISO_3D, (5, 13, 18)),
                                          (ANISO_2D, (16, 12)), (ANISO_2D, (13, 7))])
def test_output_shape_for_multiples_of_the_divisor_and_other_sizes(kwargs: dict[str, Any],
                                                                   size: tuple[int, ...]) -> None:
    # ANISO_3D divides (z, y, x) by (4, 8, 8): (5, 13, 18) is a multiple on no axis
    net = build(kwargs).train()
    assert net(torch.randn(2, 2, *size)).shape == (2, 3, *size)
    net.set_deep_supervision(True)  # harmless: still one tensor
    out = net.eval()(torch.randn(1, 2, *size))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, *size)


def test_plan_kernels_and_strides_reach_the_convolutions() -> None:
    net = build(ANISO_3D)
    assert net.context[0].conv.kernel_size == (1, 3, 3) and net.context[0].conv.stride == (1, 1, 1)
    assert net.context[1].conv.stride == (1, 2, 2) and net.context[1].blocks[0].conv1.kernel_size == (1, 3, 3)
    assert net.context[3].conv.stride == (2, 2, 2) and net.context[3].conv.kernel_size == (3, 3, 3)
    assert net.upsampling[0].conv[0].kernel_size == (1, 3, 3)  # level 0's kernel, at level 0's resolution
    assert net.reduction[1][0].kernel_size == (1, 1, 1) and isinstance(net.reduction[0], nn.Identity)
    assert [layer.in_channels for layer in net.seg_layers] == [8, 16, 24]  # 2 f_s: before the 1x1 halving
    assert all(layer.bias is not None for layer in net.seg_layers)
    feature_convs = [m for m in net.modules() if isinstance(m, nn.Conv3d) and m not in set(net.seg_layers)]
    assert feature_convs and all(m.bias is None for m in feature_convs)


def _seg_outputs(net: Isensee2017UNet, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    captured: dict[int, torch.Tensor] = {}
    handles = [layer.register_forward_hook(lambda _m, _i, out, s=s: captured.__setitem__(s, out))
               for s, layer in enumerate(net.seg_layers)]
    out = net(x)
    for handle in handles:
        handle.remove()
    return out, [captured[s] for s in range(len(net.seg_layers))]


def test_multi_level_summation_matches_a_hand_recomputation() -> None:
    net = build(ANISO_3D).eval()
    out, (o0, o1, o2) = _seg_outputs(net, torch.randn(2, 2, 8, 16, 24))
    assert o0.shape[2:] == (8, 16, 24) and o1.shape[2:] == (8, 8, 12) and o2.shape[2:] == (4, 4, 6)

    def repeat(t: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
        # nearest upsampling by integer factors = Isensee's voxel repetition
        for axis, f in enumerate(factors):
            t = t.repeat_interleave(f, dim=2 + axis)
        return t

    # level 2 -> 1 undoes stride[2] = (2, 2, 2), level 1 -> 0 undoes stride[1] = (1, 2, 2)
    expected = repeat(repeat(o2, (2, 2, 2)) + o1, (1, 2, 2)) + o0
    torch.testing.assert_close(out, expected)


def test_one_segmentation_level_is_the_level_zero_layer_alone() -> None:
    net = build(ANISO_3D, seg_levels=1).eval()
    assert len(net.seg_layers) == 1
    out, (o0,) = _seg_outputs(net, torch.randn(1, 2, 4, 16, 16))
    torch.testing.assert_close(out, o0)
    assert len(build(TINY, seg_levels=3).seg_layers) == 1  # two stages: only level 0 has a localization level


def test_context_module_is_a_pre_activation_residual_block() -> None:
    torch.manual_seed(1)
    norm, act = ("instance", {"affine": True, "eps": 1e-5}), ("leakyrelu", {"negative_slope": 0.01})
    block = ContextModule(3, 4, [3, 3, 3], 0.3, norm, act).eval()
    for p in (block.norm1.weight, block.norm1.bias, block.norm2.weight, block.norm2.bias):
        nn.init.normal_(p)  # non-trivial affine parameters so their order matters
    x = torch.randn(2, 4, 5, 6, 7)

    def conv(t: torch.Tensor, layer: nn.Conv3d) -> torch.Tensor:
        return F.conv3d(t, layer.weight, padding=1)

    def norm_act(t: torch.Tensor, n: nn.InstanceNorm3d) -> torch.Tensor:
        return F.leaky_relu(F.instance_norm(t, weight=n.weight, bias=n.bias, eps=1e-5), 0.01)

    expected = x + conv(norm_act(conv(norm_act(x, block.norm1), block.conv1), block.norm2), block.conv2)
    torch.testing.assert_close(block(x), expected)
    with torch.no_grad():
        block.conv2.weight.zero_()
    torch.testing.assert_close(block(x), x)
    assert isinstance(block.dropout, nn.Dropout3d) and block.dropout.p == 0.3  # channel-wise, between the convs


def test_parameter_count_registry_instance_and_hand_arithmetic() -> None:
    cls = get("nets", "isensee2017")
    assert cls is Isensee2017UNet
    for kwargs in (ANISO_3D, ANISO_2D, TINY):
        real = sum(p.numel() for p in build(kwargs).parameters())
        assert cls.parameter_count(2, 3, **kwargs) == real
    # TINY with 1 input channel, 2 classes; convs are bias-free, instance norms have 2 c affine parameters
    stage0 = 1 * 2 * 27 + (4 + 2 * 2 * 27) * 2 + 4  # stem conv, context module (norm + conv twice), closing norm
    stage1 = 2 * 4 * 27 + (8 + 4 * 4 * 27) * 2 + 8  # strided conv, context module, closing norm
    upsampling0 = 4 * 2 * 27 + 4  # conv f1 -> f0, norm
    localization0 = 4 * 4 * 27 + 8  # level 0: one conv 2 f0 -> 2 f0, norm (no 1x1)
    seg0 = 4 * 2 + 2  # 1x1 conv with bias; a 2-stage network has one segmentation level
    assert stage0 + stage1 + upsampling0 + localization0 + seg0 == 2056
    assert cls.parameter_count(1, 2, **TINY) == 2056
    # n_conv_per_stage_decoder is ignored
    assert cls.parameter_count(1, 2, **{**TINY, "n_conv_per_stage_decoder": 4}) == 2056
    assert cls.parameter_count(1, 2, **{**TINY, "n_blocks_per_stage": [1, 2]}) == 2056 + 8 + 2 * 4 * 4 * 27 + 8


def test_feature_map_elements_on_the_meta_device_match_hand_arithmetic() -> None:
    # TINY at (4, 4, 4): 64 voxels at level 0, 8 at level 1; every conv's output counted once
    level0 = 2 * 64 * 3 + 2 * 64 + 4 * 64 + 2 * 64  # stem + 2 module convs, upsampling conv, localization, seg
    level1 = 4 * 8 * 3  # strided conv + 2 module convs
    assert get("nets", "isensee2017").feature_map_elements((4, 4, 4), 1, 2, **TINY) == level0 + level1 == 992


def test_eval_is_deterministic_training_drops_and_gradients_reach_the_first_conv() -> None:
    net = build(ANISO_3D)
    x = torch.randn(2, 2, 4, 16, 16)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(x), rtol=0, atol=0)
    net.train()
    with torch.no_grad():
        assert not torch.equal(net(x), net(x))  # spatial dropout is active in training
    net(x).square().mean().backward()
    grad = net.context[0].conv.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_bad_topologies_are_rejected() -> None:
    with pytest.raises(ValueError, match="full resolution"):
        Isensee2017UNet(1, 2, **{**TINY, "strides": [[2, 2, 2], [2, 2, 2]]})
    with pytest.raises(ValueError, match="context-module counts"):
        Isensee2017UNet(1, 2, **{**TINY, "n_blocks_per_stage": [1, 1, 1]})
    with pytest.raises(ValueError, match="seg_levels"):
        Isensee2017UNet(1, 2, **TINY, seg_levels=0)
