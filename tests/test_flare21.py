"""Recipe ``flare21_2d`` (Witanto 2021, FLARE21): the z-isotropic 2D plan, its resampling round trip with exact
geometry, global CT normalisation by hand, and the recipe through the CLI with its efficiency report. The lesion
transform is tested in ``test_lesion.py``, the efficiency meter in ``test_efficiency.py``."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from decathlete.infer.predictor import invert_preprocessing
from decathlete.io.images import Geometry, read_geometry, read_label, write_image
from decathlete.planning.flare21 import acquisition_axis, isotropic_spacing, plan_flare21_2d
from decathlete.preprocess import normalization
from decathlete.preprocess.pipeline import preprocess_case
from decathlete.recipes.base import get_recipe
from test_planning import fake_fingerprint

FLARE = {"name": "FLARE21", "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "kidney": 2,
                                                                     "spleen": 3, "pancreas": 4},
         "label_values": [0, 1, 2, 3, 4]}


@pytest.mark.parametrize(("spacing", "axis", "iso"), [((3.0, 0.8, 0.8), 0, 0.8), ((4.7, 4.7, 2.5), 2, 4.7),
                                                      ((0.8, 5.0, 0.8), 1, 0.8), ((1.0, 1.0, 1.0), 0, 1.0),
                                                      ((2.5, 0.7, 0.9), 0, 0.7)])
def test_the_acquisition_axis_is_the_odd_one_out(spacing: tuple, axis: int, iso: float) -> None:
    assert acquisition_axis(spacing) == axis and isotropic_spacing(spacing, axis) == iso


def _plan(monkeypatch: pytest.MonkeyPatch, shape: tuple, spacing: tuple, n_cases: int = 361):
    monkeypatch.setattr(normalization, "clipped_foreground_statistics", lambda *_a, **_k: (90.0, 60.0))
    fingerprint = fake_fingerprint(shape, spacing, n_cases=n_cases, channels=("CT",), labels=(0, 1, 2, 3, 4))
    return plan_flare21_2d(fingerprint, {**FLARE, "root": "/nowhere"}, get_recipe("flare21_2d"))


def test_plans_the_papers_2d_configuration_on_a_flare_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    """FLARE21: ~100 x 512 x 512 voxels at 2.5 x 0.8 x 0.8 mm. nnU-Net's 2D rule at 8 GB gives the paper's 512 x 512
    patch at batch 12 on the isotropic volumes."""
    plans = _plan(monkeypatch, (100, 512, 512), (2.5, 0.8, 0.8))
    assert list(plans.configurations) == ["2d"] and plans.transpose_forward == [0, 1, 2]
    config = plans.configuration("2d")
    assert config.spacing == pytest.approx([0.8, 0.8, 0.8]) and config.spatial_dims == 2
    assert config.median_shape == [512, 512]
    assert "median shape [312, 512, 512]" in config.notes[0]  # 100 slices of 2.5 mm = 312 of 0.8 (paper: 93 -> 269)
    assert config.patch_size == [512, 512] and config.batch_size == 12
    assert config.features_per_stage[0] == 32 and config.batch_dice is True
    assert config.resampling["separate_axis_order"] == 1 and config.resampling["keep_slice_axis_spacing"] is False
    assert config.normalization == [{"scheme": "ct", "clip": [-1.0, 50.0], "mean": 90.0, "std": 60.0}]
    assert config.crop_to_nonzero is False


def test_a_fine_acquisition_axis_is_moved_first_and_coarsened(monkeypatch: pytest.MonkeyPatch) -> None:
    """Task106's layout: 4.7 mm in plane, 2.5 mm along the last array axis: that axis is the slice axis, moved first,
    and resampled to 4.7 mm."""
    plans = _plan(monkeypatch, (128, 128, 128), (4.7, 4.7, 2.5), n_cases=40)
    assert plans.transpose_forward == [2, 0, 1] and plans.transpose_backward == [1, 2, 0]
    config = plans.configuration("2d")
    assert config.spacing == pytest.approx([4.7] * 3) and "median shape [68, 128, 128]" in config.notes[0]


def _write(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array.transpose(2, 1, 0), affine), path)  # (z, y, x) -> NIfTI's (x, y, z)


def _dataset(root: Path, images: list[np.ndarray], labels: list[np.ndarray]) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    entries = []
    for i, (image, label) in enumerate(zip(images, labels)):
        _write(root / "imagesTr" / f"c{i}.nii.gz", image, np.eye(4))
        _write(root / "labelsTr" / f"c{i}.nii.gz", label, np.eye(4))
        entries.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": "g", "modality": {"0": "CT"}, "labels": {
        "0": "background", "1": "a"}, "numTraining": len(entries), "training": entries}))
    return root


def test_global_ct_normalisation_by_hand(tmp_path: Path) -> None:
    """Clip to the foreground percentiles, then z-score with the mean and std of every clipped foreground voxel of
    the training set (not nnU-Net's unclipped ones, not per case)."""
    a = np.full((2, 2, 2), 500, np.int16)
    a.flat[:3] = [-2000, 0, 10]
    b = np.full((2, 2, 2), -700, np.int16)
    b.flat[:2] = [20, 3000]
    la, lb = np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 2), np.uint8)
    la.flat[:3], lb.flat[:2] = 1, 1
    root = _dataset(tmp_path, [a, b], [la, lb])
    stats = {"channel": 0, "percentile_00_5": -100.0, "percentile_99_5": 100.0, "mean": 123.0, "std": 456.0}
    scheme = normalization.get("normalizers", "ct")
    spec = scheme.plan(stats, {}, statistics="clipped", dataset={"root": str(root)})
    # clipped foreground: -100, 0, 10, 20, 100 -> mean 6, variance (106^2 + 6^2 + 4^2 + 14^2 + 94^2) / 5 = 4064
    assert spec["clip"] == [-100.0, 100.0]
    assert spec["mean"] == pytest.approx(6.0) and spec["std"] == pytest.approx(np.sqrt(4064.0))
    out = normalization.normalize(a[None], [spec])[0]
    assert out.flat[0] == pytest.approx(-106 / np.sqrt(4064)) and out.flat[-1] == pytest.approx(94 / np.sqrt(4064))
    assert scheme.plan(stats, {}) == {"scheme": "ct", "clip": [-100.0, 100.0], "mean": 123.0, "std": 456.0}
    with pytest.raises(ValueError, match="statistics must be"):
        scheme.plan(stats, {}, statistics="mean")


