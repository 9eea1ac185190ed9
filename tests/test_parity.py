"""nnU-Net v2 parity of the default's numerics: batch Dice (also over DDP ranks), rank-aware foreground
oversampling, weight initialisation, re-masking after augmentation, deep-supervision targets, validation patches,
resuming a finished run. Each case is checked against nnU-Net's rule written out by hand."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from decathlete.augment import augment
from decathlete.data.sampling import rank_oversample_fraction
from decathlete.losses import SoftDiceLoss
from decathlete.nets.unet import DynamicUNet, ResidualBlock
from decathlete.recipes.base import get_recipe
from decathlete.recipes.build import build_augmentation, build_loss, build_sampler
from decathlete.train.batches import ValidationBatches

pytestmark = pytest.mark.usefixtures("one_thread")

DATASET = {"label_values": [0, 1, 2], "labels": {"background": 0, "a": 1, "b": 2}}


def _plans_and_config(batch_dice: bool) -> tuple[SimpleNamespace, SimpleNamespace]:
    plans = SimpleNamespace(dataset=DATASET, fingerprint_summary={})
    config = SimpleNamespace(strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], batch_dice=batch_dice)
    return plans, config


@pytest.mark.parametrize("planned", [True, False])
def test_plans_batch_dice_reaches_the_default_loss(planned: bool):
    plans, config = _plans_and_config(planned)
    loss = build_loss(get_recipe("default"), config, plans)
    assert loss.deep_supervision.loss.dice.batch_dice is planned
    chosen = get_recipe("default").with_overrides([f"loss.batch_dice={str(not planned).lower()}"])
    assert build_loss(chosen, config, plans).deep_supervision.loss.dice.batch_dice is (not planned)


def test_ddp_flag_reaches_the_dice_of_a_multi_rank_run():
    plans, config = _plans_and_config(True)
    assert build_loss(get_recipe("default"), config, plans, world_size=2).deep_supervision.loss.dice.ddp
    assert not build_loss(get_recipe("default"), config, plans, world_size=1).deep_supervision.loss.dice.ddp


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(4, 3, 6, 5, 4, generator=g)
    target = torch.randint(0, 3, (4, 1, 6, 5, 4), generator=g)
    target[0] = 0  # one sample without foreground: per-rank and global batch Dice differ clearly
    return logits, target


def _rank_batch_dice(rank: int, world: int, init: str, out: str, ddp: bool) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        logits, target = _global_batch()
        share = logits.shape[0] // world
        mine = logits[rank * share:(rank + 1) * share].clone().requires_grad_(True)
        loss = SoftDiceLoss("softmax", batch_dice=True, ddp=ddp)(mine, target[rank * share:(rank + 1) * share])
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": mine.grad}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_ranks(tmp_path: Path, ddp: bool) -> list[dict[str, torch.Tensor]]:
    init = f"file://{tmp_path / ('rendezvous_ddp' if ddp else 'rendezvous_local')}"
    mp.spawn(_rank_batch_dice, args=(2, init, str(tmp_path), ddp), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_batch_dice_under_ddp_is_the_global_batch_dice(tmp_path: Path):
    logits, target = _global_batch()
    logits.requires_grad_(True)
    single = SoftDiceLoss("softmax", batch_dice=True)(logits, target)
    single.backward()
    ranks = _run_ranks(tmp_path, ddp=True)
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result["loss"], single.detach())
        # every rank's loss is the global Dice; the backward sums the ranks' gradients of the global sums, and DDP's
        # average over ranks then equals one process's gradient on the whole batch
        torch.testing.assert_close(result["grad"], 2 * logits.grad[2 * rank:2 * rank + 2])
    local = _run_ranks(tmp_path, ddp=False)
    assert not torch.isclose(local[0]["loss"], single.detach())  # without the all-reduce: each rank's own batch


def _nnunet_forced(global_batch: int, world: int, fraction: float) -> list[bool]:
    """Which samples of the global batch nnU-Net forces, rank by rank (its dataloader's rule on each rank's share)."""
    sizes = [global_batch // world + (1 if r < global_batch % world else 0) for r in range(world)]
    forced = []
    for rank, size in enumerate(sizes):
        share = rank_oversample_fraction(fraction, global_batch, world, rank)
        forced += [not i < round(size * (1 - share)) for i in range(size)]
    return forced


@pytest.mark.parametrize(("global_batch", "world", "expected"), [
    (2, 1, [False, True]),             # one process: the last sample of two
    (2, 2, [False, True]),             # two ranks, one sample each: rank 1 forces its sample (was: none forced)
    (4, 2, [False, False, False, True]),  # round(4 * 0.67) = 3 unforced, as in one process; rank 1 forces 1 of 2
    (6, 4, [False, False, False, False, True, True]),
    (3, 3, [False, False, True]),
])
def test_foreground_oversampling_counts_the_global_batch(global_batch: int, world: int, expected: list[bool]):
    assert _nnunet_forced(global_batch, world, 0.33) == expected


def test_build_sampler_gives_each_rank_its_share(tmp_path: Path):
    config = SimpleNamespace(batch_size=2, patch_size=[8, 8, 8], spatial_dims=3, resampling={})
    recipe = get_recipe("default")
    shares = [build_sampler(recipe, config, tmp_path, ["a"], [8, 8, 8], rank=r, world_size=2).oversample_foreground
              for r in range(2)]
    assert shares[0] == 0.0 and shares[1] == pytest.approx(0.66)
    assert build_sampler(recipe, config, tmp_path, ["a"], [8, 8, 8]).oversample_foreground == 0.33


@pytest.mark.parametrize("block", ["plain", "residual"])
def test_weights_start_as_nnunets(block: str):
    torch.manual_seed(0)
    net = DynamicUNet(2, 3, spatial_dims=3, features_per_stage=[16, 32, 64], kernel_sizes=[[3, 3, 3]] * 3,
                      strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], block=block, n_blocks_per_stage=2)
    convs = [m for m in net.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    big = max(convs, key=lambda m: m.weight.numel())
    fan_in = big.weight[0].numel() if isinstance(big, torch.nn.Conv3d) else big.weight[:, 0].numel()
    he_std = (2 / (1 + 0.01**2)) ** 0.5 / fan_in**0.5  # Kaiming normal for LeakyReLU(0.01); PyTorch's: 0.577/sqrt
    assert big.weight.std().item() == pytest.approx(he_std, rel=0.05)
    assert all(m.bias is None or not m.bias.any() for m in convs)
    last_norms = [m.conv2[1] for m in net.modules() if isinstance(m, ResidualBlock)]
    assert len(last_norms) == (6 if block == "residual" else 0)  # 3 stages x 2 blocks
    assert all(not n.weight.any() and not n.bias.any() for n in last_norms)
    first_norm = next(m for m in net.modules() if isinstance(m, torch.nn.InstanceNorm3d))
    assert (first_norm.weight == 1).all()  # other norms keep weight 1


def test_torch_init_keeps_pytorchs_defaults():
    torch.manual_seed(0)
    net = DynamicUNet(2, 3, spatial_dims=3, features_per_stage=[16, 32, 64], kernel_sizes=[[3, 3, 3]] * 3,
                      strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], block="residual", init="torch")
    conv = max((m for m in net.modules() if isinstance(m, torch.nn.Conv3d)), key=lambda m: m.weight.numel())
    assert conv.weight.std().item() == pytest.approx(1 / (3 * conv.weight[0].numel()) ** 0.5, rel=0.05)
    assert all(m.conv2[1].weight.all() for m in net.modules() if isinstance(m, ResidualBlock))
    with pytest.raises(ValueError, match="init"):
        DynamicUNet(2, 3, spatial_dims=3, features_per_stage=[16], kernel_sizes=[[3, 3, 3]], strides=[[1, 1, 1]],
                    init="xavier")


def test_channels_normalised_in_the_mask_are_zero_outside_it_after_augmentation():
    config = SimpleNamespace(spatial_dims=3, patch_size=[8, 12, 12], strides=[[1, 1, 1]] * 2,
                             normalization=[{"scheme": "zscore", "use_nonzero_mask": True},
                                            {"scheme": "zscore", "use_nonzero_mask": False}])
    augmentation, _ = build_augmentation(get_recipe("default"), config)
    assert augmentation.mask_channels == (0,)
    image = torch.zeros(2, 2, 8, 12, 12)  # normalised: exactly 0 outside the mask, as at inference
    label = torch.zeros(2, 1, 8, 12, 12, dtype=torch.int16)
    label[..., :4] = -1  # outside the nonzero mask
    noisy = replace(augmentation, p_noise=1.0, noise_std=(0.5, 0.5), p_rotation=0.0, p_scaling=0.0, p_mirror=0.0)
    out, out_label = augment(image, label, [8, 12, 12], noisy, torch.Generator().manual_seed(0))
    outside = (out_label < 0).expand(-1, 1, -1, -1, -1)[:, 0]
    assert outside.any() and (out[:, 0][outside] == 0).all() and (out[:, 0][~outside] != 0).all()
    assert (out[:, 1][outside] != 0).all()  # a channel normalised everywhere keeps its noise


class _RecordingSampler:
    """Stands in for a sampler: the "patch" is the first number its generator draws."""

    def sample_batch(self, batch_size: int, rng: np.random.Generator) -> tuple:
        draw = rng.integers(1 << 30, size=batch_size)
        return draw.astype(np.float32)[:, None], draw.astype(np.int16)[:, None], []


def test_validation_patches_are_drawn_afresh_each_epoch():
    batches = ValidationBatches(_RecordingSampler(), batch_size=2, seed=0, rank=0, n_batches=3)
    cpu = torch.device("cpu")

    def patches(epoch: int) -> list[list[float]]:
        return [image[:, 0].tolist() for image, _ in batches.iterate(cpu, epoch)]

    assert patches(0) == patches(0)  # a pure function of the epoch: resumed runs validate identically
    assert patches(1) != patches(0) and len({tuple(p) for p in patches(0) + patches(1)}) == 6
