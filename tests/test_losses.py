"""Losses: hand-computed Dice, CE against torch, compounds, deep supervision, registry; 2D and 3D."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from decathlete import registry
from decathlete.losses import (
    CrossEntropyLoss,
    DeepSupervisionLoss,
    DiceBCELoss,
    DiceCELoss,
    SoftDiceLoss,
    TopKCrossEntropyLoss,
    downsample_target,
    ds_factors,
    ds_weights,
)

SMOOTH = 1e-5


def _onehot(labels: list[list[int]], n_classes: int = 3) -> torch.Tensor:
    """Hard "probabilities" (B, C, 1, N) from per-sample label lists."""
    t = torch.tensor(labels)[:, None, None, :]
    return torch.zeros(t.shape[0], n_classes, 1, t.shape[-1]).scatter_(1, t, 1.0)


def _reference_dice(probs, target, batch_dice, include_background, valid=None):
    """nnU-Net's MemoryEfficientSoftDiceLoss, one-hot and all, on probabilities and a (B, 1, ...) label map."""
    axes = tuple(range(2, probs.ndim))
    onehot = torch.zeros_like(probs).scatter_(1, target.long().clamp(min=0), 1)
    mask = torch.ones_like(probs[:, :1]) if valid is None else valid.to(probs.dtype)
    if not include_background:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    tp, pred, ref = (probs * onehot * mask).sum(axes), (probs * mask).sum(axes), (onehot * mask).sum(axes)
    if batch_dice:
        tp, pred, ref = tp.sum(0), pred.sum(0), ref.sum(0)
    return -((2 * tp + SMOOTH) / torch.clip(pred + ref + SMOOTH, 1e-8)).mean()


def _data(shape=(2, 3, 4, 6, 5), seed=0, ignore_fraction=0.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, dtype=torch.float64)
    target = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=g)
    if ignore_fraction:
        target[torch.rand(target.shape, generator=g) < ignore_fraction] = -1
    return logits.requires_grad_(), target


# --- Dice -------------------------------------------------------------------------------------------------------

# sample 0: ref [0,1,1,2], pred [0,1,2,2] -> dice c0 1, c1 2/3, c2 2/3
# sample 1: ref [1,1,0,0], pred [1,0,0,0] -> dice c0 4/5, c1 2/3, c2 empty in both = smooth/smooth = 1
# batch: c0 tp 3 pred 4 ref 3 -> 6/7; c1 tp 2 pred 2 ref 4 -> 2/3; c2 tp 1 pred 2 ref 1 -> 2/3
HAND = [
    (False, False, (2 / 3 + 2 / 3 + 2 / 3 + 1) / 4),
    (False, True, (1 + 2 / 3 + 2 / 3 + 4 / 5 + 2 / 3 + 1) / 6),
    (True, False, (2 / 3 + 2 / 3) / 2),
    (True, True, (6 / 7 + 2 / 3 + 2 / 3) / 3),
]


@pytest.mark.parametrize(("batch_dice", "include_background", "expected"), HAND)
def test_dice_hand_computed(batch_dice, include_background, expected):
    probs = _onehot([[0, 1, 2, 2], [1, 0, 0, 0]])
    target = torch.tensor([[0, 1, 1, 2], [1, 1, 0, 0]])[:, None, None, :]
    loss = SoftDiceLoss(None, batch_dice=batch_dice, include_background=include_background)(probs, target)
    assert loss.item() == pytest.approx(-expected, abs=1e-5)


@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("ignore", [False, True])
def test_dice_matches_one_hot_reference(batch_dice, include_background, ignore):
    logits, target = _data(ignore_fraction=0.3 if ignore else 0.0)
    valid = target != -1 if ignore else None
    loss = SoftDiceLoss("softmax", batch_dice, include_background, ignore_index=-1 if ignore else None)(logits, target)
    expected = _reference_dice(torch.softmax(logits, 1), target, batch_dice, include_background, valid)
    torch.testing.assert_close(loss, expected)
    # the (B, *spatial) form of the label map gives the same loss
    loss2 = SoftDiceLoss("softmax", batch_dice, include_background, ignore_index=-1 if ignore else None)(
        logits, target[:, 0]
    )
    torch.testing.assert_close(loss, loss2)


