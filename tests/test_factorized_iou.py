"""Avetisian's factorised U-Net (`decathlete.nets.factorized`) and the IoU / generalised Dice losses
(`decathlete.losses.overlap`), against hand-computed values on tiny tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from decathlete import registry
from decathlete.losses.overlap import GeneralizedDiceLoss, IoULoss, generalized_dice_weights
from decathlete.nets.factorized import FactorizedBlock, FactorizedUNet, UpConv, block_weight_counts

pytestmark = pytest.mark.usefixtures("one_thread")

# A 4-stage 3D plan with an anisotropic first kernel and a stage pooled in-plane only: divisor (4, 8, 8) per axis.
PLAN_3D = dict(spatial_dims=3, features_per_stage=[2, 4, 4, 4],
               kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
               strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2]])
PLAN_2D = dict(spatial_dims=2, features_per_stage=[2, 3, 4], kernel_sizes=[[3, 3]] * 3,
               strides=[[1, 1], [2, 2], [2, 1]])


def _convs(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]


# ----------------------------------------------------------------------------------------------- factorised block
@pytest.mark.parametrize("kernel, expected", [
    ((3, 3, 3), [(1, 3, 3), (3, 1, 3), (3, 3, 1), (1, 3, 3)]),
    # an axis the plan gives kernel 1 keeps it: the through-plane convolutions become 1D
    ((1, 3, 3), [(1, 3, 3), (1, 1, 3), (1, 3, 1), (1, 3, 3)]),
])
def test_block_kernels_in_order(kernel, expected):
    convs = _convs(FactorizedBlock(3, 2, 5, kernel, 0.0))
    assert [c.kernel_size for c in convs] == expected
    assert [(c.in_channels, c.out_channels) for c in convs] == [(2, 5)] + [(5, 5)] * 3
    assert [c.padding for c in convs] == [tuple(k // 2 for k in ks) for ks in expected]


def test_block_2d_is_four_in_plane_convolutions():
    assert [c.kernel_size for c in _convs(FactorizedBlock(2, 2, 3, (3, 3), 0.0))] == [(3, 3)] * 4


def test_block_weight_counts_match_the_paper():
    c = 4
    # four 3x3 kernels per in/out pair (36) vs one 3x3x3 (27) vs nnU-Net's two 3x3x3 convolutions (54)
    assert block_weight_counts(c, c) == {"factorized_block": 4 * 9 * c * c, "conv3x3x3": 27 * c * c,
                                         "nnunet_stage": 2 * 27 * c * c}
    assert block_weight_counts(c, c, dims=2)["factorized_block"] == 4 * 9 * c * c


def test_block_parameters_include_one_bias_per_convolution():
    c_in, c_out = 3, 5
    block = FactorizedBlock(3, c_in, c_out, (3, 3, 3), 0.0)
    # first conv c_in -> c_out, three more c_out -> c_out, each 9 taps plus c_out biases
    expected = (9 * c_in * c_out + c_out) + 3 * (9 * c_out * c_out + c_out)
    assert sum(p.numel() for p in block.parameters()) == expected


# ----------------------------------------------------------------------------------------------------- network
@pytest.mark.parametrize("plan, size", [(PLAN_3D, (13, 21, 18)), (PLAN_2D, (11, 7))])
def test_any_input_size_gives_logits_of_the_input_size(plan, size):
    torch.manual_seed(0)
    net = FactorizedUNet(2, 3, **plan)
    net.set_deep_supervision(True)  # accepted and harmless: still one tensor
    out = net(torch.randn(2, 2, *size))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, 3, *size)


def test_padding_equals_explicit_zero_padding():
    torch.manual_seed(0)
    net = FactorizedUNet(1, 2, **PLAN_2D).eval()
    x = torch.randn(1, 1, 11, 7)
    # divisor (2*2, 2*1) = (4, 2): 11 -> 12 and 7 -> 8, zeros at the high end
    padded = F.pad(x, (0, 1, 0, 1))
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(padded)[..., :11, :7])


def test_registry_parameter_count_matches_an_instance():
    net_cls = registry.get("nets", "factorized_unet")
    assert net_cls is FactorizedUNet
    net = FactorizedUNet(2, 3, **PLAN_3D)
    assert net_cls.parameter_count(2, 3, **PLAN_3D) == sum(p.numel() for p in net.parameters())


def test_feature_map_elements_by_hand():
    plan = dict(spatial_dims=2, features_per_stage=[2, 3], kernel_sizes=[[3, 3]] * 2, strides=[[1, 1], [2, 2]])
    full, low = 4 * 4, 2 * 2  # a 3x3 patch is padded to the divisor 2: 4x4, pooled to 2x2
    stage0, stage1 = 4 * 2 * full, 4 * 3 * low  # four convolutions per block
    up, decoder, head = 2 * low, 4 * 2 * full, 2 * full  # the 1x1 up-convolution runs at low resolution
    expected = stage0 + stage1 + up + decoder + head
    assert FactorizedUNet.feature_map_elements((3, 3), 1, 2, **plan) == expected
    assert FactorizedUNet.feature_map_elements((13, 21, 18), 2, 3, **PLAN_3D) > 0


def test_eval_is_deterministic_and_training_drops_out():
    torch.manual_seed(0)
    net = FactorizedUNet(1, 2, **PLAN_2D)
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        net.eval()
        torch.testing.assert_close(net(x), net(x))
        net.train()
        assert not torch.equal(net(x), net(x))


def test_gradients_reach_the_first_convolution():
    torch.manual_seed(0)
    net = FactorizedUNet(2, 3, **PLAN_3D)
    net(torch.randn(1, 2, 8, 16, 16)).square().mean().backward()
    first = _convs(net)[0]
    assert first.in_channels == 2
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dims, stride", [(3, (1, 2, 2)), (2, (2, 2))])
def test_upconv_equals_a_transposed_convolution_with_shared_taps(dims, stride):
    torch.manual_seed(0)
    c_in, c_out = 4, 3
    up = UpConv(dims, c_in, c_out, stride)
    transposed = (nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d)(c_in, c_out, stride, stride)
    conv = up[0]
    with torch.no_grad():
        # conv weight (out, in, 1, ...) -> transposed weight (in, out, *stride), every tap the same
        shared = conv.weight.transpose(0, 1)
        transposed.weight.copy_(shared.expand(c_in, c_out, *stride))
        transposed.bias.copy_(conv.bias)
        x = torch.randn(2, c_in, *(3,) * dims)
        torch.testing.assert_close(up(x), transposed(x))


# ---------------------------------------------------------------------------------------------------- IoU loss
# One sample, 3 classes, 4 voxels (a 2x2 image). Columns v0..v3 of the probabilities:
#   background 0.7 0.1 0.2 0.4
#   class 1    0.2 0.6 0.2 0.4
#   class 2    0.1 0.3 0.6 0.2
PROBS = [[0.7, 0.1, 0.2, 0.4], [0.2, 0.6, 0.2, 0.4], [0.1, 0.3, 0.6, 0.2]]


def _logits(probs) -> torch.Tensor:
    """(1, C, 2, 2) logits whose softmax is ``probs`` (softmax of log-probabilities returns them)."""
    return torch.tensor(probs, dtype=torch.float64).log().reshape(1, len(probs), 2, 2)


def _labels(values) -> torch.Tensor:
    return torch.tensor(values).reshape(1, 1, 2, 2)


# labels 0 1 2 1:
#   class 1: y = 0 1 0 1, I = 0.6 + 0.4 = 1.0, P = 1.4, R = 2, U = 1.4 + 2 - 1.0 = 2.4
#   class 2: y = 0 0 1 0, I = 0.6,             P = 1.2, R = 1, U = 1.2 + 1 - 0.6 = 1.6
LABELS = [0, 1, 2, 1]


def test_iou_pooled_is_one_ratio_over_classes_and_voxels():
    loss = IoULoss(smooth=0.0)(_logits(PROBS), _labels(LABELS))
    # I = 1.0 + 0.6 = 1.6, U = 2.4 + 1.6 = 4.0
    torch.testing.assert_close(loss.item(), 1 - 1.6 / 4.0)


def test_iou_mean_averages_per_class_ratios():
    loss = IoULoss(smooth=0.0, reduction="mean")(_logits(PROBS), _labels(LABELS))
    torch.testing.assert_close(loss.item(), 1 - (1.0 / 2.4 + 0.6 / 1.6) / 2)


def test_iou_smooth_enters_intersection_and_union():
    smooth = 0.5
    loss = IoULoss(smooth=smooth)(_logits(PROBS), _labels(LABELS))
    torch.testing.assert_close(loss.item(), 1 - (1.6 + smooth) / (4.0 + smooth))


def test_iou_absent_class_adds_its_prediction_to_the_union():
    # labels 0 1 1 0: class 1 y = 0 1 1 0, I = 0.6 + 0.2 = 0.8, P = 1.4, R = 2, U = 2.6;
    # class 2 absent: I = 0, U = P = 1.2
    loss = IoULoss(smooth=0.0)(_logits(PROBS), _labels([0, 1, 1, 0]))
    torch.testing.assert_close(loss.item(), 1 - 0.8 / (2.6 + 1.2))


def test_iou_ignore_index_leaves_voxels_out():
    ignore = 7  # past the last class: must not index the one-hot
    # v3 ignored: class 1 I = 0.6, P = 0.2 + 0.6 + 0.2 = 1.0, R = 1, U = 1.4;
    #             class 2 I = 0.6, P = 0.1 + 0.3 + 0.6 = 1.0, R = 1, U = 1.4
    loss = IoULoss(smooth=0.0, ignore_index=ignore)(_logits(PROBS), _labels([0, 1, 2, ignore]))
    torch.testing.assert_close(loss.item(), 1 - 1.2 / 2.8)


def test_iou_region_based_sigmoid():
    # two regions, two voxels; logits = logit(p) so that the sigmoid returns p
    probs = torch.tensor([[0.8, 0.3], [0.5, 0.9]], dtype=torch.float64)
    logits = (probs / (1 - probs)).log()[None]
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    # region 0: I = 0.8, P = 1.1, R = 1, U = 1.3; region 1: I = 0.9, P = 1.4, R = 1, U = 1.5
    pooled = IoULoss(region_based=True, smooth=0.0)(logits, target)
    torch.testing.assert_close(pooled.item(), 1 - 1.7 / 2.8)
    mean = IoULoss(region_based=True, smooth=0.0, reduction="mean")(logits, target)
    torch.testing.assert_close(mean.item(), 1 - (0.8 / 1.3 + 0.9 / 1.5) / 2)
    # ignored element (-1) of region 0 at voxel 1: region 0 P = 0.8, U = 1.0
    target[0, 0, 1] = -1
    ignored = IoULoss(region_based=True, smooth=0.0, ignore_index=-1)(logits, target)
    torch.testing.assert_close(ignored.item(), 1 - 1.7 / 2.5)


def test_iou_batch_sums_before_the_ratio_per_sample_averages():
    logits = torch.cat([_logits(PROBS)] * 2)
    labels = torch.cat([_labels(LABELS), _labels([0, 1, 1, 0])])
    batch = IoULoss(smooth=0.0)(logits, labels)
    # I = 1.6 + 0.8, U = 4.0 + 3.8
    torch.testing.assert_close(batch.item(), 1 - 2.4 / 7.8)
    per_sample = IoULoss(smooth=0.0, batch=False)(logits, labels)
    torch.testing.assert_close(per_sample.item(), 1 - (1.6 / 4.0 + 0.8 / 3.8) / 2)


def _confident(labels, n_classes: int, margin: float = 40.0) -> torch.Tensor:
    """Logits with ``margin`` on the labelled class: softmax puts ~exp(-margin) on every other class."""
    return F.one_hot(torch.tensor(labels), n_classes).T.reshape(1, n_classes, 2, 2).double() * margin


@pytest.mark.parametrize("loss", [IoULoss(), IoULoss(reduction="mean"), GeneralizedDiceLoss(),
                                  GeneralizedDiceLoss(weight="inverse_square")])
def test_perfect_prediction_and_empty_reference_give_zero(loss):
    torch.testing.assert_close(loss(_confident(LABELS, 3), _labels(LABELS)).item(), 0.0, atol=1e-6, rtol=0)
    # nothing but background, and the prediction agrees: P ~ 4 exp(-40) << smooth
    empty = [0, 0, 0, 0]
    torch.testing.assert_close(loss(_confident(empty, 3), _labels(empty)).item(), 0.0, atol=1e-6, rtol=0)


def test_losses_are_registered():
    assert registry.get("losses", "iou") is IoULoss
    assert registry.get("losses", "generalized_dice") is GeneralizedDiceLoss


# ------------------------------------------------------------------------------------------ generalised Dice loss
# The hand values use the raw weights; the loss normalises them per ratio, which cancels at smooth = 0.
def test_gdl_uniform():
    loss = GeneralizedDiceLoss(smooth=0.0)(_logits(PROBS), _labels(LABELS))
    # 2 (I1 + I2) / (P1 + R1 + P2 + R2) = 2 * 1.6 / (3.4 + 2.2)
    torch.testing.assert_close(loss.item(), 1 - 2 * 1.6 / 5.6)


def test_gdl_inverse_volume_and_square():
    logits, labels = _logits(PROBS), _labels(LABELS)
    # R1 = 2, R2 = 1
    volume = GeneralizedDiceLoss(smooth=0.0, weight="inverse_volume")(logits, labels)
    w1, w2 = 1 / 2, 1.0
    torch.testing.assert_close(volume.item(), 1 - 2 * (w1 * 1.0 + w2 * 0.6) / (w1 * 3.4 + w2 * 2.2))
    square = GeneralizedDiceLoss(smooth=0.0, weight="inverse_square")(logits, labels)
    w1, w2 = 1 / 4, 1.0
    torch.testing.assert_close(square.item(), 1 - 2 * (w1 * 1.0 + w2 * 0.6) / (w1 * 3.4 + w2 * 2.2))


def test_gdl_inverse_square_absent_class_takes_the_largest_finite_weight():
    # labels 0 1 1 0: class 1 I = 0.8, P + R = 1.4 + 2, weight 1/4; class 2 absent (P = 1.2) -> weight 1/4 too
    loss = GeneralizedDiceLoss(smooth=0.0, weight="inverse_square")(_logits(PROBS), _labels([0, 1, 1, 0]))
    w = 1 / 4
    torch.testing.assert_close(loss.item(), 1 - 2 * (w * 0.8) / (w * 3.4 + w * 1.2))
    # no class present: all weights 1 (then normalised to 1/2 each)
    weights = generalized_dice_weights(torch.zeros(1, 2), "inverse_square")
    torch.testing.assert_close(weights, torch.full((1, 2), 1 / 2))


def test_gdl_batch_vs_per_sample():
    logits = torch.cat([_logits(PROBS)] * 2)
    labels = torch.cat([_labels(LABELS), _labels([0, 1, 1, 0])])
    per_sample = GeneralizedDiceLoss(smooth=0.0)(logits, labels)
    # sample 0: 2 * 1.6 / 5.6; sample 1: 2 * (0.8 + 0) / (3.4 + 1.2)
    torch.testing.assert_close(per_sample.item(), 1 - (2 * 1.6 / 5.6 + 2 * 0.8 / 4.6) / 2)
    batch = GeneralizedDiceLoss(smooth=0.0, batch=True)(logits, labels)
    # class 1: I = 1.8, P + R = 2.8 + 4; class 2: I = 0.6, P + R = 2.4 + 1
    torch.testing.assert_close(batch.item(), 1 - 2 * (1.8 + 0.6) / (6.8 + 3.4))
    square = GeneralizedDiceLoss(smooth=0.0, batch=True, weight="inverse_square")(logits, labels)
    w1, w2 = 1 / 4**2, 1.0  # batch volumes R1 = 4, R2 = 1
    torch.testing.assert_close(square.item(), 1 - 2 * (w1 * 1.8 + w2 * 0.6) / (w1 * 6.8 + w2 * 3.4))


def test_losses_give_gradients_under_autocast():
    logits = _logits(PROBS).float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total = IoULoss()(logits, _labels(LABELS)) + GeneralizedDiceLoss()(logits, _labels(LABELS))
    assert total.dtype == torch.float32
    total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
