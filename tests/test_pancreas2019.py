"""Recipe ``pancreas2019`` (van den Hork 2019): the fixed-spacing plan on a hand-made MSD Task07 fingerprint, the HU
window normaliser, size-proportional case sampling with edge padding, inverse-frequency class weights, and centre
stitching. The network is tested in ``test_isensee2017.py``, the patch set in ``test_patchset.py``."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from decathlete.data.border_sampling import SizeWeightedSampler, edge_indices, voxel_weights
from decathlete.infer.sliding_window import sliding_window_predict, tile_starts
from decathlete.infer.tile_weights import center
from decathlete.labels import LabelScheme
from decathlete.losses.base import LossContext
from decathlete.planning.rules import plan_nnunet
from decathlete.preprocess import cache, normalization
from decathlete.preprocess.pipeline import PreprocessedCase, sample_class_locations
from decathlete.recipes.base import get_recipe
from test_planning import fake_fingerprint

TASK07 = {"name": "Task07_Pancreas", "channel_names": {"0": "CT"}, "labels": {"background": 0, "pancreas": 1,
                                                                             "cancer": 2}, "label_values": [0, 1, 2]}


def test_plans_the_fixed_spacing_and_patch_on_a_pancreas_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    """MSD Task07: median spacing 0.8 x 0.8 x 2.5 mm (x, y, z), about 512 x 512 x 96 voxels, 2 foreground labels."""
    monkeypatch.setattr(normalization, "window_statistics", lambda *_args, **_kw: (40.0, 80.0))
    fingerprint = fake_fingerprint((96, 512, 512), (2.5, 0.8, 0.8), n_cases=280, channels=("CT",), labels=(0, 1, 2))
    plans = plan_nnunet(fingerprint, {**TASK07, "root": "/nowhere"}, get_recipe("pancreas2019"))
    config = plans.configuration("3d_fullres")
    assert plans.transpose_forward == [0, 1, 2]
    assert config.spacing == [2.5, 0.8, 0.8] and config.patch_size == [64, 128, 128] and config.batch_size == 2
    assert config.features_per_stage == [16, 32, 64, 128, 256] and config.network.name == "isensee2017"
    assert config.strides[1] == [1, 2, 2]  # 2.5 mm z is more than twice as coarse as 0.8 mm: pooled in plane first
    assert config.normalization == [{"scheme": "ct_window", "clip": [-100.0, 200.0], "mean": 40.0, "std": 80.0}]


def test_window_statistics_are_those_of_the_clipped_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = []
    (tmp_path / "imagesTr").mkdir()
    for i in range(2):
        image = rng.integers(-1024, 1500, (8, 6, 10)).astype(np.int16)
        images.append(image)
        nib.save(nib.Nifti1Image(image.transpose(2, 1, 0), np.eye(4)), tmp_path / "imagesTr" / f"c{i}.nii.gz")
    (tmp_path / "labelsTr").mkdir()
    for i in range(2):
        nib.save(nib.Nifti1Image(np.zeros((10, 6, 8), np.uint8), np.eye(4)), tmp_path / "labelsTr" / f"c{i}.nii.gz")
    (tmp_path / "dataset.json").write_text('{"name": "w", "modality": {"0": "CT"}, "labels": {"0": "background", '
                                           '"1": "a"}, "numTraining": 2, "training": [{"image": "./imagesTr/c0.nii.gz",'
                                           ' "label": "./labelsTr/c0.nii.gz"}, {"image": "./imagesTr/c1.nii.gz", '
                                           '"label": "./labelsTr/c1.nii.gz"}]}')
    mean, std = normalization.window_statistics({"root": str(tmp_path)}, 0, (-100, 200), stride=1)
    clipped = np.clip(np.concatenate([im.ravel() for im in images]).astype(np.float64), -100, 200)
    assert mean == pytest.approx(clipped.mean()) and std == pytest.approx(clipped.std())
    spec = normalization.get("normalizers", "ct_window").plan({"channel": 0}, {}, window=(-100, 200),
                                                               dataset={"root": str(tmp_path)})
    out = normalization.normalize(images[0][None], [spec])
    expected = (np.clip(images[0].astype(np.float64), -100, 200) - spec["mean"]) / spec["std"]
    np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-5)


def _cases(folder: Path, shapes: dict[str, tuple[int, int, int]]) -> None:
    for case_id, shape in shapes.items():
        seg = np.zeros(shape, np.int8)
        image = np.arange(np.prod(shape), dtype=np.float32).reshape(1, *shape)
        cache.write_case(folder, case_id, PreprocessedCase(image, seg, {}, sample_class_locations(seg, seed=0)))


def test_cases_are_drawn_in_proportion_to_their_voxels(tmp_path: Path) -> None:
    shapes = {"small": (4, 8, 8), "medium": (8, 8, 8), "large": (8, 16, 16)}  # 256, 512, 2048 voxels
    _cases(tmp_path, shapes)
    assert voxel_weights(tmp_path, list(shapes)) == {"small": 256.0, "medium": 512.0, "large": 2048.0}
    sampler = SizeWeightedSampler(tmp_path, list(shapes), input_size=(4, 4, 4), oversample_foreground=0.0)
    rng = np.random.default_rng(0)
    draws = [sampler.choose_case(rng) for _ in range(5600)]
    expected = np.array([256, 512, 2048]) / 2816 * len(draws)
    observed = np.array([draws.count(c) for c in shapes])
    chi2 = float((((observed - expected) ** 2) / expected).sum())
    assert chi2 < 13.8  # chi-square, 2 degrees of freedom, p = 0.001; fixed seed, so deterministic


def test_a_thin_scan_is_padded_with_its_edge_values(tmp_path: Path) -> None:
    _cases(tmp_path, {"thin": (3, 8, 8)})
    sampler = SizeWeightedSampler(tmp_path, ["thin"], input_size=(8, 8, 8), oversample_foreground=0.0)
    image, label, meta = sampler.sample_batch(1, np.random.default_rng(0))
    source = np.arange(3 * 8 * 8, dtype=np.float32).reshape(3, 8, 8)
    z = edge_indices(meta[0]["start"][0], 8, 3)
    assert meta[0]["start"][0] < 0 and np.array_equal(image[0, 0], source[z])  # repeated first and last slices
    assert label.min() == 0  # no "outside" voxels


def test_inverse_frequency_weights_come_from_the_training_labels() -> None:
    labels = LabelScheme.from_dataset(TASK07)
    context = LossContext(labels, [1.0], False, {0: 10_000, 1: 200, 2: 0})
    assert context.class_weights("inverse_frequency") == [1.0, 50.0, 50.0]  # absent class: the largest other weight
    loss = context.logits_loss("ce", {"weight": "inverse_frequency"})
    assert loss.deep_supervision.loss.weight.tolist() == [1.0, 50.0, 50.0]
    with pytest.raises(ValueError, match="loss.weight"):
        LossContext(labels, [1.0], False, {}).class_weights("inverse_frequency")


def test_centre_stitching_equals_the_model_on_each_centre_region() -> None:
    """A toy model with context (three 3x3x3 convolutions, zero-padded at each tile's border, so a tile's outer three
    voxels differ from the whole image's), tiles at half overlap: every voxel inside some tile's central half gets
    that tile's output there, up to the tiny weight the other tiles' borders keep (``BORDER_WEIGHT``, so that the
    image's rim has a value)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Conv3d(c, 2, 3, padding=1, bias=False) for c in (1, 2, 2)])
    image = torch.randn(1, 24, 24, 24)
    patch = (8, 8, 8)
    with torch.no_grad():
        out = sliding_window_predict(net.eval(), image, patch, 2, step=0.5, tile_weights=center)
        expected = torch.full_like(out, float("nan"))
        starts = tile_starts(image.shape[1:], patch, 0.5)
        for z in starts[0]:
            for y in starts[1]:
                for x in starts[2]:
                    tile = net(image[None, :, z:z + 8, y:y + 8, x:x + 8])[0]
                    expected[:, z + 2:z + 6, y + 2:y + 6, x + 2:x + 6] = tile[:, 2:6, 2:6, 2:6]
    covered = ~expected.isnan()
    assert covered[:, 2:22, 2:22, 2:22].all()  # the centres tile the image but its 2-voxel rim
    scale = out.abs().max()
    torch.testing.assert_close(out[covered], expected[covered], atol=float(1e-5 * scale), rtol=0)
    blended = sliding_window_predict(net.eval(), image, patch, 2, step=0.5)  # the Gaussian default blends
    assert (blended[covered] - expected[covered]).abs().max() > 10 * (out[covered] - expected[covered]).abs().max()


def test_top_k_cross_entropy_by_hand_with_ties_and_fewer_voxels_than_k_percent() -> None:
    """Four voxels, two classes; per-voxel CE by hand: [0, 0] -> ln 2 (either target: a tie), [2, 0] with target 0 ->
    ln(1 + e^-2), [0, 2] with target 0 -> ln(1 + e^2)."""
    from math import exp, log

    from decathlete.losses.ce import TopKCrossEntropyLoss

    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0], [2.0, 0.0], [0.0, 2.0]]).T.reshape(1, 2, 1, 4)
    target = torch.tensor([0, 1, 0, 0]).reshape(1, 1, 1, 4)
    hardest, tie, easy = log(1 + exp(2)), log(2), log(1 + exp(-2))
    assert TopKCrossEntropyLoss(k=50)(logits, target).item() == pytest.approx((hardest + tie) / 2)  # either tie
    assert TopKCrossEntropyLoss(k=5)(logits, target).item() == pytest.approx(hardest)  # 5 % of 4 voxels: still one
    assert TopKCrossEntropyLoss(k=100)(logits, target).item() == pytest.approx((hardest + 2 * tie + easy) / 4)
    weighted = TopKCrossEntropyLoss(k=50, weight=[1.0, 3.0])  # the tie broken: class 1's voxel now weighs 3 ln 2
    assert weighted(logits, target).item() == pytest.approx((hardest + 3 * tie) / 2)


