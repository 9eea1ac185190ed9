"""Per-case preprocessing and the dataset runner, on synthetic NIfTI cases and (if present) shared data."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from decathlete.io.datasets import Case
from decathlete.preprocess import cache
from decathlete.preprocess.pipeline import preprocess_case, preprocess_dataset

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SPACING = (5.0, 0.8, 0.8)  # (z, y, x) mm: anisotropic
CONFIG = {
    "spacing": [2.5, 1.6, 1.6],
    "normalization": [{"scheme": "zscore", "use_nonzero_mask": False}],
    "resampling": {"image_order": 3, "label_order": 1},
    "batch_size": 2,  # not a preprocessing setting: must not matter
}


def _write_nifti(array_zyx: np.ndarray, spacing_zyx: tuple[float, ...], path: Path) -> Path:
    # nibabel stores (x, y, z): transpose and reverse the spacing.
    affine = np.diag([*spacing_zyx[::-1], 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array_zyx.transpose(2, 1, 0)), affine), path)
    return path


def make_synthetic_case(folder: Path, name: str, seed: int = 0) -> Case:
    """A (8, 24, 20) case with a zero border, smooth-ish content and labels 1 and 2 inside."""
    rng = np.random.default_rng(seed)
    image = np.zeros((8, 24, 20), dtype=np.float32)
    image[1:7, 2:22, 3:17] = rng.normal(100.0, 20.0, size=(6, 20, 14)) + 50 * seed
    label = np.zeros((8, 24, 20), dtype=np.uint8)
    label[2:5, 6:14, 5:11] = 1
    label[3:6, 14:20, 8:15] = 2
    folder.mkdir(parents=True, exist_ok=True)
    img = _write_nifti(image, SPACING, folder / f"{name}_img.nii.gz")
    lab = _write_nifti(label, SPACING, folder / f"{name}_lab.nii.gz")
    return Case(name, (img,), lab)


def test_preprocess_case_shapes_properties_locations(tmp_path: Path) -> None:
    case = make_synthetic_case(tmp_path, "syn")
    pre = preprocess_case(case.images, case.label, CONFIG, case_id="syn")
    props = pre.properties
    assert props["shape_before_crop"] == [8, 24, 20]
    assert props["crop_bbox"] == [[1, 7], [2, 22], [3, 17]] and props["shape_after_crop"] == [6, 20, 14]
    np.testing.assert_allclose(props["spacing_after_crop"], SPACING, rtol=1e-6)  # NIfTI stores float32 zooms
    assert props["target_spacing"] == [2.5, 1.6, 1.6]
    assert props["shape_after_resampling"] == [12, 10, 7] and props["separate_axis"] == 0
    assert pre.data.shape == (1, 12, 10, 7) and pre.data.dtype == np.float32
    assert pre.seg.shape == (12, 10, 7) and pre.seg.dtype == np.int8
    assert abs(float(pre.data.mean())) < 0.2  # z-scored before resampling: close to, not exactly, 0
    json.loads(json.dumps(props))  # JSON-safe as is
    assert props["geometry"]["spacing"] == props["spacing_after_crop"]
    assert set(pre.class_locations) == {1, 2} == {v for v in np.unique(pre.seg) if v > 0}
    for label, coords in pre.class_locations.items():
        assert coords.shape[1] == 3 and len(coords) == (pre.seg == label).sum()  # fewer than the cap: all
        assert np.all(pre.seg[tuple(coords.T)] == label)


def test_whole_volumes_when_cropping_is_off(tmp_path: Path) -> None:
    case = make_synthetic_case(tmp_path, "syn")
    pre = preprocess_case(case.images, case.label, {**CONFIG, "crop_to_nonzero": False}, case_id="syn")
    props = pre.properties
    assert props["crop_bbox"] == [[0, 8], [0, 24], [0, 20]] and props["shape_after_crop"] == [8, 24, 20]
    assert props["preprocessing"]["crop_to_nonzero"] is False
    cropped = preprocess_case(case.images, case.label, {**CONFIG, "crop_to_nonzero": True}, case_id="syn")
    assert "crop_to_nonzero" not in cropped.properties["preprocessing"]  # caches from before the option stay valid
    assert pre.data.shape[1:] == tuple(props["shape_after_resampling"]) and pre.data.size > cropped.data.size


def test_preprocess_case_is_deterministic_and_caps_locations(tmp_path: Path, monkeypatch) -> None:
    import decathlete.preprocess.pipeline as pipeline

    monkeypatch.setattr(pipeline, "MAX_LOCATIONS_PER_CLASS", 5)
    case = make_synthetic_case(tmp_path, "det")
    a = preprocess_case(case.images, case.label, CONFIG, case_id="det")
    b = preprocess_case(case.images, case.label, CONFIG, case_id="det")
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(a.seg, b.seg)
    assert a.properties == b.properties
    for label in a.class_locations:
        assert len(a.class_locations[label]) == 5
        np.testing.assert_array_equal(a.class_locations[label], b.class_locations[label])


def test_masked_normalisation_marks_outside_and_2d_keeps_slice_spacing(tmp_path: Path) -> None:
    case = make_synthetic_case(tmp_path, "mask")
    config = {
        "spacing": [1.0, 1.6, 1.6],
        "normalization": [{"scheme": "zscore", "use_nonzero_mask": True}],
        "resampling": {"keep_slice_axis_spacing": True, "slice_axis": 0},
    }
    pre = preprocess_case(case.images, case.label, config)
    assert pre.properties["case_id"] == "mask_img"  # default id: file name without suffix
    assert pre.properties["target_spacing"] == [5.0, 1.6, 1.6] and pre.data.shape[1] == 6
    assert pre.properties["outside_marked"] is True
    unlabelled = preprocess_case(case.images, None, {"spacing": [2.5, 1.6, 1.6]})
    assert unlabelled.seg is None and unlabelled.class_locations == {}


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def test_dataset_skip_on_rerun_and_settings_change(tmp_path: Path) -> None:
    cases = [make_synthetic_case(tmp_path / "raw", f"c{i}", seed=i) for i in range(2)]
    out = tmp_path / "pre"
    first = preprocess_dataset(cases, CONFIG, out, workers=1, progress=False)
    assert first["n_done"] == 2 and first["n_skipped"] == 0
    assert cache.list_cases(out) == ["c0", "c1"]
    before = _snapshot(out)
    second = preprocess_dataset(cases, {**CONFIG, "batch_size": 4}, out, workers=1, progress=False)
    assert second["n_done"] == 0 and second["n_skipped"] == 2
    assert _snapshot(out) == before  # untouched: same mtimes and bytes
    third = preprocess_dataset(cases, {**CONFIG, "spacing": [5.0, 1.6, 1.6]}, out, progress=False)
    assert third["n_done"] == 2  # other preprocessing settings: redone


def test_parallel_equals_serial(tmp_path: Path) -> None:
    cases = [make_synthetic_case(tmp_path / "raw", f"p{i}", seed=i) for i in range(4)]
    preprocess_dataset(cases, CONFIG, tmp_path / "serial", workers=1, progress=False)
    summary = preprocess_dataset(cases, CONFIG, tmp_path / "parallel", workers=2, progress=False)
    assert summary["n_done"] == 4
    serial = {k: v[1] for k, v in _snapshot(tmp_path / "serial").items()}
    parallel = {k: v[1] for k, v in _snapshot(tmp_path / "parallel").items()}
    assert serial == parallel


def test_failed_case_is_reported_after_the_others(tmp_path: Path) -> None:
    good = make_synthetic_case(tmp_path / "raw", "good")
    bad = Case("bad", (tmp_path / "missing.nii.gz",), None)
    with pytest.raises(RuntimeError, match="bad"):
        preprocess_dataset([bad, good], CONFIG, tmp_path / "pre", progress=False)
    assert cache.list_cases(tmp_path / "pre") == ["good"]


@pytest.mark.integration
@pytest.mark.skipif(not (DATA / "Task04_Hippocampus").is_dir(), reason="../shared/data/Task04_Hippocampus absent")
def test_hippocampus_three_cases(tmp_path: Path) -> None:
    from decathlete.io.images import read_image
    from decathlete.preprocess.cropping import crop_to_nonzero

    root = DATA / "Task04_Hippocampus"
    # 003 has a float32 label file, the others uint8 ones: both must come out as int8.
    names = ["hippocampus_001", "hippocampus_003", "hippocampus_004"]
    cases = [Case(n, (root / "imagesTr" / f"{n}.nii.gz",), root / "labelsTr" / f"{n}.nii.gz") for n in names]
    config = {"spacing": [1.0, 1.0, 1.0], "normalization": [{"scheme": "zscore", "use_nonzero_mask": False}]}
    summary = preprocess_dataset(cases, config, tmp_path, workers=1, progress=False)
    assert summary["n_done"] == 3
    for case in cases:
        data, seg, props, locations = cache.open_case(tmp_path, case.id)
        cropped, _, _, _ = crop_to_nonzero(read_image(case.images)[0])
        assert data.shape == cropped.shape and seg.shape == cropped.shape[1:]
        assert set(np.unique(seg)) == {0, 1, 2} and seg.dtype == np.int8
        assert abs(float(np.mean(data))) < 1e-3 and set(locations) == {1, 2}


def test_script_without_main_guard_fails_instead_of_hanging(tmp_path: Path) -> None:
    import subprocess
    import sys

    cases = [make_synthetic_case(tmp_path / "raw", f"g{i}", seed=i) for i in range(2)]
    listed = ", ".join(f"Case({c.id!r}, (Path({str(c.images[0])!r}),), Path({str(c.label)!r}))" for c in cases)
    script = tmp_path / "unguarded.py"  # calls a process-based runner at import time: children re-run it
    script.write_text(
        "from pathlib import Path\n"
        "from decathlete.io.datasets import Case\n"
        "from decathlete.preprocess.pipeline import preprocess_dataset\n"
        f"preprocess_dataset([{listed}], {CONFIG!r}, Path({str(tmp_path / 'out')!r}), workers=2, progress=False)\n"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env={"PYTHONPATH": src}
    )
    assert done.returncode != 0 and "2 of 2 cases failed" in done.stderr and "__main__" in done.stderr