def test_dice_perfect_prediction_and_gradients():
    _, target = _data()
    logits = (F.one_hot(target[:, 0], 3).movedim(-1, 1).double() * 50).requires_grad_()
    for batch_dice in (False, True):
        assert SoftDiceLoss(batch_dice=batch_dice)(logits, target).item() == pytest.approx(-1, abs=1e-6)
    logits, target = _data(ignore_fraction=0.2)
    SoftDiceLoss(ignore_index=-1)(logits, target).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_dice_ignored_voxels_change_nothing():
    logits, target = _data(ignore_fraction=0.3)
    loss_fn = SoftDiceLoss(ignore_index=-1)
    loss = loss_fn(logits, target)
    loss.backward()
    ignored = (target == -1).expand_as(logits)
    assert logits.grad[ignored].abs().max() == 0
    changed = logits.detach().clone()
    changed[ignored] = 100.0
    torch.testing.assert_close(loss_fn(changed, target), loss.detach())


def test_dice_outside_label_is_background_without_ignore_index():
    logits, target = _data(ignore_fraction=0.3)
    torch.testing.assert_close(SoftDiceLoss()(logits, target), SoftDiceLoss()(logits, target.clamp(min=0)))


# --- cross-entropy ------------------------------------------------------------------------------------------------


def test_ce_matches_torch():
    logits, target = _data()
    torch.testing.assert_close(CrossEntropyLoss()(logits, target), F.cross_entropy(logits, target[:, 0]))


def test_ce_ignore_index():
    logits, target = _data(ignore_fraction=0.3)
    loss = CrossEntropyLoss(ignore_index=-1)(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target[:, 0], ignore_index=-1))
    loss.backward()
    ignored = (target == -1).expand_as(logits)
    assert logits.grad[ignored].abs().max() == 0
    changed = logits.detach().clone()
    changed[ignored] = -100.0
    torch.testing.assert_close(CrossEntropyLoss(ignore_index=-1)(changed, target), loss.detach())
    # without ignore_index the outside label -1 is background
    torch.testing.assert_close(CrossEntropyLoss()(logits, target), F.cross_entropy(logits, target[:, 0].clamp(min=0)))


def test_ce_everything_ignored_is_zero_not_nan():
    logits, _ = _data()
    target = torch.full((2, 1, 4, 6, 5), -1)
    for cls in (CrossEntropyLoss, DiceCELoss, TopKCrossEntropyLoss):
        loss_fn = cls(ignore_index=-1)
        loss = loss_fn(logits, target)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert CrossEntropyLoss(ignore_index=-1)(logits, target).item() == 0


def test_weighted_ce_matches_torch():
    logits, target = _data(ignore_fraction=0.2)
    weight = [1.0, 10.0, 50.0]  # van den Hork et al.'s pancreas weights
    w = torch.tensor(weight, dtype=torch.float64)
    torch.testing.assert_close(
        CrossEntropyLoss(weight)(logits, target.clamp(min=0)), F.cross_entropy(logits, target[:, 0].clamp(min=0), w)
    )
    torch.testing.assert_close(
        CrossEntropyLoss(weight, ignore_index=-1)(logits, target),
        F.cross_entropy(logits, target[:, 0], w, ignore_index=-1),
    )


