"""The 3d_lowres -> 3d_cascade_fullres cascade (issue 20): planning, the previous stage's labels on the cascade's
grid, the one-hot input channels and their augmentations (against SciPy's morphology with a hand-built ball), the
sampler's second label channel, and the whole route through train, crossval and predict on a tiny dataset."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from decathlete import api
from decathlete.crossval import write_next_stage_inputs
from decathlete.data import cascade
from decathlete.data.sampling import PatchSampler
from decathlete.infer.cascade import CascadePredictor
from decathlete.infer.predictor import Predictor, load_predictor
from decathlete.infer.provenance import PROVENANCE_FILE
from decathlete.io.images import read_geometry, read_label
from decathlete.planning.budget import choose_configuration
from decathlete.planning.plans import Plans
from decathlete.preprocess import cache
from decathlete.preprocess.pipeline import labels_on_preprocessed_grid, preprocess_case
from decathlete.recipes.build import build_network, input_channels, plans_recipe
from decathlete.synthetic import make_synthetic_dataset
from decathlete.train.probe import time_step
from synthetic import make_msd_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
QUICK = {"epochs": 1, "iterations_per_epoch": 2, "val_iterations": 1, "device": "cpu", "num_workers": 0,
         "progress": False}
CASES = ["synth_000", "synth_001", "synth_002", "synth_003"]
SPLITS = [{"train": CASES[:2], "val": CASES[2:]}, {"train": CASES[2:], "val": CASES[:2]}]
# A patch of 16^3 covers under a quarter of the 21 x 42 x 43 median image: nnU-Net's rule plans a lowres stage.
SMALL_PATCH = ["planning.patch_size_3d=[16,16,16]"]


def ball(radius: float) -> np.ndarray:
    """scikit-image's ``ball``: the voxels within ``radius`` of the centre."""
    r = int(np.floor(radius))
    grid = np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1]
    return (grid**2).sum(0) <= radius**2


def blobs() -> np.ndarray:
    rng = np.random.default_rng(3)
    return ndimage.gaussian_filter(rng.normal(size=(20, 22, 24)), 2.0) > 0.15


@pytest.mark.parametrize("radius", [1.0, 2.5, 4.0])
def test_morphology_is_scipys_with_a_ball(radius: float) -> None:
    mask, s = blobs(), ball(radius)
    dilated = ndimage.binary_dilation(mask, structure=s)
    eroded = ndimage.binary_erosion(mask, structure=s, border_value=1)  # scikit-image's border: no erosion from it
    expected = {0: dilated, 1: eroded,
                2: ndimage.binary_dilation(eroded, structure=s),
                3: ndimage.binary_erosion(dilated, structure=s, border_value=1)}
    for which, reference in expected.items():
        np.testing.assert_array_equal(cascade.binary_operation(mask, which, radius), reference, err_msg=str(which))
    empty = np.zeros((4, 4, 4), bool)
    assert not cascade.binary_operation(empty, 0, 2.0).any() and cascade.binary_operation(~empty, 1, 2.0).all()


def test_component_removal_takes_one_small_component() -> None:
    mask = np.zeros((10, 10, 10), bool)
    mask[0:2, 0:2, 0:2] = True  # 8 voxels
    mask[5:7, 5:7, 5:8] = True  # 12 voxels
    mask[:, :, 9] = True  # 100 voxels = 10% of the array: still below 15%
    big = np.zeros((10, 10, 10), bool)
    big[:4, :4] = True  # 160 voxels = 16%: never removed
    components = [(slice(0, 2), slice(0, 2), slice(0, 2)), (slice(5, 7), slice(5, 7), slice(5, 8)),
                  (slice(None), slice(None), 9)]
    removed = []
    for pick in (0.0, 0.34, 0.67, 0.99):
        out = cascade.remove_component(mask, pick)
        gone = [i for i, c in enumerate(components) if not out[c].any()]
        assert len(gone) == 1 and out.sum() == mask.sum() - mask[components[gone[0]]].sum()  # one whole component
        removed.append(gone[0])
    assert sorted(set(removed)) == [0, 1, 2] and removed[2] == removed[3]  # the pick chooses among all three
    np.testing.assert_array_equal(cascade.remove_component(big, 0.5), big)


