"""Recipe ``segresnet_vae`` (Myronenko 2018): the network, its losses, the BraTS region mapping, the augmentation,
the planner's depth cap and budget crop, and the whole CLI pipeline on the real BraTS data where it is present."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from decathlete import api
from decathlete.augment.extra import mirror_only, shift_scale
from decathlete.cli import main as cli
from decathlete.data.sampling import PatchSampler
from decathlete.labels import LabelScheme
from decathlete.losses.base import LossContext, TrainingBatch
from decathlete.losses.vae import DiceVAELoss, SquaredDiceLoss, kl_divergence
from decathlete.nets.base import NetOutput
from decathlete.nets.segresnet import SegResNet, group_norm
from decathlete.planning import budget
from decathlete.planning.plans import Plans
from decathlete.planning.rules import pool_and_conv_props
from decathlete.recipes.base import Recipe, RecipeError, validate
from decathlete.recipes.build import with_recipe_regions
from decathlete.registry import get
from decathlete.synthetic import make_synthetic_dataset

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TASK101, TASK102 = DATA / "Task101_BraTS2015_FLAIR_T1c", DATA / "Task102_BraTSToolkitExamples_4ch"
SMALL = (8, 16, 32, 64)


def recipe() -> Recipe:
    return get("recipes", "segresnet_vae")()


def net(dims: int = 3, vae: bool = True, patch: tuple[int, ...] = (16, 32, 24)) -> SegResNet:
    torch.manual_seed(0)
    return SegResNet(2, 3, spatial_dims=dims, features_per_stage=SMALL, vae=vae, train_patch_size=patch)


@pytest.mark.parametrize("dims, patch", [(3, (16, 32, 24)), (2, (32, 24))])
def test_shapes_with_and_without_the_vae(dims: int, patch: tuple[int, ...]) -> None:
    model = net(dims, True, patch).train()
    out = model(torch.randn(2, 2, *patch))
    assert isinstance(out, NetOutput) and out.logits.shape == (2, 3, *patch)
    assert out.aux["reconstruction"].shape == (2, 2, *patch)
    assert out.aux["mean"].shape == out.aux["log_variance"].shape == (2, 128)
    plain = net(dims, False, patch).train()
    assert plain(torch.randn(2, 2, *patch)).shape == (2, 3, *patch)
    assert not any(name.startswith("vae") for name, _ in plain.named_parameters())


def test_vae_branch_is_not_run_at_inference_and_any_tile_size_works() -> None:
    model = net().eval()
    calls = []
    model.vae_down.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        out = model(torch.randn(1, 2, 24, 40, 32))  # not the training patch, and 24 is no multiple of 16
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 24, 40, 32) and not calls
    model.train()
    model(torch.randn(1, 2, 16, 32, 24))
    assert calls == [1]


def test_group_norm_takes_the_largest_group_count_that_divides() -> None:
    assert group_norm(32).num_groups == 8 and group_norm(12).num_groups == 6 and group_norm(4).num_groups == 4


@pytest.mark.parametrize("dims", [2, 3])
def test_parameter_count_matches_monai(dims: int) -> None:
    """Same settings as MONAI's SegResNet / SegResNetVAE (estimated std, 128 latent dimensions). Ours gives the VAE
    its own decoder where MONAI reuses the segmentation decoder: exactly those parameters more."""
    nets = pytest.importorskip("monai.networks.nets", reason="MONAI (a test extra) is not installed")
    patch = (32, 48, 64)[-dims:]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    ours = SegResNet(4, 3, spatial_dims=dims, features_per_stage=(32, 64, 128, 256))
    theirs = nets.SegResNet(spatial_dims=dims, init_filters=32, in_channels=4, out_channels=3, dropout_prob=0.2)
    assert count(ours) == count(theirs) == SegResNet.parameter_count(4, 3, spatial_dims=dims,
                                                                     features_per_stage=(32, 64, 128, 256))
    ours = SegResNet(4, 3, spatial_dims=dims, features_per_stage=(32, 64, 128, 256), vae=True, train_patch_size=patch)
    theirs = nets.SegResNetVAE(input_image_size=patch, vae_estimate_std=True, vae_nz=128, spatial_dims=dims,
                               init_filters=32, in_channels=4, out_channels=3, dropout_prob=0.2)
    assert count(ours) == count(theirs) + count(theirs.up_samples) + count(theirs.up_layers)


def test_squared_dice_against_a_hand_computed_case() -> None:
    # Logits 0 -> p = 0.5 everywhere; region 0 holds 2 of 4 voxels, region 1 none.
    logits = torch.zeros(1, 2, 4)
    target = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    eps = 1e-5
    dice0 = (2 * 1.0 + eps) / (4 * 0.25 + 2 + eps)  # 2 sum(p t) = 2 * (0.5 + 0.5); sum p^2 = 1; sum t^2 = 2
    dice1 = eps / (1 + eps)
    expected = (1 - dice0) + (1 - dice1)
    assert SquaredDiceLoss(region_based=True)(logits, target).item() == pytest.approx(expected, rel=1e-6)
    perfect = torch.tensor([[[20.0, 20.0, -20.0, -20.0], [-20.0] * 4]])
    assert SquaredDiceLoss(region_based=True)(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    # Softmax classes, background left out: class 1 predicted 0.5 on its two voxels.
    label = torch.tensor([[[1, 1, 0, 0]]])
    assert SquaredDiceLoss(region_based=False)(torch.zeros(1, 2, 4), label).item() == pytest.approx(1 - dice0)


def test_kl_and_the_full_loss_against_hand_computed_values() -> None:
    mean = torch.tensor([[1.0, 0.0]])
    log_variance = torch.tensor([[0.0, math.log(2.0)]])
    # (1 + 1 - 0 - 1) + (0 + 2 - ln 2 - 1), divided by the 8 voxels of the crop.
    assert kl_divergence(mean, log_variance, 8).item() == pytest.approx((2 - math.log(2)) / 8)
    labels = LabelScheme.from_dataset({"label_values": [0, 1, 2], "labels": {},
                                       "regions": {"a": [1, 2], "b": [2]}, "regions_class_order": [1, 2]})
    loss = DiceVAELoss(context=LossContext(labels, [1.0], batch_dice=False))
    image = torch.ones(1, 1, 2, 2, 2)
    label = torch.zeros(1, 1, 2, 2, 2, dtype=torch.long)
    label[..., 0, :] = 2
    batch = TrainingBatch(image, label, [labels.targets(label)])
    logits = torch.zeros(1, 2, 2, 2, 2)
    dice = SquaredDiceLoss()(logits, labels.targets(label)).item()
    reconstruction = torch.full_like(image, 0.5)  # squared error 0.25 everywhere
    output = NetOutput(logits, {"reconstruction": reconstruction, "mean": mean, "log_variance": log_variance})
    assert loss(output, batch).item() == pytest.approx(dice + 0.1 * 0.25 + 0.1 * (2 - math.log(2)) / 8, rel=1e-6)
    assert loss(NetOutput(logits, {}), batch).item() == pytest.approx(dice, rel=1e-6)  # validation: Dice only


BRATS2015 = {"name": "BraTS2015", "label_values": [0, 1, 2, 3, 4],
             "labels": {"background": 0, "necrosis": 1, "edema": 2, "non-enhancing tumour": 3, "enhancing tumour": 4}}
BRATS_TOOLKIT = {"name": "BraTSToolkit", "label_values": [0, 1, 2, 3],
                 "labels": {"background": 0, "necrotic / non-enhancing tumour core": 1, "peritumoral edema": 2,
                            "enhancing tumour": 3}}
MSD_BRATS = {"name": "MSD", "label_values": [0, 1, 2, 3],
             "labels": {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}}


@pytest.mark.parametrize("dataset, regions, order", [
    (BRATS2015, {"whole tumour": [1, 2, 3, 4], "tumour core": [1, 3, 4], "enhancing tumour": [4]}, [2, 1, 4]),
    (BRATS_TOOLKIT, {"whole tumour": [1, 2, 3], "tumour core": [1, 3], "enhancing tumour": [3]}, [2, 1, 3]),
    (MSD_BRATS, {"whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing tumour": [3]}, [1, 2, 3]),
])
def test_regions_map_from_label_names_and_round_trip(dataset: dict, regions: dict, order: list[int]) -> None:
    mapped = with_recipe_regions(dataset, recipe())
    assert mapped["regions"] == regions and mapped["regions_class_order"] == order
    scheme = LabelScheme.from_dataset(mapped)
    values = dataset["label_values"]
    label = torch.tensor(values * 3).view(1, 1, 1, 3, len(values))
    masks = scheme.targets(label)[0]  # labels -> regions
    painted = torch.zeros_like(label[0, 0])
    for mask, value in zip(masks, scheme.output_values):  # regions -> labels, as the predictor paints them
        painted[mask > 0.5] = value
    assert torch.equal(scheme.targets(painted[None, None])[0], masks)  # every region survives
    # BraTS 2015: necrosis and non-enhancing tumour are both "core, not enhancing" and come back as necrosis.
    expected = label[0, 0].clone()
    if dataset is BRATS2015:
        expected[expected == 3] = 1
    assert torch.equal(painted, expected)


def test_unmatched_label_names_are_a_clear_error() -> None:
    dataset = {"name": "Numbers", "label_values": [0, 1, 2], "labels": {"background": 0, "one": 1, "two": 2}}
    message = r"the label '\*edema\*', which matches no label of Numbers \(its labels: one, two\).*--set 'regions="
    with pytest.raises(RecipeError, match=message):
        with_recipe_regions(dataset, recipe())
    override = recipe().with_overrides(['regions={"regions": {"all": [1, 2], "two": ["two"]}}'])
    assert with_recipe_regions(dataset, override)["regions"] == {"all": [1, 2], "two": [2]}


def test_recipe_is_the_papers() -> None:
    r = validate(recipe())
    assert r.net.name == "segresnet" and r.net.kwargs["vae"] and r.loss.name == "dice_vae"
    assert r.optimizer.kwargs == {"lr": 1e-4, "weight_decay": 1e-5} and r.schedule.kwargs == {"power": 0.9}
    assert r.planning.batch_size == 1 and r.planning.n_blocks_per_stage == (1, 2, 2, 4) and r.planning.max_stages == 4
    assert r.augment.name == "mirror_only" and [s.name for s in r.augment.extra] == ["shift_scale"]
    config = mirror_only(None)  # type: ignore[arg-type]
    assert config.p_mirror == 0.5 and config.p_rotation == config.p_noise == config.p_gamma == 0.0


def test_crops_are_forced_onto_tumour_at_batch_one() -> None:
    """nnU-Net's positional rule forces no crop of a batch of 1 (round(1 * 0.67) = 1); the recipe draws per crop."""
    kwargs = recipe().sampler.kwargs
    sampler = PatchSampler.__new__(PatchSampler)
    sampler.oversample_foreground = kwargs["oversample_foreground"]
    sampler.probabilistic_oversampling = kwargs["probabilistic_oversampling"]
    rng = np.random.default_rng(0)
    forced = np.mean([sampler.force_foreground(0, 1, rng) for _ in range(3000)])
    assert abs(forced - 0.33) < 0.03
    sampler.probabilistic_oversampling = False
    assert not any(sampler.force_foreground(0, 1, rng) for _ in range(100))