def test_confusion_counts_by_hand() -> None:
    labels = LabelScheme.from_dataset(TASK07)
    logits = torch.zeros(1, 3, 1, 1, 5)
    logits[0, [0, 1, 2, 2, 1], 0, 0, range(5)] = 1.0  # predicted 0 1 2 2 1
    label = torch.tensor([0, 1, 1, 2, -1]).view(1, 1, 1, 1, 5)  # the last voxel is "outside": not counted
    assert labels.confusion_counts(logits, label).tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    regions = LabelScheme.from_dataset({**TASK07, "regions": {"all": [1, 2]}, "regions_class_order": [1]})
    assert regions.confusion_counts(logits[:, :1], label) is None


def test_recipe_is_the_papers() -> None:
    recipe = get_recipe("pancreas2019")
    assert recipe.optimizer.kwargs == {"lr": 1e-3} and recipe.schedule.kwargs == {"gamma": 0.985, "every": 4000}
    assert recipe.planning.target_spacing == (2.5, 0.8, 0.8) and recipe.planning.patch_size_3d == (64, 128, 128)
    assert recipe.planning.normalization[0].kwargs["window"] == [-100.0, 200.0]
    assert recipe.sampler.name == "size_weighted" and recipe.sampler.kwargs["pad_mode"] == "edge"
    assert recipe.net.name == "isensee2017" and recipe.planning.base_features == 16