def test_the_z_isotropic_round_trip_keeps_geometry_exact(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An oblique scan at 0.8 x 0.8 x 2.4 mm (x, y, z) with its slice axis last in the file: preprocessing makes it
    isotropic (3x the slices), and the way back restores the file's grid exactly and the label nearly so."""
    plans = _plan(monkeypatch, (20, 20, 8), (0.8, 0.8, 2.4), n_cases=4)
    settings = plans.preprocessing_config("2d")
    rng = np.random.default_rng(0)
    image = rng.normal(40, 20, (20, 20, 8)).astype(np.int16)
    label = np.zeros((20, 20, 8), np.uint8)
    label[4:15, 5:16, 2:6] = 1
    theta = np.deg2rad(20)
    affine = np.diag([2.4, 0.8, 0.8, 1.0])  # NIfTI (x, y, z): the last array axis is 2.4 mm
    affine[:3, :3] = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]]) \
        @ affine[:3, :3]
    affine[:3, 3] = [-12.5, 30.25, 7.0]
    _write(tmp_path / "img.nii.gz", image, affine)
    _write(tmp_path / "seg.nii.gz", label, affine)
    case = preprocess_case([tmp_path / "img.nii.gz"], tmp_path / "seg.nii.gz", settings)
    assert case.data.shape == (1, 24, 20, 20)  # the 8 slices of 2.4 mm became 24 of 0.8 mm, moved first
    seg = case.seg.reshape(case.data.shape[1:])
    one_hot = np.stack([seg == 0, seg == 1]).astype(np.float32)
    back, _ = invert_preprocessing(one_hot, case.properties, [0, 1])
    assert back.shape == label.shape
    assert (back == label).mean() > 0.99 and np.array_equal(back[:, :, 3:5], label[:, :, 3:5])
    write_image(back, Geometry.from_dict(case.properties["geometry"]), tmp_path / "out.nii.gz", dtype=back.dtype)
    _, written = read_label(tmp_path / "out.nii.gz")
    assert written.same_grid(read_geometry(tmp_path / "img.nii.gz")[0]) == []
    assert np.allclose(nib.load(tmp_path / "out.nii.gz").affine, affine, atol=1e-5)