def test_shift_scale_is_an_affine_map_per_channel_inside_the_image() -> None:
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 6, 6, 6) * torch.tensor([1.0, 2.0, 5.0]).view(1, 3, 1, 1, 1)
    label = torch.zeros(2, 1, 6, 6, 6)
    label[:, :, :2] = -1  # outside the nonzero mask
    out, same = shift_scale(image.clone(), label, gen)
    assert same is label
    inside = label[0, 0] >= 0
    assert torch.equal(out[:, :, ~inside], image[:, :, ~inside])
    for b in range(2):
        for c in range(3):
            x, y = image[b, c][inside], out[b, c][inside]
            slope = ((y - y.mean()) * (x - x.mean())).sum() / ((x - x.mean()) ** 2).sum()
            shift = (y / slope - x).mean()  # y = (x + shift) * slope
            assert 0.9 <= slope <= 1.1 and abs(shift) <= 0.1 * x.std(unbiased=False) + 1e-5
            assert torch.allclose(y, (x + shift) * slope, atol=1e-4)
    untouched, _ = shift_scale(image.clone(), label, gen, p=0.0)
    assert torch.equal(untouched, image)


def test_max_stages_caps_the_depth() -> None:
    strides, _, patch, divisor = pool_and_conv_props([1.0, 1.0, 1.0], [160, 192, 128], max_stages=4)
    assert len(strides) == 4 and divisor == [8, 8, 8] and patch == [160, 192, 128]
    assert len(pool_and_conv_props([1.0, 1.0, 1.0], [160, 192, 128])[0]) == 6