TASK106 = Path(__file__).resolve().parents[2] / "shared" / "data" / "Task106_OpenKBP_HeadNeckCT"
# CPU-sized: the recipe's 0.8 mm in-plane spacing turns these 128^3 scans at ~4.5 mm into ~700 x 700 x 128 volumes
SMALL = ["--set", "planning.target_spacing=[2.5,3.2,3.2]", "--set", "planning.patch_size_3d=[16,32,32]",
         "--set", "planning.base_features=4"]


@pytest.mark.integration
@pytest.mark.skipif(not TASK106.is_dir(), reason="../shared/data/Task106_OpenKBP_HeadNeckCT absent")
def test_task106_through_the_cli(tmp_path: Path) -> None:
    """plan (HU window statistics measured), preprocess, train from the cache and from an HDF5 patch set, predict
    with Gaussian and with centre stitching (exact geometry), evaluate."""
    import json

    from decathlete.cli import main as cli
    from decathlete.planning.plans import Plans
    from test_rippel2018 import _subset

    data, work = _subset(TASK106, tmp_path / "data", 4), tmp_path / "work"
    assert cli(["plan", str(data), "-o", str(work), "--recipe", "pancreas2019", "-c", "3d_fullres", *SMALL]) == 0
    config = Plans.load(work / "plans.json").configuration("3d_fullres")
    spec = config.normalization[0]
    assert spec["scheme"] == "ct_window" and spec["clip"] == [-100.0, 200.0] and spec["std"] > 0
    assert cli(["preprocess", str(work), "-c", "3d_fullres"]) == 0
    assert cli(["train", str(work), "-c", "3d_fullres", "-f", "0", "--epochs", "1", "--iterations-per-epoch", "2",
                "--val-iterations", "1", "--device", "cpu", "-j", "0"]) == 0
    assert cli(["patches", str(work), "-c", "3d_fullres", "-f", "0", "--train", "6", "--val", "4"]) == 0
    assert cli(["train", str(work), "-c", "3d_fullres", "-f", "0", "--epochs", "1", "--iterations-per-epoch", "2",
                "--val-iterations", "1", "--device", "cpu", "-j", "0", "-o", str(tmp_path / "from_patches"),
                "--set", "sampler=patch_set"]) == 0  # the paper's way: training and validation from the HDF5 files
    assert (tmp_path / "from_patches" / "fold_0" / "checkpoint_final.pth").is_file()
    case = json.loads((work / "splits.json").read_text())[0]["val"][0]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / f"{case}.nii.gz").symlink_to(data / "imagesTr" / f"{case}.nii.gz")
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / f"{case}.nii.gz").symlink_to(data / "labelsTr" / f"{case}.nii.gz")
    for weighting in ("gaussian", "center"):
        out = tmp_path / f"out_{weighting}"
        assert cli(["predict", "-i", str(tmp_path / "in"), "-o", str(out), "-m", str(work), "-c", "3d_fullres",
                    "-f", "0", "--device", "cpu", "--set", f"inference.tile_weighting={weighting}"]) == 0
        pred, ref = nib.load(out / f"{case}.nii.gz"), nib.load(tmp_path / "ref" / f"{case}.nii.gz")
        assert pred.shape == ref.shape and np.array_equal(pred.affine, ref.affine)
        assert cli(["evaluate", str(out), str(tmp_path / "ref"), "--labels", str(work)]) == 0


