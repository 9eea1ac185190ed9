"""Dataset layouts (MSD, nnU-Net v2), splits.json, serialisation, and the real data in ../shared/data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from decathlete.io.datasets import Case, DatasetDescription, load_dataset, parse_dataset
from decathlete.io.validation import DatasetError, validate_dataset
from synthetic import edit_dataset_json, make_msd_dataset, make_nnunet_dataset, write_json, write_nifti

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _only_problem(excinfo: pytest.ExceptionInfo[DatasetError]) -> str:
    assert len(excinfo.value.problems) == 1, excinfo.value
    p = excinfo.value.problems[0]
    assert p.fix
    return p.message


# ------------------------------------------------------------------------------------------------------ layouts


def test_msd_single_channel(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", n_cases=3, n_test=1, modality=["MRI"], labels=("background", "x", "y"))
    desc = load_dataset(root)
    assert desc.layout == "msd" and desc.name == "Synthetic"
    assert desc.root.is_absolute() and desc.root == root.resolve()
    assert desc.channel_names == ("MRI",) and desc.num_channels == 1
    assert desc.labels == {"background": 0, "x": 1, "y": 2} and desc.label_values == (0, 1, 2)
    assert desc.regions is None and desc.regions_class_order is None
    assert desc.file_ending == ".nii.gz"
    assert [c.id for c in desc.training] == ["case_000", "case_001", "case_002"]
    assert desc.training[0].images == (root.resolve() / "imagesTr" / "case_000.nii.gz",)
    assert desc.training[0].label == root.resolve() / "labelsTr" / "case_000.nii.gz"
    assert [(c.id, c.label) for c in desc.test] == [("test_000", None)]
    assert desc.splits is None
    assert validate_dataset(desc) == []


def test_msd_4d_multichannel(tmp_path: Path) -> None:
    names = ["FLAIR", "T1w", "t1gd", "T2w"]
    root = make_msd_dataset(tmp_path / "ds", n_cases=2, channels=4, modality=names)
    desc = load_dataset(root)
    assert desc.channel_names == tuple(names)
    assert all(len(c.images) == 1 for c in desc.training)  # one 4D file per case
    assert validate_dataset(root) == []


def test_msd_v1_style_channel_files(tmp_path: Path) -> None:
    """nnU-Net v1 lists ./imagesTr/x.nii.gz in dataset.json while the files are x_0000.nii.gz, x_0001.nii.gz."""
    root = make_nnunet_dataset(tmp_path / "ds", n_cases=2, channels=2)
    entries = [{"image": f"./imagesTr/case_00{i}.nii.gz", "label": f"./labelsTr/case_00{i}.nii.gz"} for i in (0, 1)]
    meta = {"modality": {"0": "A", "1": "B"}, "labels": {"0": "background", "1": "a", "2": "b"}, "training": entries}
    write_json(root / "dataset.json", meta)
    desc = load_dataset(root)
    assert desc.layout == "msd"
    assert [p.name for p in desc.training[0].images] == ["case_000_0000.nii.gz", "case_000_0001.nii.gz"]
    assert validate_dataset(desc) == []


def test_nnunet_two_channels(tmp_path: Path) -> None:
    root = make_nnunet_dataset(tmp_path / "ds", n_cases=3, channels=2, channel_names=["CT", "PET"], n_test=2)
    desc = load_dataset(root)
    assert desc.layout == "nnunetv2" and desc.name == "ds"  # no "name" key: the folder name
    assert desc.channel_names == ("CT", "PET")
    assert desc.labels == {"background": 0, "a": 1, "b": 2}
    case = desc.training[1]
    assert case.id == "case_001"
    assert [p.name for p in case.images] == ["case_001_0000.nii.gz", "case_001_0001.nii.gz"]
    assert case.label is not None and case.label.name == "case_001.nii.gz"
    assert [c.id for c in desc.test] == ["test_000", "test_001"] and all(c.label is None for c in desc.test)
    assert validate_dataset(root) == []


def test_nnunet_regions(tmp_path: Path) -> None:
    labels = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}
    root = make_nnunet_dataset(tmp_path / "ds", channels=1, labels=labels, regions_class_order=[1, 2, 3])
    desc = load_dataset(root)
    assert desc.regions == {"whole tumor": (1, 2, 3), "tumor core": (2, 3), "enhancing tumor": (3,)}
    assert desc.regions_class_order == (1, 2, 3)
    assert desc.labels["whole tumor"] == (1, 2, 3) and desc.labels["enhancing tumor"] == 3
    assert desc.label_values == (0, 1, 2, 3)
    assert validate_dataset(root) == []


def test_nnunet_regions_without_class_order(tmp_path: Path) -> None:
    root = make_nnunet_dataset(tmp_path / "ds", channels=1, labels={"background": 0, "wt": [1, 2], "tc": 2})
    with pytest.raises(DatasetError, match="regions_class_order"):
        load_dataset(root)


def test_layout_detection_and_other_file_ending(tmp_path: Path) -> None:
    root = make_nnunet_dataset(tmp_path / "ds", n_cases=2, channels=1, file_ending=".nii")
    desc = load_dataset(root)
    assert desc.layout == "nnunetv2" and desc.file_ending == ".nii"
    assert desc.training[0].images[0].name == "case_000_0000.nii"


# ------------------------------------------------------------------------------------------------------- splits


def test_splits_json_honoured(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", n_cases=4)
    folds = [{"train": ["case_000", "case_001"], "val": ["case_002", "case_003"]},
             {"train": ["case_002", "case_003"], "val": ["case_000", "case_001"]}]  # fmt: skip
    write_json(root / "splits.json", folds)
    assert load_dataset(root).splits == folds


def test_splits_json_unknown_ids_reported(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", n_cases=3)
    write_json(root / "splits.json", [{"train": ["case_000", "nope_1"], "val": ["case_001", "nope_2"]}])
    with pytest.raises(DatasetError) as excinfo:
        load_dataset(root)
    message = _only_problem(excinfo)
    assert "nope_1" in message and "nope_2" in message and "fold 0" in message
    assert [p.message for p in validate_dataset(root)] == [message]


def test_splits_json_malformed(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", n_cases=2)
    write_json(root / "splits.json", {"train": ["case_000"]})
    with pytest.raises(DatasetError, match="nnU-Net format"):
        load_dataset(root)


# ------------------------------------------------------------------------------------------------ serialisation


@pytest.mark.parametrize("layout", ["msd", "nnunet", "regions"])
def test_to_dict_from_dict_round_trip(tmp_path: Path, layout: str) -> None:
    if layout == "msd":
        root = make_msd_dataset(tmp_path / "ds", n_cases=2, n_test=1, channels=2)
        write_json(root / "splits.json", [{"train": ["case_000"], "val": ["case_001"]}])
    elif layout == "nnunet":
        root = make_nnunet_dataset(tmp_path / "ds", n_cases=2, n_test=1)
    else:
        labels = {"background": 0, "wt": [1, 2], "tc": 2}
        root = make_nnunet_dataset(tmp_path / "ds", n_cases=2, labels=labels, regions_class_order=[1, 2])
    desc = load_dataset(root)
    d = json.loads(json.dumps(desc.to_dict()))  # must survive JSON (as in plans.json)
    assert d["training"][0]["images"][0].startswith("imagesTr/")  # relative: plans survive moving the data
    back = DatasetDescription.from_dict(d)
    assert back == desc
    assert isinstance(back.training[0], Case) and isinstance(back.training[0].images, tuple)


# -------------------------------------------------------------------------------------------- fatal structure


def test_no_dataset_json(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as excinfo:
        load_dataset(tmp_path)
    assert "no dataset.json" in _only_problem(excinfo)
    assert "dataset.json" in excinfo.value.problems[0].fix


def test_unparsable_json_names_line(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", n_cases=1)
    text = (root / "dataset.json").read_text().splitlines()
    text[3] += ","  # a trailing comma after a value inside an object breaks line 4/5
    (root / "dataset.json").write_text("\n".join(text))
    with pytest.raises(DatasetError) as excinfo:
        load_dataset(root)
    message = _only_problem(excinfo)
    assert "not valid JSON" in message and "line " in message
    assert "line" in excinfo.value.problems[0].fix


def test_missing_required_keys(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", n_cases=1)
    edit_dataset_json(root, labels=None, modality=None)
    with pytest.raises(DatasetError) as excinfo:
        load_dataset(root)
    message = _only_problem(excinfo)
    assert "modality" in message and "labels" in message
    assert "add" in excinfo.value.problems[0].fix


@pytest.mark.parametrize("layout", ["msd", "nnunet"])
def test_empty_training(tmp_path: Path, layout: str) -> None:
    if layout == "msd":
        root = make_msd_dataset(tmp_path / "ds", n_cases=1)
        edit_dataset_json(root, training=[])
    else:
        root = make_nnunet_dataset(tmp_path / "ds", n_cases=1)
        for f in (root / "imagesTr").iterdir():
            f.unlink()
    with pytest.raises(DatasetError) as excinfo:
        load_dataset(root)
    assert any("training list is empty" in p.message for p in excinfo.value.problems)
    problems = validate_dataset(root)
    assert any("training list is empty" in p.message and p.case is None for p in problems)


def test_parse_does_not_open_images(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", n_cases=2)
    (root / "imagesTr" / "case_000.nii.gz").write_bytes(b"garbage")  # unreadable, but parsing must not care
    desc, problems = parse_dataset(root)
    assert problems == [] and len(desc.training) == 2
    assert isinstance(load_dataset(root), DatasetDescription)


def test_float32_label_with_integer_values_ok(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", n_cases=2, label_dtype=np.float32, image_dtype=np.uint8)
    assert validate_dataset(root) == []


def test_singleton_axis_is_fine(tmp_path: Path) -> None:
    root = make_msd_dataset(tmp_path / "ds", n_cases=2, shape=(1, 10, 12))
    assert validate_dataset(root) == []


# ------------------------------------------------------------------------------------------------ integration


def _shared(task: str) -> Path:
    path = SHARED_DATA / task
    if not (path / "dataset.json").is_file():
        pytest.skip(f"{path} not present (real data lives in ../shared/data next to the repo)")
    return path


@pytest.mark.integration
def test_real_task04_hippocampus() -> None:
    desc = load_dataset(_shared("Task04_Hippocampus"))
    assert len(desc.training) == 200 and len(desc.test) == 1
    assert desc.test[0].id == "hippocampus_118"
    # dataset.json spells the names "Anterior"/"Posterior"; names are kept as declared.
    assert {k.lower(): v for k, v in desc.labels.items()} == {"background": 0, "anterior": 1, "posterior": 2}
    assert desc.channel_names == ("MRI",)
    assert len({c.id for c in desc.training}) == 200


@pytest.mark.integration
def test_real_task04_validates_clean() -> None:
    root = _shared("Task04_Hippocampus")
    assert validate_dataset(root, workers=2) == []  # includes the two float32 label files


@pytest.mark.integration
def test_real_task102_four_channels() -> None:
    desc = load_dataset(_shared("Task102_BraTSToolkitExamples_4ch"))
    assert desc.channel_names == ("FLAIR", "T1", "T1c", "T2")
    assert len(desc.training) == 2 and all(len(c.images) == 1 for c in desc.training)
    assert validate_dataset(desc, check_data=False) == []  # headers: 4 channels in one 4D file


def test_write_nifti_helper_axes(tmp_path: Path) -> None:
    """The synthetic writer stores (z, y, x) arrays so that images.read_image returns them unchanged."""
    from decathlete.io.images import read_image

    arr = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    write_nifti(tmp_path / "a.nii.gz", arr, spacing=(3.0, 2.0, 1.0))
    data, geometry = read_image(tmp_path / "a.nii.gz")
    assert np.array_equal(data, arr)
    assert geometry.shape == (3, 4, 5) and geometry.spacing == (3.0, 2.0, 1.0)
