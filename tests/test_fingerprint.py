"""Fingerprint: hand-computed statistics on a tiny dataset, and the real hippocampus data when present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from decathlete.fingerprint import compute_fingerprint, intensity_stats
from decathlete.io.datasets import load_dataset
from synthetic import write_json, write_nifti

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _dataset(root: Path) -> Path:
    """Two cases: zero border (cropped away), foreground voxels with known intensities."""
    training = []
    for i, (shape, spacing) in enumerate((((10, 12, 14), (3.0, 1.0, 1.0)), ((12, 12, 16), (2.0, 1.0, 1.0)))):
        image = np.zeros(shape, np.float32)
        image[2:-2, 3:-3, 1:-1] = 5.0  # body: the crop box
        label = np.zeros(shape, np.uint8)
        label[3:5, 4:6, 4:6] = 1  # 8 voxels at value 10 + i
        label[6, 5, 5:8] = 2  # 3 voxels at value 100
        image[label == 1] = 10.0 + i
        image[label == 2] = 100.0
        write_nifti(root / "imagesTr" / f"c{i}.nii.gz", image, spacing)
        write_nifti(root / "labelsTr" / f"c{i}.nii.gz", label, spacing)
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    write_json(root / "dataset.json", {"name": "fp", "modality": {"0": "CT"}, "training": training,
                                       "labels": {"0": "background", "1": "a", "2": "b"}})
    return root


def test_fingerprint_hand_computed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import decathlete.fingerprint as fingerprint

    monkeypatch.setattr(fingerprint, "TOTAL_INTENSITY_SAMPLES", 400_000)  # 200k a case: the mixture to ~0.5%
    fp = compute_fingerprint(load_dataset(_dataset(tmp_path)), progress=False)
    c0, c1 = fp["cases"]
    assert c0["spacing"] == [3.0, 1.0, 1.0] and c0["shape"] == [10, 12, 14]
    assert c0["shape_after_crop"] == [6, 6, 12] and c1["shape_after_crop"] == [8, 6, 14]
    assert c0["crop_fraction"] == pytest.approx(6 * 6 * 12 / (10 * 12 * 14))
    assert c0["class_voxels"] == {"0": 10 * 12 * 14 - 11, "1": 8, "2": 3}
    # pooled: the same number of draws from each case's foreground, with replacement (nnU-Net v2): an equal mixture
    expected = np.array([10.0] * 8 + [100.0] * 3 + [11.0] * 8 + [100.0] * 3)  # equal foreground sizes here
    stats = fp["foreground_intensity"][0]
    assert stats["n_samples"] == 400_000 and stats["name"] == "CT"
    assert stats["mean"] == pytest.approx(expected.mean(), rel=5e-3)
    assert stats["std"] == pytest.approx(expected.std(), rel=5e-3)
    assert stats["percentile_99_5"] == 100.0
    assert stats["min"] == 10.0 and stats["max"] == 100.0 and stats["median"] == 11.0
    assert c0["intensity"][0]["mean"] == pytest.approx((8 * 10 + 3 * 100) / 11)
    assert fp["median_spacing"] == [2.5, 1.0, 1.0]
    # deterministic and identical with parallel workers
    assert compute_fingerprint(load_dataset(tmp_path), workers=2, progress=False) == fp


def test_intensity_stats_empty_foreground() -> None:
    assert intensity_stats(np.array([]))["mean"] == 0.0


def test_samples_are_bounded_per_case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import decathlete.fingerprint as fingerprint

    monkeypatch.setattr(fingerprint, "TOTAL_INTENSITY_SAMPLES", 8)
    monkeypatch.setattr(fingerprint, "MIN_SAMPLES_PER_CASE", 5)
    fp = compute_fingerprint(load_dataset(_dataset(tmp_path)), progress=False)
    assert fp["foreground_intensity"][0]["n_samples"] == 10  # 5 draws from each case's 11 foreground voxels


def test_small_foreground_cases_weigh_as_much_as_large_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nnU-Net draws the same number of foreground voxels from every case, with replacement; taking all voxels of a
    case with fewer than its share made a 1-voxel foreground count ~1/500 of a large one in the CT statistics."""
    import decathlete.fingerprint as fingerprint

    monkeypatch.setattr(fingerprint, "TOTAL_INTENSITY_SAMPLES", 100_000)
    training = []
    for i in range(2):
        image, label = np.ones((8, 12, 12), np.float32), np.zeros((8, 12, 12), np.uint8)
        if i == 0:
            label[:4] = 1  # 576 foreground voxels at 1
        else:
            label[4, 6, 6], image[4, 6, 6] = 1, 101.0  # one foreground voxel at 101
        write_nifti(tmp_path / "imagesTr" / f"c{i}.nii.gz", image, (1.0, 1.0, 1.0))
        write_nifti(tmp_path / "labelsTr" / f"c{i}.nii.gz", label, (1.0, 1.0, 1.0))
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    write_json(tmp_path / "dataset.json", {"name": "fp", "modality": {"0": "CT"}, "training": training,
                                           "labels": {"0": "background", "1": "a"}})
    stats = compute_fingerprint(load_dataset(tmp_path), progress=False)["foreground_intensity"][0]
    assert stats["n_samples"] == 100_000
    assert stats["mean"] == pytest.approx(51.0)  # (1 + 101) / 2; pooling every voxel gave (576 + 101) / 577 = 1.17


@pytest.mark.integration
def test_hippocampus_fingerprint_subset(tmp_path: Path) -> None:
    if not (SHARED_DATA / "Task04_Hippocampus").is_dir():
        pytest.skip("../shared/data/Task04_Hippocampus is absent")
    from dataclasses import replace

    desc = load_dataset(SHARED_DATA / "Task04_Hippocampus")
    fp = compute_fingerprint(replace(desc, training=desc.training[:6]), progress=False)
    assert fp["median_spacing"] == [1.0, 1.0, 1.0]
    for case in fp["cases"]:
        assert set(case["class_voxels"]) == {"0", "1", "2"}
        assert all(c <= s for c, s in zip(case["shape_after_crop"], case["shape"]))
    assert fp["foreground_intensity"][0]["max"] > fp["foreground_intensity"][0]["min"]
