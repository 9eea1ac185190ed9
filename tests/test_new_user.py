"""What a new user tripped over (issue 22), reproduced: predictions of another model kept as if they were this one's,
``_0000`` + ``_0001`` files of a one-channel model read as two cases, tracebacks instead of one clear line, and
``evaluate`` refusing predictions of only some reference cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from decathlete import api
from decathlete.cli import main
from decathlete.devices import resolve_device
from decathlete.evaluate import evaluate_folder
from decathlete.infer.cases import discover_cases
from decathlete.infer.predictor import Predictor
from decathlete.infer.provenance import PROVENANCE_FILE
from synthetic import tiny_workdir

pytestmark = pytest.mark.usefixtures("one_thread")
QUICK = {"epochs": 1, "iterations_per_epoch": 2, "val_iterations": 1, "device": "cpu", "num_workers": 0,
         "progress": False}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tiny_workdir(tmp_path_factory.mktemp("new_user"), n_cases=6)
    for fold in (0, 1):
        api.train(work, "3d_fullres", fold, **QUICK)
    return work


@pytest.fixture
def images(work: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for case in ("synth_000", "synth_001"):
        shutil.copy(work.parent / "raw" / "imagesTr" / f"{case}.nii.gz", folder)
    return folder


def test_predictions_of_another_model_are_refused_not_kept(work: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = Predictor(work, "3d_fullres", [0], device="cpu").predict_folder(images, out, progress=False)
    assert first["n_done"] == 2
    again = Predictor(work, "3d_fullres", [0], device="cpu").predict_folder(images, out, progress=False)
    assert again["n_skipped"] == 2  # the same model and settings: finished, skipped
    for other in ({"folds": [1]}, {"folds": [0], "tta": False}):
        with pytest.raises(FileExistsError, match=r"holds predictions of 2 of these cases .*another model or "
                                                  r"settings .*-o.*--overwrite"):
            Predictor(work, "3d_fullres", device="cpu", **other).predict_folder(images, out, progress=False)
    replaced = Predictor(work, "3d_fullres", [1], device="cpu").predict_folder(images, out, overwrite=True,
                                                                                progress=False)
    assert replaced["n_done"] == 2
    record = json.loads((out / PROVENANCE_FILE).read_text())
    [key] = set(record["cases"].values())
    assert record["runs"][key]["folds"] == ["fold_1"]
    # a kill between the entry and the label map: the entry alone means "not done", the case is predicted again
    (out / "synth_001.nii.gz").unlink()
    resumed = Predictor(work, "3d_fullres", [1], device="cpu").predict_folder(images, out, progress=False)
    assert resumed["n_done"] == 1 and resumed["n_skipped"] == 1
    # a label map nobody recorded (an older run, a file put there): refused too
    stray = tmp_path / "stray"
    stray.mkdir()
    shutil.copy(out / "synth_000.nii.gz", stray)
    with pytest.raises(FileExistsError, match="unknown run"):
        Predictor(work, "3d_fullres", [1], device="cpu").predict_folder(images, stray, progress=False)


def test_channel_files_are_grouped_by_the_model_s_channel_count(tmp_path: Path) -> None:
    image = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    two = tmp_path / "two"
    two.mkdir()
    for name in ("case_0000", "case_0001"):
        nib.save(image, two / f"{name}.nii.gz")
    with pytest.raises(ValueError, match=r"takes 1 channel .* case 'case' has _0000, _0001"):
        discover_cases(two, 1)
    assert list(discover_cases(two, 2)) == ["case"]
    numbered = tmp_path / "numbered"  # MSD-style case numbers, not channels: they do not start at _0000
    numbered.mkdir()
    for name in ("liver_0001", "liver_0002"):
        nib.save(image, numbered / f"{name}.nii.gz")
    assert list(discover_cases(numbered, 1)) == ["liver_0001", "liver_0002"]
    with pytest.raises(ValueError, match=r"takes 2 channels .* case 'liver' has _0001, _0002"):
        discover_cases(numbered, 2)


def test_user_mistakes_in_predict_get_one_line_not_a_traceback(work: Path, images: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match="unknown device 'gpu': use cpu, cuda, cuda:N or auto"):
        resolve_device("gpu")
    assert main(["predict", "-i", str(images), "-o", str(tmp_path / "gpu"), "-m", str(work), "-f", "0",
                 "--device", "gpu"]) == 1
    (images / "broken.nii.gz").write_text("not an image")
    img = nib.load(images / "synth_000.nii.gz")
    data = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), img.affine), images / "two_channels.nii.gz")
    capsys.readouterr()
    assert main(["predict", "-i", str(images), "-o", str(tmp_path / "out"), "-m", str(work), "-f", "0",
                 "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "2 of 4 cases failed" in err
    assert "broken: ImageReadError" in err and "not a gzip file" in err
    assert "two_channels: ValueError: the image has 2 channel(s), the plan normalises 1" in err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["synth_000.nii.gz", "synth_001.nii.gz"]


def test_evaluate_scores_only_the_predicted_cases_when_asked(work: Path, images: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    Predictor(work, "3d_fullres", [0], device="cpu").predict_folder(images, out, progress=False)
    refs = work.parent / "raw" / "labelsTr"
    with pytest.raises(ValueError, match=r"4 reference case\(s\) have no prediction.*--only-predicted"):
        evaluate_folder(out, refs)
    summary = evaluate_folder(out, refs, only_predicted=True)
    assert [c["case"] for c in summary["per_case"]] == ["synth_000", "synth_001"]
    assert summary["left_out"]["n_left_out"] == 4 and summary["left_out"]["n_reference_cases"] == 6
    assert summary["left_out"]["cases"] == ["synth_002", "synth_003", "synth_004", "synth_005"]
    capsys.readouterr()
    assert main(["evaluate", str(out), str(refs), "--only-predicted", "-o", str(tmp_path / "s.json")]) == 0
    assert "scored 2 of 6 reference cases; 4 without a prediction left out: synth_002" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["left_out"]["n_scored"] == 2