def test_previous_stage_channels_one_hot_and_seeded_augmentation() -> None:
    image = torch.zeros((2, 1, 12, 12, 12))
    previous = torch.zeros((2, 1, 12, 12, 12), dtype=torch.int16)
    previous[:, :, 2:8, 2:8, 2:8] = 1
    previous[:, :, 9:11, 9:11, 9:11] = 2
    previous[1, :, 0, 0, 0] = -1  # "outside": no channel
    out = cascade.previous_stage_channels(image, previous, [1, 2])
    assert out.shape == (2, 3, 12, 12, 12) and out.dtype == image.dtype
    for k, v in ((1, 1), (2, 2)):
        torch.testing.assert_close(out[:, k:k + 1], (previous == v).float())
    runs = [cascade.previous_stage_channels(image, previous, [1, 2], torch.Generator().manual_seed(s))
            for s in (0, 0, 1, 2, 3, 4, 5)]
    torch.testing.assert_close(runs[0], runs[1])  # the generator alone decides
    assert any(not torch.equal(r, out) for r in runs)  # some draw changes the channels
    assert all(torch.equal(r[:, :1], image) for r in runs)  # the image is left alone


def test_labels_on_the_preprocessed_grid_are_the_cached_labels(tmp_path: Path) -> None:
    """A case's own label file, brought onto its preprocessed grid by the cascade's route, is exactly the label the
    preprocessing cached, with a transposition (the coarse axis last in the file), a crop and resampling."""
    raw = make_msd_dataset(tmp_path / "raw", n_cases=1, shape=(10, 12, 8), spacing=(1.0, 1.0, 3.0))
    image, label = raw / "imagesTr" / "case_000.nii.gz", raw / "labelsTr" / "case_000.nii.gz"
    config = {"spacing": [2.0, 0.7, 0.9], "transpose_forward": [2, 0, 1]}
    case = preprocess_case(image, label, config)
    assert case.properties["shape_after_resampling"] != list(read_label(label)[0].shape)
    np.testing.assert_array_equal(labels_on_preprocessed_grid(read_label(label)[0], case.properties), case.seg)
    with pytest.raises(ValueError, match="is not on the case's grid"):
        labels_on_preprocessed_grid(np.zeros((3, 3, 3), np.uint8), case.properties)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four cases planned with a lowres stage and its cascade, two folds of 3d_lowres trained and cross-validated,
    and the cascade's two folds trained on their predictions."""
    root = tmp_path_factory.mktemp("cascade")
    raw = make_synthetic_dataset(root / "raw", n_cases=4, shape=(24, 48, 48))
    work = root / "work"
    api.plan(raw, work, recipe="tiny", workers=1, progress=False, overrides=SMALL_PATCH)
    api.preprocess(work, ["3d_lowres", "3d_cascade_fullres"], workers=1, progress=False)
    (work / "splits.json").write_text(json.dumps(SPLITS))
    api.train(work, "3d_lowres", "every", **QUICK)
    api.crossval(work, "3d_lowres", progress=False, device="cpu", save_probabilities=True)
    api.train(work, "3d_cascade_fullres", "every", **QUICK)
    return work


def test_the_plan_stacks_the_cascade_on_the_lowres_stage(work: Path) -> None:
    plans = Plans.load(work / "plans.json")
    assert list(plans.configurations) == ["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"]
    full, cascade_config = plans.configuration("3d_fullres"), plans.configuration("3d_cascade_fullres")
    assert cascade_config.previous_stage == "3d_lowres" and full.previous_stage is None
    # the cascade is 3d_fullres's plan, on its cache, with one more input channel per foreground label (2 here)
    for key in ("spacing", "patch_size", "batch_size", "strides", "data_identifier", "network", "batch_dice"):
        assert getattr(cascade_config, key) == getattr(full, key), key
    assert input_channels(cascade_config, plans) == 3 and input_channels(full, plans) == 1
    net = build_network(cascade_config, plans)
    assert next(net.parameters()).shape[1] == 3
    assert cascade_config.parameters == sum(p.numel() for p in net.parameters()) > full.parameters


