"""Model selection (`decathlete best`): configurations and their pairwise ensembles compared on the same
cross-validation cases, on work folders whose cross-validation is written by hand (no training), so every number is
known: configuration A is right on one half of each case and slightly wrong on the other, B the other way round, and
their average is right everywhere."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from decathlete import api
from decathlete.cli import main
from decathlete.evaluate import evaluate_pairs
from decathlete.infer.ensemble import ensemble_folder, label_map
from decathlete.infer.outputs import save_probability_file
from decathlete.infer.postprocess import FILENAME, choose_postprocessing, save_postprocessing
from decathlete.io.images import read_label, write_image
from decathlete.selection import find_best
from synthetic import make_msd_dataset

CASES = ["case_000", "case_001", "case_002", "case_003"]
TWO_FOLDS = {0: CASES[:2], 1: CASES[2:]}
LABELS = {"a": 1, "b": 2}


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A raw dataset of four labelled cases (3 labels, one box per label) and its plans."""
    root = tmp_path_factory.mktemp("selection")
    raw = make_msd_dataset(root / "raw", n_cases=4, shape=(6, 8, 10), spacing=(2.0, 1.0, 1.0))
    api.plan(raw, root / "work", recipe="tiny", workers=1, progress=False, configurations=["3d_fullres"])
    return root


@pytest.fixture
def work(planned: Path, tmp_path: Path) -> Path:
    """A fresh work folder (plans only) over the module's raw dataset."""
    (tmp_path / "work").mkdir()
    shutil.copy(planned / "work" / "plans.json", tmp_path / "work")
    return tmp_path / "work"


def _reference(work: Path, case: str) -> tuple[np.ndarray, Path]:
    raw = Path(json.loads((work / "plans.json").read_text())["dataset"]["root"])
    return read_label(raw / "labelsTr" / f"{case}.nii.gz")[0], raw / "labelsTr" / f"{case}.nii.gz"


def _probabilities(ref: np.ndarray, wrong: np.ndarray, p_true: float, p_wrong: float) -> np.ndarray:
    """(3, z, y, x) probabilities: 0.8 on the true label where ``wrong`` is False; elsewhere ``p_true`` on it and
    ``p_wrong`` on the next label (1 - both on the third)."""
    p = np.full((3, *ref.shape), 0.1, np.float32)
    np.put_along_axis(p, ref[None].astype(np.int64), 0.8, axis=0)
    for k in range(3):
        here = wrong & (ref == k)
        p[k][here], p[(k + 1) % 3][here], p[(k + 2) % 3][here] = p_true, p_wrong, 1 - p_true - p_wrong
    return p


