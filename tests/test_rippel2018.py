"""Recipe ``rippel2018`` (Rippel 2018, MSD): the per-axis depth and patch rule on hand-made fingerprints, the
generalised Dice it trains with, the elastic field isotropic in millimetres, the reflecting sampler, the budget's
respect for the recipe's batch and schedule, and the CLI pipeline on the real data where it is present (the
``factorized_iou`` recipe's pipeline too; its network and loss are tested in ``test_factorized_iou.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from decathlete.augment import spatial
from decathlete.augment.extra import rippel2018 as rippel_preset
from decathlete.cli import main as cli
from decathlete.data.border_sampling import ReflectPatchSampler, read_reflected, reflected_indices
from decathlete.losses.overlap import GeneralizedDiceLoss
from decathlete.planning import budget
from decathlete.planning.plans import Plans
from decathlete.planning.rippel2018 import axis_depths, plan_rippel2018, rippel_patch
from decathlete.preprocess import cache
from decathlete.preprocess.pipeline import PreprocessedCase, sample_class_locations
from decathlete.recipes.base import get_recipe
from test_planning import fake_fingerprint

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HIPPOCAMPUS, TASK105 = DATA / "Task04_Hippocampus", DATA / "Task105_PyradiomicsBrainMR"
DATASET = {"name": "fake", "channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2},
           "label_values": [0, 1, 2]}


def plan(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Plans:
    return plan_rippel2018(fake_fingerprint(shape, spacing), DATASET, get_recipe("rippel2018"))


# (median shape, spacing) -> depth per axis in the planned order, patch, strides, kernels, transposition; by hand:
# d = min(floor(log2(n / 8)), 4), patch 2^(3 + d), stride and kernel 1 where an axis has stopped.
CASES = {
    "isotropic": ((36, 50, 35), (1.0, 1.0, 1.0), [2, 2, 2], [32, 32, 32],
                  [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [[3, 3, 3]] * 3, [0, 1, 2]),
    "anisotropic": ((24, 256, 256), (6.5, 0.78, 0.78), [1, 4, 4], [16, 128, 128],
                    [[1, 1, 1], [2, 2, 2], [1, 2, 2], [1, 2, 2], [1, 2, 2]],
                    [[3, 3, 3], [3, 3, 3], [1, 3, 3], [1, 3, 3], [1, 3, 3]], [0, 1, 2]),
    "tiny axis": ((5, 64, 64), (1.0, 1.0, 1.0), [0, 3, 3], [8, 64, 64],
                  [[1, 1, 1], [1, 2, 2], [1, 2, 2], [1, 2, 2]], [[3, 3, 3]] + [[1, 3, 3]] * 3, [0, 1, 2]),
    "huge axis": ((900, 40, 40), (1.0, 1.0, 1.0), [4, 2, 2], [128, 32, 32],
                  [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 1, 1], [2, 1, 1]],
                  [[3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 1, 1], [3, 1, 1]], [0, 1, 2]),
    # a sagittal stack: the coarse x axis moves first, (x, z, y) = (20, 300, 100) -> depths (1, 4, 3)
    "sagittal": ((300, 100, 20), (0.8, 0.8, 4.0), [1, 4, 3], [16, 128, 64],
                 [[1, 1, 1], [2, 2, 2], [1, 2, 2], [1, 2, 2], [1, 2, 1]],
                 [[3, 3, 3], [3, 3, 3], [1, 3, 3], [1, 3, 3], [1, 3, 1]], [2, 0, 1]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_depth_patch_and_topology_by_hand(name: str) -> None:
    shape, spacing, depths, patch, strides, kernels, forward = CASES[name]
    plans = plan(shape, spacing)
    config = plans.configuration("3d_fullres")
    assert list(plans.configurations) == ["3d_fullres"] and plans.transpose_forward == forward
    assert axis_depths(np.asarray(shape)[forward]) == depths and rippel_patch(depths) == patch
    assert config.patch_size == patch and config.strides == strides and config.kernel_sizes == kernels
    assert config.spacing == pytest.approx(np.asarray(spacing)[forward].tolist())
    assert config.features_per_stage == [6 * 2**s for s in range(len(strides))] and config.batch_size == 4
    assert not config.crop_to_nonzero and config.network.kwargs["block"] == "residual"


def test_patch_caps_and_depth_limit() -> None:
    assert axis_depths([7, 8, 15, 16, 17, 127, 128, 5000]) == [0, 0, 0, 1, 1, 3, 4, 4]
    assert rippel_patch([4, 4, 4]) == [128, 128, 128]  # 2^7: below both caps (128 through, 256 in plane)


def test_generalised_dice_with_background_and_unit_weights_is_one_minus_soft_accuracy() -> None:
    """The reason the recipe leaves the background out: sum_l tp_l = the probability mass on the true class and
    sum_l (P_l + R_l) = 2N, so GDL(w = 1, background) = 1 - mean true-class probability."""
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 4, 5, 6), torch.randint(0, 3, (2, 1, 4, 5, 6))
    loss = GeneralizedDiceLoss(include_background=True, weight="uniform", batch=True, smooth=0.0)
    accuracy = torch.softmax(logits, 1).gather(1, target).mean()
    torch.testing.assert_close(loss(logits, target), 1 - accuracy)
    foreground = GeneralizedDiceLoss(include_background=False, weight="uniform", batch=True, smooth=0.0)
    probs, onehot = torch.softmax(logits, 1)[:, 1:], torch.nn.functional.one_hot(target[:, 0], 3).movedim(-1, 1)[:, 1:]
    pooled = 2 * (probs * onehot).sum() / (probs.sum() + onehot.sum())  # one Dice pooled over the foreground
    torch.testing.assert_close(foreground(logits, target), 1 - pooled)


def test_elastic_field_is_isotropic_in_millimetres(monkeypatch: pytest.MonkeyPatch) -> None:
    sigmas = []
    smooth = spatial.gaussian_smooth

    def recording(x, sigma, **kwargs):
        sigmas.append(sigma.clone())
        return smooth(x, sigma, **kwargs)

    monkeypatch.setattr(spatial, "gaussian_smooth", recording)
    patch, mm = (16, 32, 32), (4.0, 1.0, 1.0)  # extents 64, 32, 32 mm: the shortest, 32 mm, sets the field
    gen = torch.Generator().manual_seed(0)
    field = spatial.elastic_field(gen, 2, patch, (0.1, 0.1), (0.2, 0.2), spacing=mm)
    peak = field.flatten(2).abs().amax(2)  # (n, 3) largest displacement per component, voxels
    torch.testing.assert_close(peak, torch.tensor([[0.2 * 8 / 2, 0.2 * 32 / 2, 0.2 * 32 / 2]] * 2))
    assert (peak * torch.tensor(mm)).allclose(torch.full((2, 3), 3.2))  # 3.2 mm along every axis
    per_axis = sigmas[-1].view(2, 3, 3)[:, 0]  # one row per field component; each row holds the sigma of every axis
    sigma_mm = per_axis * spatial.ELASTIC_STEP * torch.tensor(mm)  # coarse-grid units -> voxels -> mm
    assert sigma_mm.allclose(torch.full((2, 3), 0.1 * 32))
    nnunet = spatial.elastic_field(torch.Generator().manual_seed(0), 2, patch, (0.1, 0.1), (0.2, 0.2))
    torch.testing.assert_close(nnunet.flatten(2).abs().amax(2), torch.tensor([[1.6, 3.2, 3.2]] * 2))


def test_rippel_preset_reads_the_plans_spacing() -> None:
    config = plan((24, 256, 256), (6.5, 0.78, 0.78)).configuration("3d_fullres")
    aug = rippel_preset(config)
    assert aug.elastic_spacing == pytest.approx((6.5, 0.78, 0.78)) and aug.p_elastic > 0
    assert aug.p_noise > 0 and aug.p_rotation > 0 and aug.p_scaling > 0
    assert aug.p_mirror == aug.p_gamma == aug.p_blur == aug.p_brightness == aug.p_contrast == aug.p_lowres == 0


@pytest.mark.parametrize("start, size, n", [(-7, 25, 4), (3, 5, 10), (-1, 3, 1), (-20, 60, 6)])
def test_reflected_indices_match_numpys_reflect_padding(start: int, size: int, n: int) -> None:
    before = max(0, -start)
    padded = np.pad(np.arange(n), (before, max(0, start + size - n)), mode="reflect")
    assert reflected_indices(start, size, n).tolist() == padded[start + before:start + before + size].tolist()


def test_reflect_sampler_mirrors_image_and_label_alike(tmp_path: Path) -> None:
    seg = np.zeros((6, 7, 5), dtype=np.int8)
    seg[1:3, 2:5, 1:3] = 1
    image = np.indices(seg.shape).astype(np.float32).sum(0, keepdims=True) + 10 * seg
    cache.write_case(tmp_path, "c", PreprocessedCase(image, seg, {}, sample_class_locations(seg, seed=0)))
    sampler = ReflectPatchSampler(tmp_path, ["c"], input_size=(16, 16, 16), oversample_foreground=0.0)
    img, lab, meta = sampler.sample_batch(2, np.random.default_rng(0))
    start = meta[0]["start"]
    pads = [(max(0, -s), max(0, s + 16 - n)) for s, n in zip(start, seg.shape)]
    window = tuple(slice(s + p[0], s + p[0] + 16) for s, p in zip(start, pads))
    assert np.array_equal(img[0, 0], np.pad(image[0], pads, mode="reflect")[window])
    assert np.array_equal(lab[0, 0], np.pad(seg, pads, mode="reflect")[window])
    assert lab.min() >= 0  # no "outside" voxels: the scan fills the window
    out = np.empty((1, 3, 3, 3), dtype=np.float32)
    assert np.array_equal(read_reflected(image, [0, 0, 0], [3, 3, 3], out), image[:, :3, :3, :3])


def test_budget_keeps_the_recipes_batch_and_schedule_length(tmp_path: Path) -> None:
    plans = plan((36, 50, 35), (1.0, 1.0, 1.0))
    config = plans.configuration("3d_fullres")

    def measure(candidate, _plans, _device):  # a fast step: the budget could hold far more than 30,000
        return {"step_seconds": 0.001 * candidate.batch_size, "forward_seconds": 0.0}

    fitted = budget.fit_to_budget(config, plans, 3600.0, torch.device("cpu"), measure, log=lambda *_: None)
    assert fitted.batch_size == 4 and fitted.features_per_stage == config.features_per_stage
    assert fitted.training["iterations"] <= 30_000 < budget.iterations_in(3600.0, 0.004, 0.0)
    assert fitted.training["iterations"] > 29_000  # rounded down to whole epochs only
    assert all(c["batch_size"] == 4 for c in fitted.training["candidates"])


def test_recipe_is_the_papers() -> None:
    recipe = get_recipe("rippel2018")
    assert recipe.planner == "rippel2018" and recipe.planning.base_features == 6 and recipe.planning.batch_size == 4
    assert recipe.optimizer.name == "adam" and recipe.optimizer.kwargs["lr"] == 5e-4
    assert recipe.schedule.kwargs == {"gamma": 0.984, "every": 100}
    assert recipe.epochs * recipe.iterations_per_epoch == 30_000
    assert recipe.loss.name == "generalized_dice" and recipe.loss.kwargs["weight"] == "uniform"
    assert recipe.sampler.name == "reflect_patch" and recipe.sampler.kwargs["oversample_foreground"] == 0
    assert recipe.inference.max_tile == (128, 512, 512) and not recipe.inference.postprocessing


def _subset(source: Path, dst: Path, n: int) -> Path:
    """The first ``n`` training cases of ``source`` as a dataset of links (nothing copied)."""
    meta = json.loads((source / "dataset.json").read_text())
    meta["training"], meta["numTraining"] = meta["training"][:n], n
    meta.pop("test", None)
    meta["numTest"] = 0
    for entry in meta["training"]:
        for key in ("image", "label"):
            (dst / entry[key]).parent.mkdir(parents=True, exist_ok=True)
            (dst / entry[key]).symlink_to((source / entry[key]).resolve())
    (dst / "dataset.json").write_text(json.dumps(meta))
    return dst


def _pipeline(data: Path, recipe: str, tmp_path: Path, folds: tuple[str, ...]) -> Path:
    """plan, preprocess, train (a few steps per fold), crossval, predict and evaluate through the CLI."""
    work = tmp_path / "work"
    assert cli(["plan", str(data), "-o", str(work), "--recipe", recipe, "-c", "3d_fullres"]) == 0
    assert cli(["preprocess", str(work), "-c", "3d_fullres"]) == 0
    for fold in folds:
        assert cli(["train", str(work), "-c", "3d_fullres", "-f", fold, "--epochs", "1", "--iterations-per-epoch",
                    "2", "--val-iterations", "1", "--device", "cpu", "-j", "0"]) == 0
    assert cli(["crossval", str(work), "-c", "3d_fullres", "-f", *folds]) == 0
    case = json.loads((work / "splits.json").read_text())[0]["val"][0]
    meta = json.loads((data / "dataset.json").read_text())
    entry = next(e for e in meta["training"] if Path(e["label"]).name == f"{case}.nii.gz")
    for folder, key in (("in", "image"), ("ref", "label")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / f"{case}.nii.gz").symlink_to((data / entry[key]).resolve())
    assert cli(["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m", str(work), "-c",
                "3d_fullres", "-f", folds[0], "--device", "cpu"]) == 0
    out, ref = nib.load(tmp_path / "out" / f"{case}.nii.gz"), nib.load(tmp_path / "ref" / f"{case}.nii.gz")
    assert out.shape == ref.shape and np.array_equal(out.affine, ref.affine)
    assert cli(["evaluate", str(tmp_path / "out"), str(tmp_path / "ref"), "--labels", str(work)]) == 0
    return work


@pytest.mark.integration
@pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason="../shared/data/Task04_Hippocampus absent")
@pytest.mark.parametrize("recipe", ["rippel2018", "factorized_iou"])
def test_hippocampus_through_the_cli(recipe: str, tmp_path: Path) -> None:
    work = _pipeline(_subset(HIPPOCAMPUS, tmp_path / "data", 6), recipe, tmp_path, ("0", "1"))
    chosen = json.loads((work / "models" / "3d_fullres" / recipe / "postprocessing.json").read_text())
    if recipe == "rippel2018":  # the paper applies none: candidates are reported, nothing is chosen
        assert not chosen["foreground"] and not chosen["per_class"] and "allows no postprocessing" in chosen["rule"]


@pytest.mark.integration
@pytest.mark.skipif(not TASK105.is_dir(), reason="../shared/data/Task105_PyradiomicsBrainMR absent")
def test_anisotropic_task105_through_the_cli(tmp_path: Path) -> None:
    work = _pipeline(TASK105, "rippel2018", tmp_path, ("0", "1"))
    config = Plans.load(work / "plans.json").configuration("3d_fullres")
    assert config.spacing[0] > 5 * config.spacing[1]  # 6.5 mm slices kept: the median spacing, no resampling rule
    assert config.strides[2][0] == 1 and config.kernel_sizes[2][0] == 1  # z stops after one halving
