"""The dynamic U-Net: shapes, deep supervision, and the activation count the planner relies on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from decathlete import registry
from decathlete.nets.unet import DynamicUNet

TOPOLOGY_3D = {
    "spatial_dims": 3,
    "features_per_stage": [8, 16, 32, 32],
    "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
}


def _hooked_conv_elements(net: nn.Module, x: torch.Tensor) -> int:
    total = [0]
    convs = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    hooks = [
        m.register_forward_hook(lambda m, i, o: total.__setitem__(0, total[0] + o.numel()))
        for m in net.modules()
        if isinstance(m, convs)
    ]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return total[0] // x.shape[0]


@pytest.mark.parametrize("block", ["plain", "residual"])
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_feature_map_count_matches_real_forward(block: str, deep_supervision: bool) -> None:
    kwargs = {
        **TOPOLOGY_3D,
        "block": block,
        "deep_supervision": deep_supervision,
        "n_blocks_per_stage": [1, 2, 2, 3] if block == "residual" else 2,
        "n_conv_per_stage_decoder": [1, 2, 1],
    }
    net = DynamicUNet(2, 4, **kwargs)
    patch = [8, 24, 16]
    counted = _hooked_conv_elements(net, torch.zeros(2, 2, *patch))
    assert DynamicUNet.feature_map_elements(patch, 2, 4, **kwargs) == counted


def test_deep_supervision_outputs_full_resolution_first() -> None:
    net = DynamicUNet(1, 3, **TOPOLOGY_3D)
    outputs = net(torch.randn(2, 1, 8, 24, 16))
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 8, 24, 16), (2, 3, 8, 12, 8), (2, 3, 4, 6, 4)]
    net.deep_supervision = False
    assert tuple(net(torch.randn(1, 1, 8, 24, 16)).shape) == (1, 3, 8, 24, 16)


def test_2d_network_and_gradients() -> None:
    kwargs = {
        "spatial_dims": 2,
        "features_per_stage": [8, 16, 32],
        "kernel_sizes": [[3, 3]] * 3,
        "strides": [[1, 1], [2, 2], [2, 2]],
    }
    net = DynamicUNet(1, 2, **kwargs, deep_supervision=False)
    out = net(torch.randn(3, 1, 32, 24))
    out.mean().backward()
    assert out.shape == (3, 2, 32, 24)
    unused = {id(p) for head in net.heads[:-1] for p in head.parameters()}  # kept so DS can be switched on later
    assert all(p.grad is not None for p in net.parameters() if id(p) not in unused)


def test_parameter_count_matches_instance() -> None:
    net = DynamicUNet(1, 3, **TOPOLOGY_3D, block="residual", n_blocks_per_stage=[1, 2, 2, 2])
    expected = sum(p.numel() for p in net.parameters())
    assert (
        DynamicUNet.parameter_count(1, 3, **TOPOLOGY_3D, block="residual", n_blocks_per_stage=[1, 2, 2, 2]) == expected
    )


def test_registry_builds_unet_from_json_kwargs() -> None:
    kwargs = {**TOPOLOGY_3D, "norm": ["instance", {"affine": True}], "act": ["leakyrelu", {"negative_slope": 0.01}]}
    net = registry.build("nets", "unet", in_channels=1, num_classes=2, **kwargs)
    assert isinstance(net, DynamicUNet)
    assert "unet" in registry.names("nets")
    with pytest.raises(KeyError, match="no net named 'nope'"):
        registry.get("nets", "nope")


def test_bad_block_counts_are_rejected() -> None:
    with pytest.raises(ValueError, match="need 4 encoder block counts"):
        DynamicUNet(1, 2, **TOPOLOGY_3D, n_blocks_per_stage=[2, 2])


@pytest.mark.parametrize("block", ["plain", "residual"])
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_generic_meta_device_count_equals_the_closed_form(block: str, deep_supervision: bool) -> None:
    from decathlete.nets.base import SegmentationNet

    kwargs = {**TOPOLOGY_3D, "block": block, "deep_supervision": deep_supervision,
              "n_blocks_per_stage": [1, 2, 2, 3] if block == "residual" else 2}
    generic = SegmentationNet.feature_map_elements.__func__(DynamicUNet, [16, 32, 32], 2, 3, **kwargs)
    assert generic == DynamicUNet.feature_map_elements([16, 32, 32], 2, 3, **kwargs)


def test_blocks_take_another_convolution_by_its_layer_spec() -> None:
    built = []

    @registry.register_layer("convs", "test_counting")
    def counting(spatial_dims, c_in, c_out, kernel, stride, bias=False, tag="x"):  # noqa: ANN001, ANN202
        built.append(tag)
        return registry.get("convs", "conv")(spatial_dims, c_in, c_out, kernel, stride, bias=bias)

    try:
        DynamicUNet(1, 2, **TOPOLOGY_3D, conv=["test_counting", {"tag": "t"}])
        plain = DynamicUNet(1, 2, **TOPOLOGY_3D)
        n_convs = sum(isinstance(m, nn.Conv3d) for m in plain.modules()) - 3  # less the 1x1 heads
        assert built == ["t"] * n_convs
        # another conv spec: the planner's count comes from the generic measurement, which still agrees here
        assert DynamicUNet.feature_map_elements([16, 32, 32], 1, 2, **TOPOLOGY_3D, conv="test_counting") == \
            DynamicUNet.feature_map_elements([16, 32, 32], 1, 2, **TOPOLOGY_3D)
    finally:
        registry.unregister("convs", "test_counting")


def test_net_output_wraps_every_form_of_logits() -> None:
    from decathlete.nets.base import NetOutput, set_deep_supervision

    t = torch.zeros(1, 2, 4, 4)
    assert NetOutput.of(t) == NetOutput(t, {}) and NetOutput.of(t).full_resolution is t
    assert NetOutput.of((t, t[..., ::2, ::2])).logits[0] is t and NetOutput.of([t]).full_resolution is t
    out = NetOutput([t], {"mu": t})
    assert NetOutput.of(out) is out
    net = DynamicUNet(1, 2, **TOPOLOGY_3D)
    set_deep_supervision(net, False)
    assert isinstance(net(torch.zeros(1, 1, 8, 16, 16)), torch.Tensor)
    set_deep_supervision(nn.Identity(), False)  # a network without deep supervision: nothing to switch