def test_the_budget_shrinks_the_crop_when_the_recipe_allows_it(tmp_path: Path) -> None:
    data = make_synthetic_dataset(tmp_path / "raw", n_cases=2, shape=(48, 64, 64))
    overrides = ['regions={"regions": {"all": ["*"], "one": [1]}}']  # the synthetic labels are no tumour
    plans = api.plan(data, tmp_path / "work", recipe="segresnet_vae", progress=False, configurations=["3d_fullres"],
                     overrides=overrides)
    config = plans.configuration("3d_fullres")
    assert config.batch_size == 1 and config.n_stages == 4

    def measure(candidate, _plans, _device):  # a step costs 1 s per 2^18 voxels
        return {"step_seconds": math.prod(candidate.patch_size) / 2**18, "forward_seconds": 0.0}

    assert math.prod(config.patch_size) > 0.2 * 2**18  # too slow for the budget below at any width
    fitted = budget.fit_to_budget(config, plans, 2000 * 0.1 + budget.STARTUP_SECONDS, torch.device("cpu"), measure,
                                  log=lambda *_: None)
    assert fitted.batch_size == 1 and fitted.features_per_stage[0] == 8
    assert 0.03 * 2**18 < math.prod(fitted.patch_size) <= 0.1 * 2**18
    divisor = [math.prod(s[a] for s in config.strides) for a in range(3)]
    assert all(p % d == 0 and p >= 4 * d for p, d in zip(fitted.patch_size, divisor))
    assert fitted.network.kwargs["train_patch_size"] == fitted.patch_size
    assert fitted.training["iterations"] >= budget.MIN_ITERATIONS
    kept = budget.fit_to_budget(config, Plans.from_dict({**plans.to_dict(), "recipe_settings": None}), 100.0,
                                torch.device("cpu"), measure, log=lambda *_: None)
    assert kept.patch_size == config.patch_size  # without planning.budget_crop the patch stays


