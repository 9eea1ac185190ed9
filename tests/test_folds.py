"""Folds (issue 22 items 3 and 6): ``all`` is nnU-Net's (one model trained and validated on every case, ``fold_all``),
``every`` is each cross-validation fold, a prediction says which fold folders it used, and an unfinished or
unprepared fold gets one message naming the fold and the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from decathlete import api
from decathlete.cli import main
from decathlete.crossval import cross_validate
from decathlete.data.folds import ALL, EVERY, fold_of, parse_folds, single_fold
from decathlete.infer.predictor import Predictor
from decathlete.infer.provenance import PROVENANCE_FILE
from decathlete.io.checkpoint import FINAL, LATEST
from decathlete.synthetic import make_synthetic_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
QUICK = {"epochs": 1, "iterations_per_epoch": 2, "val_iterations": 1, "device": "cpu", "num_workers": 0,
         "progress": False}
CASES = ["synth_000", "synth_001", "synth_002", "synth_003"]
SPLITS = [{"train": CASES[:2], "val": CASES[2:]}, {"train": CASES[2:], "val": CASES[:2]}]  # two folds: cheap


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four cases planned for 3d_fullres and 2d, preprocessed for 3d_fullres only; `every` and `all` trained."""
    root = tmp_path_factory.mktemp("folds")
    raw = make_synthetic_dataset(root / "raw", n_cases=4, shape=(16, 40, 40))
    api.plan(raw, root / "work", recipe="tiny", workers=1, progress=False, configurations=["3d_fullres", "2d"])
    api.preprocess(root / "work", ["3d_fullres"], workers=1, progress=False)
    (root / "work" / "splits.json").write_text(json.dumps(SPLITS))
    api.train(root / "work", "3d_fullres", "every", **QUICK)
    api.train(root / "work", "3d_fullres", "all", **QUICK)
    return root / "work"