def test_the_budget_probe_times_the_cascades_step_and_rule_7_passes_it_over(work: Path) -> None:
    plans = Plans.load(work / "plans.json")
    config = plans.configuration("3d_cascade_fullres")
    timing = time_step(config, plans, torch.device("cpu"), plans_recipe(plans), steps=1, warmup=0)
    assert timing["step_seconds"] > 0 and timing["forward_seconds"] > 0
    budgeted = {name: replace(c, training={"iterations": 5000 if name == "3d_cascade_fullres" else 100})
                for name, c in plans.configurations.items()}
    choice = choose_configuration(budgeted)  # the cascade needs 3d_lowres trained first: never the budget's pick
    assert choice is not None and choice["configuration"] != "3d_cascade_fullres"
    assert "3d_cascade_fullres" not in choice["iterations"]


def test_a_plan_keeping_the_cascade_without_its_stage_is_refused(work: Path, tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="3d_cascade_fullres needs 3d_lowres"):
        api.plan(work.parent / "raw", tmp_path / "w", recipe="tiny", progress=False, overrides=SMALL_PATCH,
                 configurations=["3d_fullres", "3d_cascade_fullres"])


def test_crossval_of_the_lowres_stage_writes_the_cascades_inputs(work: Path) -> None:
    result = json.loads((work / "models" / "3d_lowres" / "tiny" / "crossval" / "result.json").read_text())
    folder = Path(result["next_stages"]["3d_cascade_fullres"])
    assert folder == work / "models" / "3d_lowres" / "tiny" / "predicted_next_stage" / "3d_fullres"
    plans = Plans.load(work / "plans.json")
    for k, split in enumerate(SPLITS):
        for cid in split["val"]:  # each case as the fold that held it out predicted it, on the cascade's grid
            prediction = work / "models" / "3d_lowres" / "tiny" / f"fold_{k}" / "validation" / f"{cid}.nii.gz"
            props = cache.read_properties(work / "preprocessed" / "3d_fullres", cid)
            expected = labels_on_preprocessed_grid(read_label(prediction)[0], props)
            np.testing.assert_array_equal(np.load(folder / f"{cid}.npy"), expected)
    assert cascade.crossval_predictions(work, plans, folder.parent.parent)[CASES[0]].parent.parent.name == "fold_1"


def test_the_sampler_reads_the_previous_stage_as_a_second_label_channel(work: Path) -> None:
    folder = work / "models" / "3d_lowres" / "tiny" / "predicted_next_stage" / "3d_fullres"
    cases = work / "preprocessed" / "3d_fullres"
    sampler = PatchSampler(cases, CASES, (16, 20, 20), previous_stage=folder)
    image, label, meta = sampler.sample_batch(3, np.random.default_rng(0))
    assert image.shape == (3, 1, 16, 20, 20) and label.shape == (3, 2, 16, 20, 20)
    plain = PatchSampler(cases, CASES, (16, 20, 20)).sample_batch(3, np.random.default_rng(0))
    np.testing.assert_array_equal(plain[1][:, 0], label[:, 0])  # the same windows
    for i, m in enumerate(meta):
        previous = np.load(folder / f"{m['case_id']}.npy")
        z, y, x = m["start"]
        window = np.full((16, 20, 20), -1, np.int16)
        src = tuple(slice(max(s, 0), min(s + n, d)) for s, n, d in zip((z, y, x), (16, 20, 20), previous.shape))
        dst = tuple(slice(a.start - s, a.stop - s) for a, s in zip(src, (z, y, x)))
        window[dst] = previous[src]
        np.testing.assert_array_equal(label[i, 1], window)


def test_the_cascade_trains_on_the_image_and_its_previous_stage(work: Path) -> None:
    folder = work / "models" / "3d_cascade_fullres" / "tiny"
    for k in (0, 1):
        log = (folder / f"fold_{k}" / "training_log.txt").read_text()
        assert "training 3d_cascade_fullres" in log and (folder / f"fold_{k}" / "checkpoint_final.pth").is_file()
    state = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=True)["model"]
    first = next(v for k, v in state.items() if k.endswith("weight") and v.ndim == 5)
    assert first.shape[1] == 3  # CT channel + 2 one-hot channels


