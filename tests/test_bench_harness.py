"""The benchmark harness's own logic: result merging, device handling, the synthetic CT's geometry.

The benchmarks themselves need the reference environment and minutes of CPU (``make bench``); what is tested here
is what decides whether their output can be trusted: a record of another benchmark survives a partial run with its
own date and commit, ratios and missing values are written as they are, and the generated CT has the spacing the
memory benchmark says it has, in the order each library expects.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import run as bench_run  # noqa: E402
from _train_reference import ds_factors  # noqa: E402


def _args(**kw) -> argparse.Namespace:
    base = {"quick": False, "repeats": 3, "workers": 2, "device": "cpu"}
    return argparse.Namespace(**{**base, **kw})


def test_record_ratio_and_missing_reference() -> None:
    assert common.Record("a", "s", 2.0, 8.0, "ref", "lower").to_dict()["ratio"] == 0.25
    assert common.Record("a", "s", 2.0, None, "ref", "lower").to_dict()["ratio"] is None
    assert common.Record("a", "Dice", 0.8, 0.0, "ref", "higher").to_dict()["ratio"] is None  # not infinity


def test_partial_run_keeps_other_records_with_their_own_stamp(tmp_path: Path) -> None:
    bench_run.write_results([common.Record("alpha", "s", 1.0, 2.0, "ref A", "lower", note="first"),
                             common.Record("beta", "MB", 3.0, None, "ref B", "lower", note="B failed: why")],
                            tmp_path, _args())
    first = {r["name"]: r for r in json.loads((tmp_path / "latest.json").read_text())["records"]}
    first["alpha"]["date"] = "2000-01-01T00:00:00+00:00"  # pretend alpha was measured long ago
    (tmp_path / "latest.json").write_text(json.dumps({"records": list(first.values())}))
    bench_run.write_results([common.Record("beta", "MB", 4.0, 8.0, "ref B", "lower")], tmp_path,
                            _args(quick=True, repeats=1))
    merged = {r["name"]: r for r in json.loads((tmp_path / "latest.json").read_text())["records"]}
    assert list(merged) == ["alpha", "beta"]
    assert merged["alpha"]["date"].startswith("2000-01-01") and merged["alpha"]["ratio"] == 0.5
    assert merged["beta"]["decathlete"] == 4.0 and merged["beta"]["ratio"] == 0.5 and merged["beta"]["quick"]
    assert merged["beta"]["machine"]["device"] == "cpu" and merged["beta"]["repeats"] == 1
    table = (tmp_path / "latest.md").read_text()
    assert "| alpha | s | 1 | 2 | ref A | 0.5 | lower | 2000-01-01 |" in table
    assert "(quick)" in table.split("| beta |")[1].splitlines()[0]
    assert "- **alpha** (median of 3): first" in table


def test_missing_values_are_dashes_not_zeros(tmp_path: Path) -> None:
    bench_run.write_results([common.Record("gamma", "s", None, None, "ref", "lower", note="data absent")], tmp_path,
                            _args())
    assert "| gamma | s | — | — | ref | — | lower |" in (tmp_path / "latest.md").read_text()


def test_nnunet_device_names() -> None:
    assert common.nnunet_device("cpu") == "cpu"
    assert common.nnunet_device("cuda:1") == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: cuda is a valid benchmark device here")
def test_cuda_refused_with_the_fix_when_torch_sees_no_gpu() -> None:
    assert common.check_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="sees no CUDA GPU.*TORCH_INDEX"):
        common.check_device("cuda")
    with pytest.raises(ValueError, match="choose cpu or cuda"):
        common.check_device("mps")
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--device", "cuda", "--only", "predict"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "sees no CUDA GPU" in proc.stderr


def test_deep_supervision_factors_hand_computed() -> None:
    strides = [[1, 1, 1], [2, 2, 2], [1, 2, 2], [2, 2, 2]]
    assert ds_factors(strides, 3) == [[1, 1, 1], [2, 2, 2], [2, 4, 4]]


def test_synthetic_ct_geometry_and_labels(tmp_path: Path) -> None:
    import SimpleITK as sitk

    from decathlete.io.images import read_image, read_label
    from decathlete.io.validation import check_dataset

    subprocess.run([sys.executable, str(BENCH / "_synthetic_ct.py"), str(tmp_path), "--train-cases", "2",
                    "--train-shape", "12", "40", "48", "--test-shape", "10", "32", "36"], check=True)
    raw = tmp_path / "Task99_SyntheticCT"
    dataset = check_dataset(raw)  # raises on any problem (geometry, labels, dtype, NaN ...)
    assert len(dataset.training) == 2 and dataset.channel_names == ("CT",)
    image, geometry = read_image(tmp_path / "test" / "ct.nii.gz")
    assert image.shape == (1, 10, 32, 36) and geometry.spacing == pytest.approx((2.5, 0.8, 0.8))
    itk = sitk.ReadImage(str(tmp_path / "test" / "ct.nii.gz"))
    assert itk.GetSpacing() == pytest.approx((0.8, 0.8, 2.5)) and itk.GetSize() == (36, 32, 10)
    assert itk.GetPixelID() == sitk.sitkInt16
    label, _ = read_label(raw / "labelsTr" / "ct_000.nii.gz")
    assert set(np.unique(label)) == {0, 1, 2, 3, 4, 5}  # every organ present, nothing else


@pytest.mark.skipif(not (common.SHARED_DATA / "Task04_Hippocampus").is_dir(),
                    reason="../shared/data/Task04_Hippocampus is absent")
def test_workspace_prepares_once_and_redoes_only_what_a_benchmark_removed(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    import shutil

    from _workspace import QUICK_CASES, Workspace

    ws = Workspace(tmp_path / "ws", quick=True, workers=1, device="cpu")
    work = ws.our_preprocessed()
    first = capsys.readouterr().out
    assert "decathlete plan" in first and "decathlete preprocess" in first
    assert len(ws.case_ids) == QUICK_CASES and ws.data.is_relative_to(tmp_path)  # a copy, never the shared data
    assert json.loads((work / "splits.json").read_text()) == ws.splits
    fold0 = ws.splits[0]
    assert sorted(fold0["train"] + fold0["val"]) == ws.case_ids and not set(fold0["train"]) & set(fold0["val"])

    assert ws.our_preprocessed() == work and capsys.readouterr().out == ""  # complete: nothing is run again
    shutil.rmtree(work / "preprocessed")  # what the preprocessing benchmark does before timing
    (work / "splits.json").unlink()
    ws.our_preprocessed()
    again = capsys.readouterr().out
    assert "decathlete preprocess" in again and "decathlete plan" not in again
    assert json.loads((work / "splits.json").read_text()) == ws.splits
    ws.close()
    assert not (tmp_path / "ws").exists()
