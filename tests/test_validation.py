"""validate_dataset / check_dataset: every problem reported at once, with case id and fix, writing nothing."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from decathlete.io.datasets import load_dataset
from decathlete.io.images import ImageReadError, read_geometry
from decathlete.io.validation import DatasetError, Problem, check_dataset, validate_dataset
from synthetic import (
    edit_dataset_json,
    make_msd_dataset,
    make_nnunet_dataset,
    nifti_affine,
    snapshot,
    write_json,
    write_nifti,
)

SPACING = (2.0, 1.0, 1.0)


def one_problem(problems: list[Problem], case: str | None, *needles: str) -> Problem:
    """The single problem of ``case``; its message contains every needle and it has a fix."""
    mine = [p for p in problems if p.case == case]
    assert len(mine) == 1, f"expected one problem for {case}, got {[str(p) for p in problems]}"
    for needle in needles:
        assert needle in mine[0].message, f"{needle!r} not in {mine[0].message!r}"
    assert len(mine[0].fix) > 10
    return mine[0]


@pytest.fixture
def msd(tmp_path: Path) -> Path:
    return make_msd_dataset(tmp_path / "msd", n_cases=3, spacing=SPACING)


@pytest.fixture
def nnunet(tmp_path: Path) -> Path:
    return make_nnunet_dataset(tmp_path / "nn", n_cases=3, channels=2, spacing=SPACING)


def label_of(root: Path, case: str) -> np.ndarray:
    lab = np.zeros((8, 10, 12), np.uint8)
    lab[2:5, 3:6, 4:8] = 1
    return lab


# ---------------------------------------------------------------------------------------------- error objects


def test_problem_str_and_dataset_error() -> None:
    a, b = Problem("case_1", "label missing", "add it"), Problem(None, "bad json", "fix it")
    assert str(a) == "[case_1] label missing -> fix: add it"
    assert str(b) == "[dataset] bad json -> fix: fix it"
    err = DatasetError([a, b], root="/x")
    assert str(err).splitlines() == ["2 problems found in dataset /x:", f"  {a}", f"  {b}"]
    again = pickle.loads(pickle.dumps(err))  # crosses process boundaries intact
    assert again.problems == [a, b] and str(again) == str(err)


# ------------------------------------------------------------------------------------- 1. leaving the folder


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_paths_leaving_the_dataset_folder(tmp_path: Path, msd: Path, kind: str) -> None:
    outside = tmp_path / "outside" / "secret.nii.gz"
    outside.parent.mkdir()
    outside.write_bytes(b"not an image")  # if it were opened, a 'cannot be read' problem would show up
    meta = edit_dataset_json(msd)
    if kind == "dotdot":
        meta["training"][1]["image"] = "./imagesTr/../../outside/secret.nii.gz"
    else:
        meta["training"][1]["image"] = str(outside)
    write_json(msd / "dataset.json", meta)
    case = "secret"
    problems = validate_dataset(msd)
    p = one_problem(problems, case, "outside the dataset folder", "not opened")
    assert "inside the dataset folder" in p.fix
    assert not any("cannot be read" in q.message for q in problems)
    with pytest.raises(DatasetError, match="outside the dataset folder"):
        load_dataset(msd)


def test_symlink_to_data_elsewhere_is_followed(tmp_path: Path, msd: Path) -> None:
    """Users keep data on other disks and link it in: a symlink they placed is their choice, and we only read."""
    target = msd / "imagesTr" / "case_001.nii.gz"
    (tmp_path / "elsewhere").mkdir()
    os.replace(target, tmp_path / "elsewhere" / "case_001.nii.gz")
    os.symlink(tmp_path / "elsewhere" / "case_001.nii.gz", target)
    assert validate_dataset(msd) == []


def test_symlink_inside_root_is_fine(msd: Path) -> None:
    target = msd / "imagesTr" / "case_001.nii.gz"
    (msd / "store").mkdir()
    os.replace(target, msd / "store" / "case_001.nii.gz")
    os.symlink(msd / "store" / "case_001.nii.gz", target)
    assert validate_dataset(msd) == []


# --------------------------------------------------------------------------------------- 2. missing / corrupt


def test_missing_image_and_label(msd: Path) -> None:
    (msd / "imagesTr" / "case_000.nii.gz").unlink()
    (msd / "labelsTr" / "case_002.nii.gz").unlink()
    problems = validate_dataset(msd)
    one_problem(problems, "case_000", "imagesTr/case_000.nii.gz", "does not exist")
    one_problem(problems, "case_002", "label file labelsTr/case_002.nii.gz", "does not exist")
    assert len(problems) == 2


def test_corrupt_file_reports_reader_reason(msd: Path) -> None:
    bad = msd / "imagesTr" / "case_001.nii.gz"
    bad.write_bytes(gzip.compress(b"\x00" * 50))  # valid gzip, far too short for a NIfTI header
    with pytest.raises(ImageReadError) as excinfo:
        read_geometry(bad)
    one_problem(validate_dataset(msd), "case_001", "cannot be read", excinfo.value.reason)


def test_truncated_file_data(msd: Path) -> None:
    bad = msd / "labelsTr" / "case_002.nii.gz"
    raw = gzip.decompress(bad.read_bytes())
    bad.write_bytes(gzip.compress(raw[: len(raw) - 200]))  # header intact, voxel data cut short
    one_problem(validate_dataset(msd), "case_002", "label", "cannot be read")


# ----------------------------------------------------------------------------------------- 3. dimensionality


def test_2d_image(msd: Path) -> None:
    write_nifti(msd / "imagesTr" / "case_001.nii.gz", np.zeros((12, 10), np.float32))
    p = one_problem(validate_dataset(msd), "case_001", "image file imagesTr/case_001.nii.gz", "(12, 10)")
    assert "3D" in p.fix


def test_5d_image(msd: Path) -> None:
    write_nifti(msd / "imagesTr" / "case_001.nii.gz", np.zeros((12, 10, 8, 2, 3), np.float32))
    one_problem(validate_dataset(msd), "case_001", "expected a 3D")


def test_4d_channel_count_disagrees_with_modalities(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", n_cases=2, channels=2, modality=["FLAIR", "T1"], spacing=SPACING)
    write_nifti(root / "imagesTr" / "case_001.nii.gz", np.zeros((3, 8, 10, 12), np.float32), SPACING)
    p = one_problem(validate_dataset(root), "case_001", "3 channel(s)", "'modality' declares 2")
    assert "modality" in p.fix


def test_4d_label(msd: Path) -> None:
    write_nifti(msd / "labelsTr" / "case_000.nii.gz", np.zeros((2, 8, 10, 12), np.uint8), SPACING)
    one_problem(validate_dataset(msd), "case_000", "label file", "2 channels")


# ------------------------------------------------------------------------------------------ 4. grid agreement


def test_channel_spacing_and_shape_mismatch(nnunet: Path) -> None:
    img = np.zeros((8, 10, 12), np.float32)
    write_nifti(nnunet / "imagesTr" / "case_000_0001.nii.gz", img, (2.0, 1.0, 1.1))
    write_nifti(nnunet / "imagesTr" / "case_002_0001.nii.gz", np.zeros((8, 10, 13), np.float32), SPACING)
    problems = validate_dataset(nnunet)
    p = one_problem(problems, "case_000", "image channel 1 (MOD1)", "image channel 0 (MOD0)", "spacing")
    assert "resample" in p.fix
    one_problem(problems, "case_002", "shape (8, 10, 12) != (8, 10, 13)")  # no second 'cannot read data'
    assert len(problems) == 2


@pytest.mark.parametrize(
    ("kind", "affine", "needle"),
    [
        ("origin", nifti_affine(SPACING, origin=(0.5, 0.0, 0.0)), "origin"),
        ("direction", nifti_affine(SPACING, direction=np.diag([-1.0, 1.0, 1.0])), "direction"),
        ("spacing", nifti_affine((2.0, 1.0, 1.01)), "spacing"),
    ],
)
def test_label_off_the_image_grid(msd: Path, kind: str, affine: np.ndarray, needle: str) -> None:
    lab = np.zeros((8, 10, 12), np.uint8)
    write_nifti(msd / "labelsTr" / "case_001.nii.gz", lab, affine=affine)
    p = one_problem(validate_dataset(msd), "case_001", "label does not lie on the grid of the image", needle)
    assert "label" in p.fix


def test_tiny_origin_difference_is_tolerated(msd: Path) -> None:
    # 1e-3 mm is below the tolerance of 0.01 x the smallest spacing (1 mm here).
    write_nifti(msd / "labelsTr" / "case_001.nii.gz", np.zeros((8, 10, 12), np.uint8), SPACING, origin=(1e-3, 0, 0))
    assert validate_dataset(msd) == []


# ------------------------------------------------------------------------------------------------ 5. labels


def test_undeclared_label_values(msd: Path) -> None:
    lab = np.zeros((8, 10, 12), np.uint8)
    lab[0, 0, :3] = 7
    lab[1, 1, :1] = 9
    write_nifti(msd / "labelsTr" / "case_002.nii.gz", lab, SPACING)
    p = one_problem(validate_dataset(msd), "case_002", "not declared", "7 (3 voxels)", "9 (1 voxels)")
    assert "declare" in p.fix


def test_non_integral_label(msd: Path) -> None:
    lab = np.zeros((8, 10, 12), np.float32)
    lab[2, 2, 2] = 0.5
    write_nifti(msd / "labelsTr" / "case_000.nii.gz", lab, SPACING)
    p = one_problem(validate_dataset(msd), "case_000", "non-integral")
    assert "integer" in p.fix


def test_non_consecutive_labels_are_refused_with_the_fix(msd: Path, tmp_path: Path) -> None:
    lab = np.zeros((8, 10, 12), np.uint8)
    lab[2:4, 2:4, 2:4] = 4
    write_nifti(msd / "labelsTr" / "case_000.nii.gz", lab, SPACING)
    edit_dataset_json(msd, labels={"0": "background", "1": "a", "2": "b", "4": "d"})
    p = one_problem(validate_dataset(msd), None, "'Synthetic'", "[0, 1, 2, 4]", "not consecutive", "0..N-1")
    assert "relabel" in p.fix and "0..3" in p.fix
    root = make_nnunet_dataset(tmp_path / "nn", n_cases=2, channels=1, labels={"background": 0, "a": 1, "c": 3})
    p = one_problem(validate_dataset(root), None, "[0, 1, 3]")
    assert "0..2" in p.fix and "region" in p.fix
    # Region members may use any values: the outputs are the regions.
    regions = {"background": 0, "whole": [1, 3], "core": 3}
    assert validate_dataset(make_nnunet_dataset(tmp_path / "rg", n_cases=2, channels=1, labels=regions,
                                                regions_class_order=[1, 3])) == []


@pytest.mark.parametrize("layout", ["msd", "nnunetv2"])
def test_ignore_label_must_be_the_largest_value(tmp_path: Path, layout: str) -> None:
    if layout == "msd":
        root = make_msd_dataset(tmp_path / "ds", n_cases=2, labels=("background", "a", "ignore"))
    else:
        root = make_nnunet_dataset(tmp_path / "ds", n_cases=2, channels=1,
                                   labels={"background": 0, "a": 1, "b": 2, "ignore": 3})
    assert validate_dataset(root) == []  # the ignore value is exempt from nothing: it comes right after the labels
    labels = {"0": "background", "1": "ignore", "2": "a"} if layout == "msd" else {"background": 0, "ignore": 1,
                                                                                    "a": 2, "b": 3}
    edit_dataset_json(root, labels=labels)
    p = one_problem(validate_dataset(root), None, "ignore label 1 must be the largest value")
    assert '"ignore": ' in p.fix


def test_ignore_label_with_regions(tmp_path: Path) -> None:
    labels = {"background": 0, "whole": [1, 2], "core": 2, "ignore": 3}
    root = make_nnunet_dataset(tmp_path / "ds", n_cases=2, channels=1, labels=labels, regions_class_order=[1, 2])
    assert validate_dataset(root) == []
    edit_dataset_json(root, labels={**labels, "ignore": [3, 4]})
    assert any("ignore label is a region" in p.message for p in validate_dataset(root))


# -------------------------------------------------------------------------------------------------- 6. NaN/Inf


def test_nan_and_inf_counted(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", n_cases=2, n_test=1, spacing=SPACING)
    img = np.ones((8, 10, 12), np.float32)
    img[0, 0, :2] = np.nan
    img[1, 1, 1] = np.inf
    write_nifti(root / "imagesTr" / "case_001.nii.gz", img, SPACING)
    img[5, 5, 5] = -np.inf
    write_nifti(root / "imagesTs" / "test_000.nii.gz", img, SPACING)  # test images are checked too
    problems = validate_dataset(root)
    one_problem(problems, "case_001", "2 NaN and 1 Inf")
    one_problem(problems, "test_000", "2 NaN and 2 Inf")
    assert validate_dataset(root, check_data=False) == []  # header-only mode skips voxel checks


# --------------------------------------------------------------------------------------- 7. dataset structure


def test_duplicate_case_ids(msd: Path) -> None:
    meta = edit_dataset_json(msd)
    meta["training"].append(dict(meta["training"][0]))
    write_json(msd / "dataset.json", meta)
    one_problem(validate_dataset(msd), "case_000", "appears 2 times")


def test_zero_channels(msd: Path) -> None:
    edit_dataset_json(msd, modality={})
    p = one_problem(validate_dataset(msd), None, "0 channels")
    assert "modality" in p.fix


def test_empty_training_is_reported_not_raised(msd: Path) -> None:
    edit_dataset_json(msd, training=[])
    one_problem(validate_dataset(msd), None, "training list is empty")


# ------------------------------------------------------------------------------------------ 8. nnU-Net files


def test_nnunet_unpaired_and_missing_channel_files(nnunet: Path) -> None:
    (nnunet / "labelsTr" / "case_000.nii.gz").unlink()  # image without label
    for c in (0, 1):
        (nnunet / "imagesTr" / f"case_001_{c:04d}.nii.gz").unlink()  # label without image
    (nnunet / "imagesTr" / "case_002_0001.nii.gz").unlink()  # missing channel file
    problems = validate_dataset(nnunet)
    one_problem(problems, "case_000", "label file labelsTr/case_000.nii.gz", "does not exist")
    one_problem(problems, "case_001", "labelsTr/case_001.nii.gz has no image files")
    p = one_problem(problems, "case_002", "image channel 1 (MOD1)", "case_002_0001.nii.gz", "does not exist")
    assert "case_002_0001.nii.gz" in p.fix
    one_problem(problems, None, "numTraining=3", "holds 2 cases")  # nnU-Net insists on the count
    assert len(problems) == 4


def test_nnunet_extra_channel_and_bad_name(nnunet: Path) -> None:
    write_nifti(nnunet / "imagesTr" / "case_000_0002.nii.gz", np.zeros((8, 10, 12), np.float32), SPACING)
    write_nifti(nnunet / "imagesTr" / "stray.nii.gz", np.zeros((8, 10, 12), np.float32), SPACING)
    problems = validate_dataset(nnunet)
    one_problem(problems, "case_000", "[2]", "declares 2 channels")
    one_problem(problems, None, "stray.nii.gz", "naming")


# ------------------------------------------------------------------------------------- all at once, no writes


def _break_three(root: Path) -> None:
    (root / "labelsTr" / "case_000.nii.gz").unlink()
    img = np.ones((8, 10, 12), np.float32)
    img[0, 0, 0] = np.nan
    write_nifti(root / "imagesTr" / "case_001.nii.gz", img, SPACING)
    lab = np.zeros((8, 10, 12), np.uint8)
    lab[0, 0, 0] = 4
    write_nifti(root / "labelsTr" / "case_002.nii.gz", lab, SPACING)


@pytest.mark.parametrize("workers", [1, 2])
def test_every_problem_reported_together_and_nothing_written(msd: Path, workers: int) -> None:
    _break_three(msd)
    before = snapshot(msd)
    problems = validate_dataset(msd, workers=workers)
    assert [p.case for p in problems] == ["case_000", "case_001", "case_002"]
    assert "does not exist" in problems[0].message
    assert "1 NaN" in problems[1].message
    assert "4 (1 voxels)" in problems[2].message
    with pytest.raises(DatasetError) as excinfo:
        check_dataset(msd, workers=workers)
    assert excinfo.value.problems == problems
    assert str(excinfo.value).startswith("3 problems found in dataset")
    assert snapshot(msd) == before


def test_check_dataset_returns_description(nnunet: Path) -> None:
    before = snapshot(nnunet)
    desc = check_dataset(nnunet, workers=2)
    assert desc.layout == "nnunetv2" and len(desc.training) == 3
    assert check_dataset(desc) == desc
    assert snapshot(nnunet) == before


def test_fatal_problems_come_back_as_a_list(tmp_path: Path) -> None:
    problems = validate_dataset(tmp_path)
    one_problem(problems, None, "no dataset.json")
    with pytest.raises(DatasetError, match="1 problem found"):
        check_dataset(tmp_path)