@pytest.fixture
def images(work: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(work.parent / "raw" / "imagesTr" / "synth_000.nii.gz", folder)
    return folder


def _models(work: Path) -> Path:
    return work / "models" / "3d_fullres" / "tiny"


def test_fold_words_are_parsed_into_folds_or_every() -> None:
    assert parse_folds("0") == [0] and parse_folds(["0", "2"]) == [0, 2] and parse_folds(3) == [3]
    assert parse_folds("all") == [ALL] and parse_folds(["1", "all"]) == [1, ALL]
    assert parse_folds(["every"]) == EVERY and parse_folds(None) == EVERY
    for bad, message in ((["x"], "'x' is not a fold"), (["-1"], "'-1' is not a fold"), (-1, "negative"),
                         (["1.5"], "not a fold"), (["every", "0"], "give it alone"), (["0", "0"], "given twice"),
                         ([], "no fold given")):
        with pytest.raises(ValueError, match=message):
            parse_folds(bad)
    assert single_fold("2") == 2
    for word in ("all", "every"):
        with pytest.raises(ValueError, match="give one fold number"):
            single_fold(word)
    assert (fold_of("fold_3"), fold_of("fold_all"), fold_of("fold_x"), fold_of("crossval")) == (3, ALL, None, None)


def test_search_refuses_all_and_every_in_one_line(work: Path, capsys: pytest.CaptureFixture) -> None:
    for word in ("all", "every"):
        with pytest.raises(SystemExit):
            main(["search", str(work), "--space", "space.json", "-f", word])
        assert "search scores trials on one fold's held-out cases" in capsys.readouterr().err


def test_fold_all_trains_and_validates_on_every_case(work: Path) -> None:
    folder = _models(work) / "fold_all"
    run = json.loads((folder / "run.json").read_text())
    # Hand-computed: the union of both folds' cases, in both roles (nnU-Net's do_split for fold 'all').
    assert run["split"]["train"] == run["split"]["val"] == CASES
    assert run["settings"]["fold"] == "all" and "fold 'all'" in run["split"]["rule"]
    log = (folder / "training_log.txt").read_text()
    assert "fold all" in log and "4 train / 4 val cases" in log and "no held-out score" in log
    assert (folder / FINAL).is_file()


def test_every_trains_each_cross_validation_fold(work: Path) -> None:
    trained = sorted(d.name for d in _models(work).iterdir() if (d / FINAL).is_file())
    assert trained == ["fold_0", "fold_1", "fold_all"]
    for k, split in enumerate(SPLITS):
        run = json.loads((_models(work) / f"fold_{k}" / "run.json").read_text())
        assert {key: run["split"][key] for key in ("train", "val")} == split


def test_predict_all_uses_fold_all_only_and_says_so(work: Path, images: Path, tmp_path: Path) -> None:
    summary = Predictor(work, folds=["all"], device="cpu", tta=False).predict_folder(images, tmp_path / "all",
                                                                                   progress=False)
    assert summary["folds"] == ["fold_all"] and summary["skipped_folds"] == []
    assert summary["model"] == str(_models(work))
    record = json.loads((tmp_path / "all" / PROVENANCE_FILE).read_text())
    [run] = record["runs"].values()
    assert run["folds"] == ["fold_all"] and run["skipped_folds"] == [] and run["model"] == str(_models(work))
    default = Predictor(work, device="cpu", tta=False)  # every cross-validation fold; fold_all only when named
    assert [d.name for d in default.fold_dirs] == ["fold_0", "fold_1"]
    mixed = Predictor(work, folds=["0", "all"], device="cpu", tta=False)
    assert [d.name for d in mixed.fold_dirs] == ["fold_0", "fold_all"]


def test_predict_without_the_asked_model_names_the_fix(work: Path, images: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    copy = tmp_path / "work"
    shutil.copytree(work, copy, ignore=shutil.ignore_patterns("preprocessed"))
    shutil.rmtree(_models(copy) / "fold_all")
    assert main(["predict", "-i", str(images), "-o", str(tmp_path / "out"), "-m", str(copy), "-f", "all"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "has no fold_all (it holds fold_0, fold_1)" in err
    assert f"`decathlete train {copy} -c 3d_fullres -f all`" in err
    # only fold_all trained: the default does not silently switch to it, it names the flag
    shutil.copytree(_models(work) / "fold_all", _models(copy) / "fold_all")
    for k in (0, 1):
        shutil.rmtree(_models(copy) / f"fold_{k}")
    with pytest.raises(FileNotFoundError, match=r"no cross-validation fold \(fold_<k>\), only fold_all .*`-f all`"):
        Predictor(copy, device="cpu")


def test_crossval_refuses_fold_all_with_the_reason(work: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["crossval", str(work), "-f", "all"]) == 1
    err = capsys.readouterr().err
    assert "fold 'all' was trained on every case and holds none out" in err and "-f every" in err
    with pytest.raises(ValueError, match="holds none out"):
        cross_validate(work, folds=[0, "all"])


def test_unfinished_folds_name_the_fold_and_the_fixes(work: Path, images: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    copy = tmp_path / "work"
    shutil.copytree(work, copy)
    (_models(copy) / "fold_1" / FINAL).unlink()  # still training: its latest checkpoint only
    assert main(["predict", "-i", str(images), "-o", str(tmp_path / "out"), "-m", str(copy), "-f", "1"]) == 1
    err = capsys.readouterr().err
    assert "fold 1's training did not finish" in err and "drop --resume" not in err
    assert f"`decathlete train {copy} -c 3d_fullres -f 1 --resume`" in err
    assert f"`--checkpoint {LATEST}`" in err
    with pytest.raises(FileNotFoundError, match=r"fold 1's training did not finish.*score only the finished folds: "
                                                r"`-f 0`"):
        cross_validate(copy, device="cpu")
    assert Predictor(copy, device="cpu").skipped_folds == ["fold_1"]  # the default leaves it out and says so
    for path in (_models(copy) / "fold_1").glob("*.pth"):  # a crash before the first checkpoint
        path.unlink()
    with pytest.raises(FileNotFoundError, match=r"fold 1's training did not finish \(.* holds no checkpoint: it "
                                                r"stopped before its first epoch ended\); train it again with "
                                                r"`decathlete train .* -f 1`"):
        Predictor(copy, folds=[1], device="cpu")
    summary = api.train(copy, "3d_fullres", 1, **QUICK)[0]  # that folder does not block a new run
    assert summary["folder"] == str(_models(copy) / "fold_1") and (_models(copy) / "fold_1" / FINAL).is_file()
    for k in (0, 1):
        (_models(copy) / f"fold_{k}" / FINAL).unlink()
    with pytest.raises(FileNotFoundError, match=r"no fold under .* holds checkpoint_final.pth: fold 0's .*fold 1's.*"
                                                r"or use the model trained on every case: `-f all`"):
        Predictor(copy, device="cpu")
    with pytest.raises(FileNotFoundError, match="fold 0's training did not finish") as refused:
        cross_validate(copy, device="cpu")
    assert "-f all" not in str(refused.value)  # crossval cannot use fold_all


def test_train_before_preprocess_names_the_fix_and_leaves_no_folder(work: Path, capsys: pytest.CaptureFixture
                                                                    ) -> None:  # fmt: skip
    assert main(["train", str(work), "-c", "2d", "--epochs", "1", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "fold 0 of '2d': 4 of its 4 cases are not preprocessed" in err
    assert f"run `decathlete preprocess {work} -c 2d` first" in err
    assert not (work / "models" / "2d").exists()


def test_a_refused_rerun_says_how_to_start_over(work: Path, capsys: pytest.CaptureFixture) -> None:
    folder = _models(work) / "fold_0"
    argv = ["train", str(work), "-f", "0", "--epochs", "1", "--iterations-per-epoch", "2", "--val-iterations", "1",
            "--device", "cpu"]
    assert main(argv) == 1
    assert (f"{folder} already holds a run; pass --resume to continue or extend it, or start over: delete {folder}, "
            "or train into another folder with -o DIR") in capsys.readouterr().err
    assert main([*argv, "--resume", "--seed", "3"]) == 1
    err = capsys.readouterr().err
    assert "seed 0 vs 3" in err and f"start over: delete {folder}, or train into another folder with -o DIR" in err
    assert main(["train", str(work), "-f", "1", "-o", str(work / "elsewhere"), "--resume", "--device", "cpu"]) == 1
    assert "--resume: " in (err := capsys.readouterr().err) and "train without --resume to start it" in err