def _halves(ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    left = np.zeros(ref.shape, bool)
    left[..., : ref.shape[-1] // 2] = True
    return left, ~left


def _fake_crossval(work: Path, configuration: str, probabilities: Mapping[str, np.ndarray],
                   folds: Mapping[int, list[str]] = TWO_FOLDS, npz: bool = True) -> Path:
    """Write what `decathlete crossval` writes (per fold: label maps, npz, summary; crossval/summary.json,
    result.json, postprocessing.json), from given probabilities."""
    folder = work / "models" / configuration / "tiny"
    every = []
    for k, cases in folds.items():
        validation = folder / f"fold_{k}" / "validation"
        validation.mkdir(parents=True)
        shutil.copy(work / "plans.json", folder / f"fold_{k}")
        pairs = []
        for case in cases:
            _, ref_path = _reference(work, case)
            geometry = read_label(ref_path)[1]
            p = probabilities[case].astype(np.float16)
            if npz:
                save_probability_file(validation / f"{case}.npz", p, [0, 1, 2])
            seg = label_map(p.astype(np.float32), [0, 1, 2], False)
            write_image(seg, geometry, validation / f"{case}.nii.gz", dtype=seg.dtype)
            pairs.append((case, validation / f"{case}.nii.gz", ref_path))
        evaluate_pairs(pairs, LABELS, output=validation / "summary.json", plots=False, progress=False)
        every += pairs
    evaluate_pairs(every, LABELS, output=folder / "crossval" / "summary.json", plots=False, progress=False)
    save_postprocessing({**choose_postprocessing([(p, r) for _, p, r in every], LABELS), "folds": list(folds)},
                        folder)
    (folder / "crossval" / "result.json").write_text(json.dumps({"folds": list(folds), "n_cases": len(every)}))
    return folder


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    total = pred.sum() + ref.sum()
    return 1.0 if total == 0 else 2.0 * (pred & ref).sum() / total


def _hand_scores(work: Path, wrong_half: int) -> tuple[float, dict[str, float]]:
    """Mean foreground Dice and Dice per label of label maps that are right except on one half, where every voxel
    holds the next label."""
    per_label: dict[str, list[float]] = {name: [] for name in LABELS}
    for case in CASES:
        ref, _ = _reference(work, case)
        pred = ref.copy()
        wrong = _halves(ref)[wrong_half]
        pred[wrong] = (ref[wrong] + 1) % 3
        for name, value in LABELS.items():
            per_label[name].append(_dice(pred == value, ref == value))
    dice = {name: float(np.mean(v)) for name, v in per_label.items()}
    return float(np.mean(list(dice.values()))), dice


def test_an_ensemble_right_where_each_member_is_wrong_is_chosen(work: Path) -> None:
    refs = {c: _reference(work, c)[0] for c in CASES}
    _fake_crossval(work, "2d", {c: _probabilities(r, _halves(r)[1], 0.4, 0.45) for c, r in refs.items()})
    _fake_crossval(work, "3d_fullres", {c: _probabilities(r, _halves(r)[0], 0.4, 0.45) for c, r in refs.items()})
    best = find_best(work, progress=False)
    assert best == json.loads((work / "best.json").read_text())
    by_name = {c["name"]: c for c in best["candidates"]}
    assert list(by_name) == ["2d", "3d_fullres", "2d+3d_fullres"] and best["skipped"] == []
    assert best["cases"] == CASES and all(c["n_cases"] == 4 for c in best["candidates"])
    for name, wrong_half in (("2d", 1), ("3d_fullres", 0)):
        fg, dice = _hand_scores(work, wrong_half)
        assert by_name[name]["foreground_dice"] == pytest.approx(fg, abs=1e-9) and fg < 0.9
        assert by_name[name]["dice"] == pytest.approx(dice, abs=1e-9)
        assert by_name[name]["recipes"] == {name: "tiny"}
    ensemble = by_name["2d+3d_fullres"]
    assert ensemble["foreground_dice"] == 1.0 and ensemble["dice"] == {"a": 1.0, "b": 1.0}
    assert ensemble["configurations"] == ["2d", "3d_fullres"]
    for case in CASES:  # the averaged label maps: the references, on their exact grid
        seg, geometry = read_label(work / "ensembles" / "2d+3d_fullres" / f"{case}.nii.gz")
        ref, ref_path = _reference(work, case)
        assert (seg == ref).all() and geometry.same_grid(read_label(ref_path)[1], 0, 0, 0) == []
    assert best["chosen"]["name"] == "2d+3d_fullres"
    # one box per label: no component to remove, so no step is kept; the choice is saved where predict finds it
    pp = best["chosen"]["postprocessing"]
    assert (pp["foreground"], pp["per_class"], pp["mean_dice_after"]) == (False, {}, {"a": 1.0, "b": 1.0})
    assert ensemble_folder(work, ["3d_fullres", "2d"]) == work / "ensembles" / "2d+3d_fullres"
    saved = json.loads((work / "ensembles" / "2d+3d_fullres" / FILENAME).read_text())
    assert pp["file"] == str(work / "ensembles" / "2d+3d_fullres" / FILENAME)
    assert saved["recipes"] == {"2d": "tiny", "3d_fullres": "tiny"} and saved["foreground"] is False
    assert best["command"] == f"decathlete predict -i IN -o OUT -m {work} -c 2d 3d_fullres"


def test_a_single_configuration_wins_ties_and_a_harmful_ensemble(work: Path, capsys: pytest.CaptureFixture
                                                                  ) -> None:  # fmt: skip
    refs = {c: _reference(work, c)[0] for c in CASES}
    everywhere = {c: np.ones(r.shape, bool) for c, r in refs.items()}
    _fake_crossval(work, "2d", {c: _probabilities(r, ~everywhere[c], 0.4, 0.45) for c, r in refs.items()})  # right
    # confidently wrong everywhere: it outvotes 2d (0.9 + 0.1 > 0.8 + 0.05), so the pair is as wrong as it
    _fake_crossval(work, "3d_fullres", {c: _probabilities(r, everywhere[c], 0.05, 0.9) for c, r in refs.items()})
    # slightly wrong on a half: the pair with 2d is right everywhere, as good as 2d alone
    _fake_crossval(work, "3d_lowres", {c: _probabilities(r, _halves(r)[1], 0.4, 0.45) for c, r in refs.items()})
    assert main(["best", str(work)]) == 0
    out = capsys.readouterr().out
    best = json.loads((work / "best.json").read_text())
    scores = {c["name"]: c["foreground_dice"] for c in best["candidates"]}
    assert scores["2d"] == 1.0 and scores["2d+3d_lowres"] == 1.0 and scores["2d+3d_fullres"] < 0.5
    assert scores["2d+3d_fullres"] == pytest.approx(scores["3d_fullres"], abs=1e-9)
    assert best["chosen"]["name"] == "2d"  # the tie with 2d+3d_lowres goes to the single configuration
    assert best["chosen"]["postprocessing"]["file"] == str(work / "models" / "2d" / "tiny" / FILENAME)
    assert best["command"] == f"decathlete predict -i IN -o OUT -m {work} -c 2d"
    assert not (work / "ensembles" / "2d+3d_lowres" / FILENAME).exists()  # only the winner's is chosen
    assert f"predict with: decathlete predict -i IN -o OUT -m {work} -c 2d\n" in out
    assert any(line.startswith("2d ") and line.endswith("<- chosen") for line in out.splitlines())
    restricted = find_best(work, ["3d_fullres", "3d_lowres"], progress=False)
    assert [c["name"] for c in restricted["candidates"]] == ["3d_fullres", "3d_lowres", "3d_fullres+3d_lowres"]


def test_configurations_scored_on_other_cases_are_refused(work: Path, capsys: pytest.CaptureFixture) -> None:
    refs = {c: _reference(work, c)[0] for c in CASES}
    right = {c: _probabilities(r, np.zeros(r.shape, bool), 0.4, 0.45) for c, r in refs.items()}
    _fake_crossval(work, "2d", right)
    _fake_crossval(work, "3d_fullres", right, folds={0: CASES[:2]})
    with pytest.raises(ValueError, match=r"2d \(folds 0, 1, 4 cases\) and 3d_fullres \(folds 0, 2 cases\) cover "
                                         r"different cases.*2 only in 2d \(e.g. case_002\)"):
        find_best(work, progress=False)
    assert main(["best", str(work)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("decathlete best: error: the cross-validations of 2d") and err.count("\n") == 1
    assert "crossval the same folds" in err and not (work / "best.json").exists()
    assert find_best(work, ["2d"], progress=False)["chosen"]["name"] == "2d"  # one of them alone is fine


def test_a_pair_without_saved_probabilities_is_skipped_with_the_fix(work: Path) -> None:
    refs = {c: _reference(work, c)[0] for c in CASES}
    _fake_crossval(work, "2d", {c: _probabilities(r, _halves(r)[1], 0.4, 0.45) for c, r in refs.items()})
    _fake_crossval(work, "3d_fullres", {c: _probabilities(r, _halves(r)[0], 0.4, 0.45) for c, r in refs.items()},
                   npz=False)
    best = find_best(work, progress=False)
    assert [c["name"] for c in best["candidates"]] == ["2d", "3d_fullres"]
    (skipped,) = best["skipped"]
    assert skipped["name"] == "2d+3d_fullres"
    assert skipped["reason"] == "3d_fullres has no saved validation probabilities for 4 of 4 cases (e.g. case_000)"
    assert skipped["fix"] == f"`decathlete crossval {work} -c 3d_fullres --save-probabilities`"
    assert best["chosen"]["name"] == max(best["candidates"], key=lambda c: c["foreground_dice"])["name"]


def test_nothing_cross_validated_names_the_fix(work: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["best", str(work)]) == 1
    err = capsys.readouterr().err
    assert f"no configuration of {work} was cross-validated" in err
    assert f"`decathlete crossval {work} -c CONFIG --save-probabilities`" in err
    refs = {c: _reference(work, c)[0] for c in CASES}
    _fake_crossval(work, "2d", {c: _probabilities(r, _halves(r)[1], 0.4, 0.45) for c, r in refs.items()})
    assert main(["best", str(work), "-c", "2d", "3d_fullres"]) == 1
    err = capsys.readouterr().err
    assert f"3d_fullres of {work} was not cross-validated" in err
    assert f"`decathlete crossval {work} -c 3d_fullres --save-probabilities`" in err