def test_recipe_is_the_papers() -> None:
    recipe = get_recipe("flare21_2d")
    assert recipe.planner == "flare21_2d" and recipe.net.name == "unet" and recipe.planning.base_features == 32
    assert recipe.optimizer.kwargs == {"lr": 1e-2, "momentum": 0.99, "nesterov": True, "weight_decay": 3e-5}
    assert recipe.schedule.name == "poly" and (recipe.epochs, recipe.iterations_per_epoch) == (1000, 250)
    assert recipe.loss.name == "dice_ce" and recipe.sampler.kwargs["oversample_foreground"] == 0.33
    assert recipe.augment.name == "nnunet" and recipe.augment.extra[0].name == "lesion"
    assert recipe.planning.crop_to_nonzero is False and recipe.planning.normalization[0].kwargs == {
        "statistics": "clipped"}
    assert recipe.inference.postprocessing is False and recipe.inference.tta is False


def test_synthetic_abdominal_ct_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The benchmark's synthetic abdominal CT (2.5 x 0.8 x 0.8 mm): plan (2D, isotropic), preprocess, train with
    lesions, predict a new scan with exact geometry and an efficiency report, evaluate with per-organ NSD
    tolerances (the report merged into the summary), crossval."""
    import subprocess
    import sys

    from decathlete.cli import main as cli
    from decathlete.planning.plans import Plans

    generator = Path(__file__).resolve().parents[1] / "benchmarks" / "_synthetic_ct.py"
    subprocess.run([sys.executable, str(generator), str(tmp_path), "--train-cases", "4", "--train-shape", "12", "48",
                    "48", "--test-shape", "10", "52", "44"], check=True)
    work, data = tmp_path / "work", tmp_path / "Task99_SyntheticCT"
    assert cli(["plan", str(data), "-o", str(work), "--recipe", "flare21_2d", "--set", "planning.base_features=4",
                "--set", 'augment.extra=[{"name": "lesion", "kwargs": {"p": 1.0}}]']) == 0
    plans = Plans.load(work / "plans.json")
    config = plans.configuration("2d")
    assert list(plans.configurations) == ["2d"] and config.spacing == pytest.approx([0.8] * 3)
    assert config.normalization[0]["scheme"] == "ct" and config.normalization[0]["std"] > 0
    assert cli(["preprocess", str(work), "-c", "2d"]) == 0
    train = ["-c", "2d", "--epochs", "1", "--iterations-per-epoch", "2", "--val-iterations", "1", "--device", "cpu",
             "-j", "0"]
    assert cli(["train", str(work), "-f", "0", *train]) == 0
    out = tmp_path / "out"
    assert cli(["predict", "-i", str(tmp_path / "test"), "-o", str(out), "-m", str(work), "-c", "2d", "-f", "0",
                "--device", "cpu"]) == 0
    assert "efficiency: 1 case(s)" in capsys.readouterr().out
    pred, ref = nib.load(out / "ct.nii.gz"), nib.load(tmp_path / "test" / "ct.nii.gz")
    assert pred.shape == ref.shape and np.array_equal(pred.affine, ref.affine)
    record = json.loads((out / "efficiency.json").read_text())
    cost = record["cases"]["ct"]
    assert cost["patches"] == round(10 * 2.5 / 0.8)  # one whole slice per forward input, no mirroring
    assert record["run"]["flops_per_patch"] > 0 and record["run"]["parameters"] > 0 and cost["flops"] > 0
    assert cost["preprocess_seconds"] + cost["network_seconds"] + cost["export_seconds"] <= cost["seconds"] + 1e-3
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "ct.nii.gz").symlink_to(tmp_path / "test" / "ct.nii.gz")  # scored against its own image
    summary = tmp_path / "summary.json"
    assert cli(["evaluate", str(out), str(tmp_path / "test"), "--labels", str(work), "-o", str(summary),
                "--nsd-tolerance", "2", "spine=3", "1=0.5"]) == 0
    scored = json.loads(summary.read_text())
    assert scored["efficiency"]["summary"]["n_cases"] == 1 and scored["efficiency"]["run"]["configuration"] == "2d"
    assert scored["conventions"]["nsd_tolerance_mm"] == {"liver": 0.5, "spleen": 2.0, "kidney_left": 2.0,
                                                         "kidney_right": 2.0, "spine": 3.0}
    assert cli(["crossval", str(work), "-c", "2d", "-f", "0", "--device", "cpu"]) == 0
    folder = work / "models" / "2d" / "flare21_2d"
    assert (folder / "fold_0" / "validation" / "efficiency.json").is_file()


TASK106 = Path(__file__).resolve().parents[2] / "shared" / "data" / "Task106_OpenKBP_HeadNeckCT"


@pytest.mark.integration
@pytest.mark.skipif(not TASK106.is_dir(), reason="../shared/data/Task106_OpenKBP_HeadNeckCT absent")
def test_task106_through_the_cli(tmp_path: Path) -> None:
    """Real CT with its slice axis last (2.5-3 mm against ~4.7 mm in plane): plan (moved first, isotropic, clipped
    foreground statistics measured), preprocess, train, crossval, predict with exact geometry, evaluate."""
    from decathlete.cli import main as cli
    from decathlete.planning.plans import Plans
    from test_rippel2018 import _subset

    data, work = _subset(TASK106, tmp_path / "data", 4), tmp_path / "work"
    assert cli(["plan", str(data), "-o", str(work), "--recipe", "flare21_2d", "--set", "planning.base_features=4"]) == 0
    plans = Plans.load(work / "plans.json")
    config = plans.configuration("2d")
    assert plans.transpose_forward[0] == acquisition_axis(np.median(
        [c["spacing"] for c in json.loads((work / "fingerprint.json").read_text())["cases"]], axis=0))
    assert np.ptp(config.spacing) == 0 and config.spacing[0] > 3.5  # isotropic at the in-plane spacing
    spec = config.normalization[0]
    assert spec["scheme"] == "ct" and spec["clip"][0] < spec["mean"] < spec["clip"][1] and spec["std"] > 0
    assert cli(["preprocess", str(work), "-c", "2d"]) == 0
    assert cli(["train", str(work), "-c", "2d", "-f", "0", "--epochs", "1", "--iterations-per-epoch", "2",
                "--val-iterations", "1", "--device", "cpu", "-j", "0"]) == 0
    assert cli(["crossval", str(work), "-c", "2d", "-f", "0", "--device", "cpu"]) == 0
    case = json.loads((work / "splits.json").read_text())[0]["val"][0]
    for folder in ("in", "ref"):
        (tmp_path / folder).mkdir()
    (tmp_path / "in" / f"{case}.nii.gz").symlink_to(data / "imagesTr" / f"{case}.nii.gz")
    (tmp_path / "ref" / f"{case}.nii.gz").symlink_to(data / "labelsTr" / f"{case}.nii.gz")
    out = tmp_path / "out"
    assert cli(["predict", "-i", str(tmp_path / "in"), "-o", str(out), "-m", str(work), "-c", "2d", "-f", "0",
                "--device", "cpu"]) == 0
    pred, ref = nib.load(out / f"{case}.nii.gz"), nib.load(tmp_path / "ref" / f"{case}.nii.gz")
    assert pred.shape == ref.shape and np.array_equal(pred.affine, ref.affine)
    assert cli(["evaluate", str(out), str(tmp_path / "ref"), "--labels", str(work), "--nsd-tolerance",
                "Mandible=2"]) == 0
    assert json.loads((out / "summary.json").read_text())["efficiency"]["summary"]["n_cases"] == 1