def test_training_the_cascade_without_the_lowres_crossval_names_the_commands(work: Path, tmp_path: Path) -> None:
    copy = tmp_path / "work"
    shutil.copytree(work, copy, ignore=shutil.ignore_patterns("models"))
    with pytest.raises(FileNotFoundError, match=r"crossval .* -c 3d_lowres"):
        api.train(copy, "3d_cascade_fullres", 0, **QUICK)
    assert not (copy / "models" / "3d_cascade_fullres").exists()  # refused before its fold folder is made


def test_inputs_the_lowres_crossval_could_not_write_are_written_by_the_cascades_training(work: Path,
                                                                                         tmp_path: Path) -> None:
    copy = tmp_path / "work"
    shutil.copytree(work, copy, ignore=shutil.ignore_patterns("3d_cascade_fullres", "predicted_next_stage"))
    lowres = copy / "models" / "3d_lowres" / "tiny"
    marker = cache.properties_path(copy / "preprocessed" / "3d_fullres", CASES[1])
    saved = marker.read_bytes()
    marker.unlink()  # one case not (yet) preprocessed for the cascade: crossval leaves the inputs to training
    assert write_next_stage_inputs(copy, lowres, "3d_lowres", CASES) == {}
    marker.write_bytes(saved)
    api.train(copy, "3d_cascade_fullres", 0, **QUICK)
    written = sorted(p.name for p in (lowres / "predicted_next_stage" / "3d_fullres").glob("*.npy"))
    assert written == [f"{c}.npy" for c in CASES]  # fold 0's train and val cases


def test_predict_runs_the_lowres_stage_first_and_keeps_the_geometry(work: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(work.parent / "raw" / "imagesTr" / "synth_000.nii.gz", images)
    predictor = load_predictor(work, "3d_cascade_fullres", [0], device="cpu", tta=False)
    assert isinstance(predictor, CascadePredictor) and predictor.previous.fold_dirs[0].parent.parent.name == "3d_lowres"
    assert type(load_predictor(work, "3d_lowres", [0], device="cpu")) is Predictor
    # the cascade's extra channels are exactly the lowres prediction on the cascade's grid
    case = preprocess_case(images / "synth_000.nii.gz", None, predictor.preprocessing)
    lowres, _ = predictor.previous.predict_case(images / "synth_000.nii.gz")
    data = predictor.network_input(case, images / "synth_000.nii.gz")
    grid = labels_on_preprocessed_grid(lowres, case.properties)
    np.testing.assert_array_equal(data[0], case.data[0])
    np.testing.assert_array_equal(data[1:], np.stack([grid == 1, grid == 2]).astype(np.float32))
    out = tmp_path / "out"
    summary = api.predict(images, out, work, "3d_cascade_fullres", [0], tta=False, device="cpu", progress=False)
    assert summary["n_done"] == 1
    label, geometry = read_label(out / "synth_000.nii.gz")
    assert geometry == read_geometry(images / "synth_000.nii.gz")[0]
    assert set(np.unique(label)) <= {0, 1, 2}
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert "3d_lowres" in json.dumps(provenance)  # which lowres model fed the cascade is part of the result


def test_the_cascade_is_cross_validated_compared_and_ensembled_like_any_configuration(work: Path,
                                                                                       tmp_path: Path) -> None:
    result = api.crossval(work, "3d_cascade_fullres", progress=False, device="cpu", save_probabilities=True)
    assert result["n_cases"] == 4 and result["folds"] == [0, 1] and result["next_stages"] == {}
    chosen = api.best(work, ["3d_lowres", "3d_cascade_fullres"], progress=False)
    names = {c["name"] for c in chosen["candidates"]}
    assert {"3d_lowres", "3d_cascade_fullres"} <= names and len(names) == 3 and not chosen["skipped"]
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(work.parent / "raw" / "imagesTr" / "synth_001.nii.gz", images)
    both = api.predict(images, tmp_path / "pair", work, ["3d_lowres", "3d_cascade_fullres"], [0], tta=False,
                       device="cpu", progress=False)
    assert both["n_done"] == 1
    assert read_label(tmp_path / "pair" / "synth_001.nii.gz")[1] == read_geometry(images / "synth_001.nii.gz")[0]