def _brats_pipeline(task: Path, tmp_path: Path) -> None:
    """plan, preprocess, train, predict, evaluate and crossval through the CLI with a CPU-sized variant."""
    work, small = tmp_path / "work", ["--set", "planning.patch_size_3d=[32,32,32]", "--set", "planning.base_features=8"]
    assert cli(["plan", str(task), "-o", str(work), "--recipe", "segresnet_vae", "-c", "3d_fullres", *small]) == 0
    plans = Plans.load(work / "plans.json")
    assert set(plans.dataset["regions"]) == {"whole tumour", "tumour core", "enhancing tumour"}
    assert cli(["preprocess", str(work), "-c", "3d_fullres"]) == 0
    for fold in ("0", "1"):
        assert cli(["train", str(work), "-c", "3d_fullres", "-f", fold, "--epochs", "1", "--iterations-per-epoch",
                    "2", "--val-iterations", "1", "--device", "cpu", "-j", "0"]) == 0
    case = json.loads((work / "splits.json").read_text())[0]["val"][0]
    source = task / "imagesTr" / f"{case}.nii.gz"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / source.name).symlink_to(source)
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / source.name).symlink_to(task / "labelsTr" / source.name)
    assert cli(["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m", str(work), "-c",
                "3d_fullres", "-f", "0", "--no-tta", "--device", "cpu"]) == 0
    out, ref = nib.load(tmp_path / "out" / source.name), nib.load(source)
    assert out.shape == ref.shape[:3] and np.array_equal(out.affine, ref.affine)
    assert set(np.unique(np.asarray(out.dataobj)).tolist()) <= set(plans.dataset["regions_class_order"]) | {0}
    assert cli(["evaluate", str(tmp_path / "out"), str(tmp_path / "ref"), "--labels", str(work)]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {"whole tumour", "tumour core", "enhancing tumour"} <= set(summary["mean"])
    assert all("hd95" in summary["mean"][r] for r in ("whole tumour", "tumour core", "enhancing tumour"))
    assert cli(["crossval", str(work), "-c", "3d_fullres", "-f", "0", "1", "--no-tta"]) == 0


@pytest.mark.integration
@pytest.mark.skipif(not TASK102.is_dir(), reason="../shared/data/Task102_BraTSToolkitExamples_4ch absent")
def test_task102_four_channels_through_the_cli(tmp_path: Path) -> None:
    _brats_pipeline(TASK102, tmp_path)