def test_topk_ce():
    logits, target = _data(shape=(2, 3, 5, 10))  # 100 voxels
    torch.testing.assert_close(TopKCrossEntropyLoss(k=100)(logits, target), F.cross_entropy(logits, target[:, 0]))
    per_voxel = F.cross_entropy(logits, target[:, 0], reduction="none").flatten()
    expected = per_voxel.sort(descending=True).values[:10].mean()
    torch.testing.assert_close(TopKCrossEntropyLoss(k=10)(logits, target), expected)
    # with ignored voxels, k percent of the counted ones
    logits, target = _data(shape=(2, 3, 5, 10), ignore_fraction=0.5)
    valid = target[:, 0] != -1
    per_voxel = F.cross_entropy(logits, target[:, 0].clamp(min=0), reduction="none")[valid]
    expected = per_voxel.sort(descending=True).values[: int(valid.sum()) // 10].mean()
    torch.testing.assert_close(TopKCrossEntropyLoss(k=10, ignore_index=-1)(logits, target), expected)


# --- compounds ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ignore", [False, True])
def test_dice_ce_is_ce_plus_dice(ignore):
    logits, target = _data(ignore_fraction=0.3 if ignore else 0.0)
    ii = -1 if ignore else None
    total = DiceCELoss(ignore_index=ii)(logits, target)
    ce = F.cross_entropy(logits, target[:, 0], ignore_index=-1)
    dice = _reference_dice(torch.softmax(logits, 1), target, False, False, target != -1)
    torch.testing.assert_close(total, (ce + dice))
    weighted = DiceCELoss(weight_ce=0.5, weight_dice=2.0, batch_dice=True, ignore_index=ii)(logits, target)
    parts = 0.5 * CrossEntropyLoss(ignore_index=ii)(logits, target) + 2.0 * SoftDiceLoss(
        batch_dice=True, ignore_index=ii
    )(logits, target)
    torch.testing.assert_close(weighted, parts)


def test_dice_ce_topk_and_zero_weight():
    logits, target = _data()
    torch.testing.assert_close(
        DiceCELoss(topk=10)(logits, target),
        (TopKCrossEntropyLoss(10)(logits, target) + SoftDiceLoss()(logits, target)),
    )
    torch.testing.assert_close(DiceCELoss(weight_dice=0)(logits, target), CrossEntropyLoss()(logits, target))


def _sigmoid_dice(logits, target, valid, batch_dice):
    axes = tuple(range(2, logits.ndim))
    p = torch.sigmoid(logits) * valid
    t = target * valid
    tp, pred, ref = (p * t).sum(axes), p.sum(axes), t.sum(axes)
    if batch_dice:
        tp, pred, ref = tp.sum(0), pred.sum(0), ref.sum(0)
    return -((2 * tp + SMOOTH) / (pred + ref + SMOOTH)).mean()


@pytest.mark.parametrize("batch_dice", [False, True])
def test_dice_bce_regions(batch_dice):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 2, 4, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    target = (torch.rand(logits.shape, generator=g, dtype=torch.float64) < 0.4).double()
    expected = F.binary_cross_entropy_with_logits(logits, target) + _sigmoid_dice(logits, target, 1.0, batch_dice)
    torch.testing.assert_close(DiceBCELoss(batch_dice=batch_dice)(logits, target), expected)
    # ignored elements marked -1 in the target count in neither term
    ignored = torch.rand(logits.shape, generator=g) < 0.3
    marked = target.masked_fill(ignored, -1)
    valid = (~ignored).double()
    bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * valid).sum() / valid.sum()
    expected = bce + _sigmoid_dice(logits, target, valid, batch_dice)
    loss = DiceBCELoss(batch_dice=batch_dice, ignore_index=-1)(logits, marked)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad[ignored].abs().max() == 0 and torch.isfinite(logits.grad).all()


# --- deep supervision -----------------------------------------------------------------------------------------------


def test_ds_weights():
    assert ds_weights(3) == pytest.approx([2 / 3, 1 / 3, 0])
    assert ds_weights(1) == [1.0]
    assert ds_weights(2) == pytest.approx([1.0, 0.0])
    w = ds_weights(5, last_weight=1e-6)
    assert sum(w) == pytest.approx(1) and w[-1] > 0
    with pytest.raises(ValueError):
        ds_weights(0)