def test_synthetic_abdominal_ct_through_the_cli(tmp_path: Path) -> None:
    """The benchmark's synthetic abdominal CT (int16 HU, five organs, 2.5 x 0.8 x 0.8 mm: the recipe's own spacing,
    so nothing is resampled): plan, preprocess, train, predict a new scan with exact geometry. Runs everywhere."""
    import subprocess
    import sys

    from decathlete.cli import main as cli
    from decathlete.planning.plans import Plans

    generator = Path(__file__).resolve().parents[1] / "benchmarks" / "_synthetic_ct.py"
    subprocess.run([sys.executable, str(generator), str(tmp_path), "--train-cases", "4", "--train-shape", "16", "64",
                    "64", "--test-shape", "18", "70", "66"], check=True)
    work, small = tmp_path / "work", ["--set", "planning.patch_size_3d=[16,32,32]", "--set", "planning.base_features=4"]
    assert cli(["plan", str(tmp_path / "Task99_SyntheticCT"), "-o", str(work), "--recipe", "pancreas2019", "-c",
                "3d_fullres", *small]) == 0
    config = Plans.load(work / "plans.json").configuration("3d_fullres")
    assert config.spacing == pytest.approx([2.5, 0.8, 0.8]) and config.normalization[0]["scheme"] == "ct_window"
    assert cli(["preprocess", str(work), "-c", "3d_fullres"]) == 0
    assert cli(["train", str(work), "-c", "3d_fullres", "-f", "0", "--epochs", "1", "--iterations-per-epoch", "2",
                "--val-iterations", "1", "--device", "cpu", "-j", "0"]) == 0
    assert cli(["predict", "-i", str(tmp_path / "test"), "-o", str(tmp_path / "out"), "-m", str(work), "-c",
                "3d_fullres", "-f", "0", "--device", "cpu"]) == 0
    pred, ref = nib.load(tmp_path / "out" / "ct.nii.gz"), nib.load(tmp_path / "test" / "ct.nii.gz")
    assert pred.shape == ref.shape and np.array_equal(pred.affine, ref.affine)
