"""The command line: help on every verb, validate → plan → preprocess end to end, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from decathlete.cli import main
from synthetic import edit_dataset_json, make_msd_dataset, snapshot

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VERBS = ["validate", "plan", "preprocess", "train", "predict", "crossval", "evaluate", "demo", "list", "patches"]


@pytest.mark.parametrize("verb", [None, *VERBS])
def test_help_on_every_verb(verb: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"] if verb is None else [verb, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: decathlete" in out
    if verb is None:
        assert all(v in out for v in VERBS)


def test_console_script_module_entry() -> None:
    result = subprocess.run([sys.executable, "-m", "decathlete.cli", "list", "planners"], capture_output=True,
                            text=True, check=True)
    assert "nnunet" in result.stdout


def test_validate_plan_preprocess(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_msd_dataset(tmp_path / "raw", n_cases=4, shape=(10, 20, 24), spacing=(3.0, 1.0, 1.0))
    before = snapshot(data)
    assert main(["validate", str(data), "-j", "1"]) == 0
    work = tmp_path / "work"
    assert main(["plan", str(data), "-o", str(work), "-j", "1"]) == 0
    plans = json.loads((work / "plans.json").read_text())
    full = plans["configurations"]["3d_fullres"]
    for key in ("spacing", "patch_size", "batch_size", "strides", "kernel_sizes", "features_per_stage",
                "normalization", "network"):
        assert key in full
    assert full["spacing"] == [3.0, 1.0, 1.0]  # (z, y, x)
    assert full["network"]["name"] == "unet" and full["network"]["kwargs"]["strides"] == full["strides"]
    assert (work / "fingerprint.json").is_file()
    assert main(["preprocess", str(work), "-c", "3d_fullres", "-j", "1"]) == 0
    out_dir = work / "preprocessed" / "3d_fullres"
    assert sorted(p.name for p in out_dir.glob("*.json")) == [f"case_{i:03d}.json" for i in range(4)]
    assert snapshot(data) == before  # the raw dataset is never written to
    capsys.readouterr()
    assert main(["preprocess", str(work), "-c", "3d_fullres", "-j", "1", "--json"]) == 0  # resumes: all skipped
    summary = json.loads(capsys.readouterr().out)
    assert summary["3d_fullres"]["n_skipped"] == 4 and summary["3d_fullres"]["n_done"] == 0


def test_broken_dataset_fails_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_msd_dataset(tmp_path / "raw", n_cases=3)
    edit_dataset_json(data, training=[{"image": "../outside.nii.gz", "label": "./labelsTr/case_000.nii.gz"},
                                      {"image": "./imagesTr/case_001.nii.gz", "label": "./labelsTr/none.nii.gz"}])
    assert main(["validate", str(data)]) == 1
    err = capsys.readouterr().err
    assert "outside" in err and "none.nii.gz" in err
    work = tmp_path / "work"
    assert main(["plan", str(data), "-o", str(work)]) == 1
    assert not work.exists()


def test_preprocess_without_plans_explains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["preprocess", str(tmp_path)]) == 1
    assert "decathlete plan" in capsys.readouterr().err


def test_unknown_configuration_and_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_msd_dataset(tmp_path / "raw", n_cases=2)
    assert main(["plan", str(data), "-o", str(tmp_path / "w"), "--recipe", "nope"]) == 1
    assert "no recipe named 'nope'" in capsys.readouterr().err
    assert main(["plan", str(data), "-o", str(tmp_path / "w"), "-j", "1"]) == 0
    assert main(["preprocess", str(tmp_path / "w"), "-c", "3d_cascade"]) == 1
    assert "available" in capsys.readouterr().err


@pytest.mark.integration
def test_hippocampus_end_to_end(tmp_path: Path) -> None:
    """validate + plan + preprocess on the real Task04 data (in place; outputs in tmp_path)."""
    if not (SHARED_DATA / "Task04_Hippocampus").is_dir():
        pytest.skip("../shared/data/Task04_Hippocampus is absent")
    work = tmp_path / "hippo"
    assert main(["plan", str(SHARED_DATA / "Task04_Hippocampus"), "-o", str(work), "-j", "2"]) == 0
    plans = json.loads((work / "plans.json").read_text())
    full = plans["configurations"]["3d_fullres"]
    # what nnU-Net v2 plans for the same data
    assert full["spacing"] == [1.0, 1.0, 1.0] and full["patch_size"] == [40, 56, 40]
    assert full["features_per_stage"] == [32, 64, 128, 256]
    assert "3d_lowres" not in plans["configurations"]
    assert plans["dataset"]["n_training"] == 200
    from decathlete.preprocess.cache import open_case

    assert main(["preprocess", str(work), "-c", "3d_fullres", "-j", "2"]) == 0
    data, seg, props, _ = open_case(work / "preprocessed" / "3d_fullres", "hippocampus_001")
    assert set(np.unique(np.asarray(seg)).tolist()) <= {-1, 0, 1, 2}
    assert abs(float(np.asarray(data).mean())) < 0.5


def test_quick_demo_runs_the_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """generate → validate → plan → preprocess → train → predict held-out → evaluate → report."""
    assert main(["demo", "--quick", "-o", str(tmp_path / "demo"), "-j", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "foreground mean" in out and "seconds per stage" in out
    assert f"efficiency: {len(json.loads((tmp_path / 'demo' / 'splits.json').read_text())[0]['val'])} case(s)" in out
    work = tmp_path / "demo"
    summary = json.loads((work / "evaluation" / "summary.json").read_text())
    held_out = json.loads((work / "splits.json").read_text())[0]["val"]
    assert sorted(c["case"] for c in summary["per_case"]) == sorted(held_out)
    assert set(summary["mean"]) == {"organ", "lesion"}
    report = (work / "report.html").read_text()
    assert report.count("data:image/png;base64") >= 2 and "Dice" in report
    assert "Prediction cost" in report and "s/case (preprocess" in report and "GFLOPs per patch" in report
    raw = work / "raw"
    assert all(not p.is_symlink() for p in raw.rglob("*"))  # the held-out links live in the work folder


def test_evaluate_verb(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from synthetic import write_nifti

    ref = np.zeros((6, 8, 8), np.uint8)
    ref[2:4, 2:6, 2:6] = 1
    pred = ref.copy()
    pred[2, 2:6, 2:6] = 0  # half of the object missed
    write_nifti(tmp_path / "ref" / "c0.nii.gz", ref, (3.0, 1.0, 1.0))
    write_nifti(tmp_path / "pred" / "c0.nii.gz", pred, (3.0, 1.0, 1.0))
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "ref")]) == 0
    summary = json.loads((tmp_path / "pred" / "summary.json").read_text())
    assert summary["mean"]["1"]["dice"] == pytest.approx(2 * 16 / (16 + 32))
    assert "Dice 0.6667" in capsys.readouterr().out
