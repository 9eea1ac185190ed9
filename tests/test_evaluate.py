"""evaluate_folder on tiny NIfTI folders: summary.json values and structure, CSV, plots, pairing and grid errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from decathlete.evaluate import evaluate_folder, labels_from_dataset_json, pair_cases
from decathlete.metrics import METRICS
from synthetic import write_json, write_nifti

SPACING = (3.0, 1.0, 1.0)  # (z, y, x) mm
SHAPE = (8, 12, 12)
DIAGONAL = math.sqrt((8 * 3.0) ** 2 + 12**2 + 12**2)


def _ref() -> np.ndarray:
    ref = np.zeros(SHAPE, np.uint8)
    ref[2:6, 3:9, 3:9] = 1
    ref[1:7, 0:2, 0:12] = 2
    return ref


def make_folders(root: Path) -> tuple[Path, Path]:
    """c1 perfect (plus a stray value 5 no reference has), c2 label 1 one slice (3 mm) too high, c3 label 2 only
    predicted (the reference has none)."""
    pred_dir, ref_dir = root / "pred", root / "ref"
    ref = _ref()
    c1 = ref.copy()
    c1[0, 11, 11] = 5
    c2 = ref.copy()
    c2[c2 == 1] = 0
    c2[3:7, 3:9, 3:9] = 1
    ref3 = ref.copy()
    ref3[ref3 == 2] = 0
    for case, pred, r in (("c1", c1, ref), ("c2", c2, ref), ("c3", ref, ref3)):
        write_nifti(ref_dir / f"{case}.nii.gz", r, spacing=SPACING, dtype=np.uint8)
        # Predictions as .nii: pairing is by case id, whatever the suffix.
        write_nifti(pred_dir / f"{case}.nii", pred, spacing=SPACING, dtype=np.uint8)
    return pred_dir, ref_dir


def _no_nan(text: str) -> dict:
    def reject(name: str) -> None:
        raise AssertionError(f"{name} in summary.json")

    return json.loads(text, parse_constant=reject)


def test_summary_json_csv_and_plots(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    out = tmp_path / "eval" / "summary.json"
    summary = evaluate_folder(pred_dir, ref_dir, output=out)
    assert _no_nan(out.read_text()) == json.loads(json.dumps(summary))
    assert set(summary) >= {"per_case", "mean", "foreground_mean", "conventions"}
    assert [c["case"] for c in summary["per_case"]] == ["c1", "c2", "c3"]
    assert summary["labels"] == {"1": 1, "2": 2}  # from the references: the stray 5 is no label
    for case in summary["per_case"]:
        assert list(case["metrics"]) == ["1", "2"] and all(list(m) == list(METRICS) for m in case["metrics"].values())
    c1, c2, c3 = (c["metrics"] for c in summary["per_case"])
    assert c1["1"]["dice"] == 1.0 and c1["1"]["nsd"] == 1.0 and c1["1"]["hd95"] == 0.0
    assert c2["1"]["dice"] == pytest.approx(0.75) and c2["1"]["hd95"] == pytest.approx(3.0)  # z spacing, not x
    assert c2["1"]["tp"] == 108 and c2["1"]["fp"] == 36 and c2["1"]["volume_ref_mm3"] == pytest.approx(144 * 3.0)
    assert (c3["2"]["dice"], c3["2"]["nsd"], c3["2"]["sensitivity"]) == (0.0, 0.0, 0.0)
    assert c3["2"]["hd95"] == pytest.approx(DIAGONAL)
    assert summary["mean"]["1"]["dice"] == pytest.approx(2.75 / 3) and summary["mean"]["2"]["dice"] == pytest.approx(
        2 / 3
    )
    assert summary["mean"]["1"]["hd95"] == pytest.approx(1.0)
    fg = summary["foreground_mean"]
    assert fg["dice"] == pytest.approx((2.75 / 3 + 2 / 3) / 2) and set(fg) == set(METRICS)
    conv = summary["conventions"]
    assert conv["nsd_tolerance_mm"] == {"1": 1.0, "2": 1.0} and conv["spacing_order"] == "z, y, x"
    assert "empty" in conv["empty_masks"].lower()

    with open(out.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and [(r["case"], r["label"]) for r in rows[:2]] == [("c1", "1"), ("c1", "2")]
    assert float(rows[2]["hd95"]) == pytest.approx(3.0)
    for metric in METRICS:
        png = out.parent / f"boxplot_{metric}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]  # atomic writes cleaned up


def test_regions_and_per_label_tolerance(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    labels = {"tumour": 1, "whole": [1, 2]}
    summary = evaluate_folder(pred_dir, ref_dir, labels=labels, nsd_tolerance_mm={"tumour": 3.0})
    c2 = summary["per_case"][1]["metrics"]
    assert c2["tumour"]["nsd"] == pytest.approx(1.0)  # a 3 mm shift is within a 3 mm tolerance
    assert c2["whole"]["n_ref"] == 144 + 6 * 2 * 12 and c2["whole"]["n_pred"] == c2["whole"]["n_ref"]
    assert summary["conventions"]["nsd_tolerance_mm"] == {"tumour": 3.0, "whole": 1.0}
    assert summary["labels"] == {"tumour": 1, "whole": [1, 2]}
    with pytest.raises(ValueError, match="unknown labels"):
        evaluate_folder(pred_dir, ref_dir, labels=labels, nsd_tolerance_mm={"tumor": 3.0})


def test_missing_and_extra_predictions_are_errors(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    (pred_dir / "c2.nii").unlink()
    with pytest.raises(ValueError, match=r"no prediction .*: c2"):
        evaluate_folder(pred_dir, ref_dir)
    write_nifti(pred_dir / "c2.nii.gz", _ref(), spacing=SPACING, dtype=np.uint8)
    write_nifti(pred_dir / "c9.nii.gz", _ref(), spacing=SPACING, dtype=np.uint8)
    (pred_dir / "summary.json").write_text("{}")  # non-image files are ignored
    with pytest.raises(ValueError, match=r"no reference .*: c9"):
        pair_cases(pred_dir, ref_dir)


def test_grid_mismatch_names_the_case(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    write_nifti(pred_dir / "c2.nii", _ref(), spacing=(1.0, 1.0, 1.0), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"c2.*not on the reference grid.*spacing"):
        evaluate_folder(pred_dir, ref_dir)


def test_workers_give_the_serial_result(tmp_path):
    pred_dir, ref_dir = make_folders(tmp_path)
    assert evaluate_folder(pred_dir, ref_dir, workers=2) == evaluate_folder(pred_dir, ref_dir, workers=1)


@pytest.mark.parametrize("workers", [1, 2])
def test_bar_counts_the_cases_scored(tmp_path, bars, capsys, workers):
    made = bars("decathlete.evaluate")
    pred_dir, ref_dir = make_folders(tmp_path)
    evaluate_folder(pred_dir, ref_dir, workers=workers, plots=False)
    [bar] = made
    assert (bar.desc, bar.n, bar.total, bar.unit) == ("evaluate", 3, 3, "case")  # c1, c2, c3
    assert "3/3" in capsys.readouterr().err
    if workers == 1:  # the bar is made before the pool: one quiet run covers both (a pool takes seconds to start)
        evaluate_folder(pred_dir, ref_dir, plots=False, progress=False)
        assert made[1].disable and capsys.readouterr().err == ""


def test_labels_from_dataset_json(tmp_path):
    msd = write_json(tmp_path / "msd" / "dataset.json", {"labels": {"0": "background", "1": "liver", "2": "tumour"}})
    assert labels_from_dataset_json(msd.parent) == {"liver": 1, "tumour": 2}
    nnunet = {"labels": {"background": 0, "whole tumour": [1, 2, 3], "enhancing": 3}, "regions_class_order": [1, 3]}
    path = write_json(tmp_path / "nnunet.json", nnunet)
    assert labels_from_dataset_json(path) == {"whole tumour": [1, 2, 3], "enhancing": 3}
    with pytest.raises(ValueError, match="labels"):
        labels_from_dataset_json(write_json(tmp_path / "bad.json", {"labels": {}}))