def test_downsample_target_matches_unet_heads():
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    assert ds_factors(strides) == [[1, 1, 1], [1, 2, 2]]
    net = registry.build(
        "nets", "unet", in_channels=1, num_classes=3, spatial_dims=3, features_per_stage=[4, 8, 16],
        kernel_sizes=[[3, 3, 3]] * 3, strides=strides, deep_supervision=True,
    )  # fmt: skip
    with torch.no_grad():
        outputs = net(torch.zeros(1, 1, 4, 8, 12))
    target = torch.randint(0, 3, (1, 1, 4, 8, 12))
    targets = downsample_target(target, ds_factors(strides))
    assert [t.shape[2:] for t in targets] == [o.shape[2:] for o in outputs]
    # nnU-Net's alignment: F.interpolate(mode="nearest-exact") on the float target, voxel f * i + f // 2
    expected = F.interpolate(target.float(), size=(4, 4, 6), mode="nearest-exact").long()
    assert torch.equal(targets[1], expected) and torch.equal(targets[1], target[:, :, :, 1::2, 1::2])
    # odd sizes: ceil(n / f), the size a stride-f convolution with padding k // 2 produces, nearest-exact sampled
    odd = torch.arange(35.0).view(1, 1, 5, 7)
    for factor in ([2, 4], [1, 2], [2, 2]):
        size = tuple(-(-n // f) for n, f in zip((5, 7), factor))
        got = downsample_target(odd, [factor])[0]
        assert got.shape == (1, 1, *size)
        assert torch.equal(got, F.interpolate(odd, size=size, mode="nearest-exact"))


def test_deep_supervision_is_weighted_sum_and_skips_zero_weights():
    calls = []

    class Counting(CrossEntropyLoss):
        def forward(self, logits, target):
            calls.append(logits.shape)
            return super().forward(logits, target)

    logits, target = _data(shape=(2, 3, 4, 8, 8))
    factors = [[1, 1, 1], [1, 2, 2], [2, 4, 4]]
    targets = downsample_target(target, factors)
    outputs = [logits[(..., *(slice(None, None, f) for f in fac))] for fac in factors]
    loss = DeepSupervisionLoss(Counting())(outputs, targets)
    expected = 2 / 3 * F.cross_entropy(outputs[0], targets[0][:, 0]) + 1 / 3 * F.cross_entropy(
        outputs[1], targets[1][:, 0]
    )
    torch.testing.assert_close(loss, expected)
    assert len(calls) == 2  # the lowest resolution (weight 0) is never computed
    custom = DeepSupervisionLoss("ce", weights=[0.2, 0.3, 0.5])(outputs, targets)
    expected = sum(w * F.cross_entropy(o, t[:, 0]) for w, o, t in zip([0.2, 0.3, 0.5], outputs, targets))
    torch.testing.assert_close(custom, expected)
    with pytest.raises(ValueError):
        DeepSupervisionLoss("ce")(outputs, target)


# --- registry, 2D, autocast ---------------------------------------------------------------------------------------


def test_registry():
    assert {"soft_dice", "ce", "topk_ce", "dice_ce", "dice_bce", "deep_supervision"} <= set(registry.names("losses"))
    loss = registry.build("losses", "dice_ce", batch_dice=False, include_background=False)
    assert isinstance(loss, DiceCELoss)
    ds = registry.build("losses", "deep_supervision", loss=["dice_ce", {"batch_dice": True}], weights=None)
    assert isinstance(ds.loss, DiceCELoss) and ds.loss.dice.batch_dice
    spec = {"name": "dice_bce", "kwargs": {"ignore_index": -1}}  # a recipe Spec after asdict / JSON
    assert isinstance(registry.build("losses", "deep_supervision", loss=spec).loss, DiceBCELoss)


def test_2d():
    logits, target = _data(shape=(3, 4, 16, 12), ignore_fraction=0.1)
    loss = DiceCELoss(ignore_index=-1)(logits, target)
    expected = F.cross_entropy(logits, target[:, 0], ignore_index=-1) + _reference_dice(
        torch.softmax(logits, 1), target, False, False, target != -1
    )
    torch.testing.assert_close(loss, expected)
    targets = downsample_target(target, ds_factors([[1, 1], [2, 2], [2, 2]]))
    outputs = [logits, logits[..., ::2, ::2]]
    DeepSupervisionLoss(DiceCELoss(ignore_index=-1), weights=[0.6, 0.4])(outputs, targets).backward()
    assert torch.isfinite(logits.grad).all()


def test_autocast_keeps_dice_in_float32():
    logits, target = _data()
    logits = logits.detach().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = DiceCELoss()(logits, target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, DiceCELoss()(logits, target), atol=2e-2, rtol=0)
