"""What the command line prints (issue 22, items 8 and 10): a short human summary per verb, JSON only with
``--json`` (then alone on stdout), spacings people can read, and every verb a typed function of `decathlete.api`
that the CLI calls."""

from __future__ import annotations

import inspect
import json
import shutil
import typing
from pathlib import Path

import pytest

from decathlete import api
from decathlete.cli import _fmt, main
from synthetic import tiny_workdir

pytestmark = pytest.mark.usefixtures("one_thread")
QUICK = ["--epochs", "1", "--iterations-per-epoch", "2", "--val-iterations", "1", "--device", "cpu", "-j", "0"]
VERBS = ("validate", "plan", "preprocess", "patches", "train", "predict", "crossval", "evaluate", "search", "demo")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_workdir(tmp_path_factory.mktemp("console"), n_cases=4)


def test_spacings_and_shapes_read_as_numbers() -> None:
    assert _fmt([2.976796269416809, 1.2000000476837158, 1.2000000476837158]) == "2.977x1.2x1.2"
    assert _fmt([20, 64, 64]) == "20x64x64"
    assert _fmt([[1, 2, 2], [2, 2, 2]]) == "1x2x2 2x2x2"
    assert _fmt([0.7, 36.0]) == "0.7x36"


def test_preprocess_prints_a_summary_and_json_only_when_asked(work: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["preprocess", str(work), "-j", "1"]) == 0  # everything was preprocessed by the fixture
    out = capsys.readouterr().out
    assert out == f"3d_fullres: 0 of 4 cases preprocessed, 4 already done in {out.split(' in ')[1].split()[0]} s " \
                  f"-> {work / 'preprocessed' / '3d_fullres'}\n"
    assert main(["preprocess", str(work), "-j", "1", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout is exactly one JSON document
    assert result["3d_fullres"]["n_skipped"] == 4 and result["3d_fullres"]["n_done"] == 0
    assert "4 already done" in captured.err  # the human summary moved to stderr


def test_train_prints_its_summary_once_and_json_alone(work: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    assert main(["train", str(work), *QUICK, "-o", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "{" not in out  # no JSON dump
    [done] = [line for line in out.splitlines() if " done" in line]
    assert "1 epochs, 2 steps in" in done and done.endswith(str(tmp_path / "a" / "fold_0" / "checkpoint_final.pth"))
    assert main(["train", str(work), *QUICK, "-o", str(tmp_path / "b"), "--json"]) == 0
    captured = capsys.readouterr()
    [summary] = json.loads(captured.out)
    assert summary["folder"] == str(tmp_path / "b" / "fold_0") and summary["steps"] == 2
    assert " done: 1 epochs, 2 steps" in captured.err  # the training log went to stderr


def test_predict_names_the_folds_it_used(work: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    api.train(work, "3d_fullres", 0, epochs=1, iterations_per_epoch=2, val_iterations=1, device="cpu",
              num_workers=0, progress=False)
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(work.parent / "raw" / "imagesTr" / "synth_000.nii.gz", images)
    out = tmp_path / "out"
    args = ["predict", "-i", str(images), "-o", str(out), "-m", str(work), "--device", "cpu"]
    capsys.readouterr()
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    model = work / "models" / "3d_fullres" / "tiny"
    assert lines[0].startswith("predicted 1 of 1 cases in ") and lines[0].endswith(f"s with fold_0 of {model} -> {out}")
    assert lines[1].startswith("efficiency: 1 case(s)")
    assert main([*args, "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert (summary["n_skipped"], summary["folds"], summary["model"]) == (1, ["fold_0"], str(model))
    assert "1 cases were already predicted by this model" in captured.err


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_is_a_typed_documented_function(verb: str) -> None:
    function = getattr(api, verb)
    hints = typing.get_type_hints(function)
    parameters = inspect.signature(function).parameters
    assert "return" in hints and set(parameters) <= set(hints), f"api.{verb} lacks type hints"
    assert all(p.kind is not p.VAR_KEYWORD for p in parameters.values()), f"api.{verb} takes opaque **kwargs"
    assert function.__doc__ and len(function.__doc__) > 80


def test_the_cli_calls_the_api(work: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    calls: dict[str, tuple] = {}

    def fake(name: str, result: object):
        def record(*args: object, **kwargs: object) -> object:
            calls[name] = (args, kwargs)
            return result
        return record

    predicted = {"n_cases": 0, "n_done": 0, "n_skipped": 0, "seconds": 0.0, "model": "m", "folds": ["fold_0"],
                 "skipped_folds": [], "efficiency": None}
    crossvalidated = {"folds": [0], "n_cases": 0, "mean": {}, "postprocessing": {
        "foreground": False, "per_class": {}, "mean_dice_before": 0.5, "mean_dice_after": 0.5}, "folder": "f"}
    monkeypatch.setattr(api, "predict", fake("predict", predicted))
    monkeypatch.setattr(api, "evaluate", fake("evaluate", {"mean": {}}))
    monkeypatch.setattr(api, "crossval", fake("crossval", crossvalidated))
    assert main(["predict", "-i", "in", "-o", "out", "-m", "m", "-f", "0", "--no-tta", "--step", "0.25",
                 "--json"]) == 0
    assert calls["predict"] == (("in", "out", "m", "3d_fullres", [0]), {
        "checkpoint": "checkpoint_final.pth", "recipe": None, "overrides": [], "tta": False, "step": 0.25,
        "whole_volume": True, "postprocess": True, "save_probabilities": False, "overwrite": False, "device": "auto"})
    assert main(["evaluate", "p", "r", "--nsd-tolerance", "2", "--only-predicted", "--json"]) == 0
    assert calls["evaluate"] == (("p", "r", None, ["2"]), {"output": None, "workers": 1, "only_predicted": True})
    assert main(["crossval", str(work), "-f", "0", "--json"]) == 0
    assert calls["crossval"][0] == (str(work), "3d_fullres", [0])
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [
        predicted, {"mean": {}}, crossvalidated]
