"""Largest-connected-component postprocessing: the operation, the choice on CV predictions, crossval and predict."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from decathlete import api
from decathlete.crossval import cross_validate
from decathlete.infer.postprocess import (
    FILENAME,
    apply_postprocessing,
    choose_postprocessing,
    keep_largest,
    largest_component,
)
from decathlete.infer.predictor import Predictor
from decathlete.io.images import Geometry, read_label, write_image
from decathlete.synthetic import make_synthetic_dataset
from decathlete.train.trainer import TrainOptions, train


def _blobs() -> np.ndarray:
    seg = np.zeros((12, 20, 20), np.uint8)
    seg[2:8, 2:10, 2:10] = 1  # organ, 384 voxels
    seg[3:6, 4:7, 4:7] = 2  # lesion inside it
    seg[9:11, 15:18, 15:18] = 1  # a stray organ island, 18 voxels
    seg[10, 1, 18] = 2  # a stray lesion voxel, touching nothing
    return seg


def test_largest_component_is_26_connected() -> None:
    mask = np.zeros((4, 4, 4), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = True  # a diagonal chain: one 26-connected component
    mask[0, 3, 3] = True
    assert largest_component(mask).sum() == 3 and not largest_component(mask)[0, 3, 3]
    assert not largest_component(np.zeros((3, 3, 3), bool)).any()


def test_keep_largest_foreground_and_per_class() -> None:
    seg = _blobs()
    fg = keep_largest(seg, None)
    assert fg[9:11, 15:18, 15:18].sum() == 0 and fg[10, 1, 18] == 0
    assert (fg[2:8, 2:10, 2:10] == seg[2:8, 2:10, 2:10]).all()  # the lesion inside the organ stays: same component
    lesion_only = keep_largest(seg, [2])
    assert lesion_only[10, 1, 18] == 0 and lesion_only[9:11, 15:18, 15:18].sum() == 18  # organ island untouched
    assert apply_postprocessing(seg, {"foreground": False, "per_class": {}}) is seg
    assert apply_postprocessing(seg, None) is seg
    both = apply_postprocessing(seg, {"foreground": True, "per_class": {"lesion": [2]}})
    assert (both == fg).all()


def _write(folder: Path, name: str, seg: np.ndarray) -> Path:
    path = folder / f"{name}.nii.gz"
    write_image(seg, Geometry.from_physical(seg.shape, (1.0, 1.0, 2.0), (0, 0, 0), np.eye(3).ravel()), path,
                dtype=seg.dtype)
    return path


def test_choice_keeps_what_helps_and_refuses_what_hurts_a_class(tmp_path: Path) -> None:
    """Foreground LCC removes false islands (kept); the reference has two lesions, so lesion LCC would cut a true one
    (refused) although it would not lower the mean of a single-lesion dataset."""
    pairs = []
    for i in range(3):
        ref = np.zeros((12, 20, 20), np.uint8)
        ref[2:8, 2:10, 2:10] = 1
        ref[3:6, 4:7, 4:7] = 2
        ref[1:3, 14:17, 2:5] = 2  # a second true lesion, separate from the organ
        pred = ref.copy()
        pred[9:11, 15:18, 15:18] = 1  # a false organ island
        pred[1:3, 14:17, 2:5] = 0
        pred[1:3, 14:16, 2:5] = 2  # the second lesion found, a little smaller
        pairs.append((_write(tmp_path / "pred", f"c{i}", pred), _write(tmp_path / "ref", f"c{i}", ref)))
    spec = choose_postprocessing(pairs, {"organ": 1, "lesion": 2})
    # Foreground LCC: the island goes (organ Dice up) but so does the separate true lesion (lesion Dice down): refused.
    assert spec["foreground"] is False
    assert spec["per_class"] == {"organ": [1]}  # organ-only LCC removes just the island
    assert spec["mean_dice_after"]["organ"] > spec["mean_dice_before"]["organ"]
    assert spec["mean_dice_after"]["lesion"] == spec["mean_dice_before"]["lesion"]
    assert spec["candidates"]["foreground"]["lesion"] < spec["mean_dice_before"]["lesion"]
    # Hand-computed: organ Dice before = 2*384/(384+18+384) on every case.
    assert spec["mean_dice_before"]["organ"] == pytest.approx(2 * 357 / (357 + 18 + 357), abs=1e-6)
    assert spec["mean_dice_after"]["organ"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no cross-validation"):
        choose_postprocessing([], {"organ": 1})


def test_choice_leaves_unannotated_voxels_out(tmp_path: Path) -> None:
    """Sparse annotation: predicted organ where the reference holds the ignore label (3) is no false positive."""
    ref = np.full((12, 20, 20), 3, np.uint8)  # nothing annotated ...
    ref[2:8, 2:10, 2:10] = 1  # ... but the organ
    ref[2:8, 10:12, 2:10] = 0  # and a strip of background beside it
    pred = np.zeros_like(ref)
    pred[2:8, 2:10, 2:10] = 1
    pred[9:11, 15:18, 15:18] = 1  # an island in the unannotated part
    pairs = [(_write(tmp_path / "pred", "c0", pred), _write(tmp_path / "ref", "c0", ref))]
    assert choose_postprocessing(pairs, {"organ": 1}, ignore_label=3)["mean_dice_before"]["organ"] == 1.0
    assert choose_postprocessing(pairs, {"organ": 1})["mean_dice_before"]["organ"] < 1.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("crossval")
    data = make_synthetic_dataset(root / "raw", n_cases=6, shape=(16, 40, 40))
    api.plan(data, root / "work", recipe="tiny", workers=1, progress=False, configurations=["3d_fullres"])
    api.preprocess(root / "work", ["3d_fullres"], workers=1, progress=False)
    for fold in (0, 1):
        train(root / "work", TrainOptions("3d_fullres", fold, epochs=2, iterations_per_epoch=8, val_iterations=1,
                                          device="cpu", num_workers=0, progress=False))
    return root / "work"


def test_crossval_scores_every_validation_case_and_predict_applies_its_choice(trained: Path, tmp_path: Path
                                                                                ) -> None:
    result = cross_validate(trained, "3d_fullres", [0, 1], device="cpu", tta=False, progress=False)
    root = Path(result["folder"])
    splits = json.loads((trained / "splits.json").read_text())
    expected = sorted(splits[0]["val"] + splits[1]["val"])
    summary = json.loads((root / "crossval" / "summary.json").read_text())
    assert sorted(c["case"] for c in summary["per_case"]) == expected and result["n_cases"] == len(expected)
    for fold in (0, 1):
        fold_summary = json.loads((root / f"fold_{fold}" / "validation" / "summary.json").read_text())
        assert sorted(c["case"] for c in fold_summary["per_case"]) == sorted(splits[fold]["val"])
    spec = json.loads((root / FILENAME).read_text())
    assert spec["folds"] == [0, 1] and set(spec["mean_dice_before"]) == {"organ", "lesion"}
    # Force a choice and check that predict applies it (and --no-postprocessing does not).
    forced = {**spec, "foreground": True, "per_class": {}}
    (root / FILENAME).write_text(json.dumps(forced))
    image = sorted((trained.parent / "raw" / "imagesTr").glob("*.nii.gz"))[0]
    raw, _ = Predictor(trained, device="cpu", tta=False, postprocess=False).predict_case(image)
    post, _ = Predictor(trained, device="cpu", tta=False).predict_case(image)
    assert (post == apply_postprocessing(raw, forced)).all()
    shutil.rmtree(root / "fold_1" / "validation")
    again = cross_validate(trained, "3d_fullres", [1], device="cpu", tta=False, progress=False)  # redo one fold
    assert again["n_cases"] == len(splits[1]["val"])
    assert read_label(next((root / "fold_1" / "validation").glob("*.nii.gz")))[0].ndim == 3
