"""Every user mistake gets one clear message, never a traceback (issue 22, item 5): a table of each verb's common wrong
inputs, run through `decathlete.cli.main` in-process, checks the exit status (2 for argparse usage errors, 1 for the
others), that no traceback reaches the console and that the message names the offending file, case, field or value;
one real subprocess shows the console a user sees."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from decathlete import api
from decathlete.cli import main
from synthetic import tiny_workdir, write_json

pytestmark = pytest.mark.usefixtures("one_thread")
CUDA = torch.cuda.is_available()
WRONG_DEVICES = [("gpu", "unknown device 'gpu'"), ("tpu", "unknown device 'tpu'"), ("cuda:7", "--device cuda:7")]
if not CUDA:  # on a CUDA machine `--device cuda` is right, and the command would do its work
    WRONG_DEVICES.append(("cuda", "--device cuda was asked for but torch sees no CUDA device"))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _label_copies(raw: Path, folder: Path, change=lambda a: a, rename=lambda c: c) -> Path:
    """The references of synth_000 and synth_001, cropped or renamed as a wrong prediction might be."""
    folder.mkdir()
    for case in ("synth_000", "synth_001"):
        img = nib.load(raw / "labelsTr" / f"{case}.nii.gz")
        data = change(np.asarray(img.dataobj).astype(np.uint8))
        nib.save(nib.Nifti1Image(data, img.affine), folder / f"{rename(case)}.nii.gz")
    return folder


def _inputs(root: Path, raw: Path) -> dict[str, Path]:
    """Wrong inputs next to the right ones: not a dataset, a truncated image, odd prediction inputs and references,
    broken override, space and JSON files."""
    p = {"nosuch": root / "nosuch", "notds": root / "notds", "corrupt": root / "corrupt"}
    p["notds"].mkdir()
    (p["notds"] / "readme.txt").write_text("not a dataset")
    shutil.copytree(raw, p["corrupt"])
    _truncate(p["corrupt"] / "imagesTr" / "synth_001.nii.gz")
    for name in ("images", "mixed", "empty", "two"):
        (root / name).mkdir()
        p[name] = root / name
    for case in ("synth_000", "synth_001"):
        for name in ("images", "mixed"):
            shutil.copy(raw / "imagesTr" / f"{case}.nii.gz", root / name)
    (p["mixed"] / "broken.nii.gz").write_bytes(gzip.compress(b"not an image")[:20])
    img = nib.load(raw / "imagesTr" / "synth_000.nii.gz")
    data = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), img.affine), p["two"] / "two.nii.gz")
    p["refs"] = _label_copies(raw, root / "refs")
    p["shape_pred"] = _label_copies(raw, root / "shape_pred", lambda a: a[:-2])
    p["other_ids"] = _label_copies(raw, root / "other_ids", rename=lambda c: c.replace("synth", "other"))
    p["corrupt_pred"] = _label_copies(raw, root / "corrupt_pred")
    _truncate(p["corrupt_pred"] / "synth_001.nii.gz")
    p["bad_json"] = root / "bad.json"
    p["bad_json"].write_text("not json {")
    p["list_json"] = write_json(root / "list.json", [1, 2])
    p["bad_type"] = write_json(root / "bad_type.json", {"optimizer.lr": "abc"})
    p["space"] = write_json(root / "space.json", {"optimizer.lr": {"type": "float", "low": 1e-3, "high": 1e-1}})
    p["bad_space"] = write_json(root / "bad_space.json", {"optimizer.lrr": {"type": "float", "low": 0, "high": 1}})
    return p


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A planned, preprocessed work folder with fold 0 trained (1 epoch), the raw dataset, and the wrong inputs."""
    root = tmp_path_factory.mktemp("cli_errors")
    work = tiny_workdir(root, n_cases=4)
    api.train(work, "3d_fullres", 0, epochs=1, iterations_per_epoch=2, val_iterations=1, device="cpu",
              num_workers=0, progress=False)
    return {"work": str(work), "raw": str(root / "raw"), **{k: str(v) for k, v in _inputs(root, root / "raw").items()}}


def _devices(template: str) -> list[tuple[str, int, list[str]]]:
    return [(template.format(device=device), 1, [message]) for device, message in WRONG_DEVICES]


# (command line with {placeholders} for `paths` and {out} for a fresh folder, exit status, parts of the message)
CASES: list[tuple[str, int, list[str]]] = [
    ("validate {nosuch}", 1, ["no dataset.json", "nosuch"]),
    ("validate {notds}", 1, ["no dataset.json", "notds"]),
    ("validate {corrupt}", 1, ["[synth_001]", "imagesTr/synth_001.nii.gz cannot be read", "re-export"]),
    ("plan {nosuch} -o {out}", 1, ["no dataset.json", "nosuch"]),
    ("plan {corrupt} -o {out}", 1, ["[synth_001]", "imagesTr/synth_001.nii.gz cannot be read"]),
    ("plan {raw} -o {out} --recipe nosuch", 1, ["no recipe named 'nosuch'", "known: default"]),
    ("plan {raw} -o {out} --planner nosuch", 1, ["no planner named 'nosuch'"]),
    ("plan {raw} -o {out} --time-budget 5x", 1, ["cannot read the duration '5x'"]),
    ("plan {raw} -o {out} --gpu-memory -1", 1, ["--gpu-memory must be a positive number of GiB, got -1"]),
    ("plan {raw} -o {out} --set planning.gpu_memory_gb=0", 1, ["planning.gpu_memory_gb", "got 0"]),
    ("plan {raw} -o {out} --set bogus.field=1", 1, ["unknown recipe setting 'bogus.field'"]),
    ("plan {raw} -o {out} --set lr", 1, ["--set expects path=value", "'lr'"]),
    ("plan {raw} -o {out} --set-file {nosuch}.json", 2, ["--set-file", "nosuch.json"]),
    ("plan {raw} -o {out} --set-file {bad_json}", 2, ["cannot read the override file", "bad.json"]),
    ("plan {raw} -o {out} --set-file {list_json}", 2, ["list.json", "JSON object of dotted recipe fields"]),
    *_devices("plan {{raw}} -o {{out}} --time-budget 1m --device {device}"),
    ("preprocess {nosuch}", 1, ["nosuch/plans.json not found", "decathlete plan"]),
    ("preprocess {work} -c nosuch", 1, ["configuration 'nosuch' is not in the plans"]),
    ("patches {nosuch} --train 1 --val 1", 1, ["nosuch/plans.json not found"]),
    ("patches {work} --train 0 --val 1", 1, ["at least one patch", "train 0"]),
    ("patches {work} --train 1 --val 1 -c nosuch", 1, ["configuration 'nosuch'"]),
    ("train {nosuch}", 1, ["nosuch/plans.json not found"]),
    ("train {work} -c nosuch -o {out}", 1, ["configuration 'nosuch' is not in the plans"]),
    ("train {work} -f 9 -o {out}", 1, ["fold 9 does not exist"]),
    ("train {work} --recipe nosuch -o {out}", 1, ["no recipe named 'nosuch'"]),
    ("train {work} --time-budget abc -o {out}", 1, ["cannot read the duration 'abc'"]),
    ("train {work} -o {out} --set optimizer.lr=abc", 1, ["optimizer.lr: 'sgd' takes float for lr, got \"abc\""]),
    ("train {work} -o {out} --set-file {bad_type}", 1, ["optimizer.lr: 'sgd' takes float for lr, got \"abc\""]),
    ("train {work} -o {out} --set optimizer.nesterov=1", 1, ["optimizer.nesterov: 'sgd' takes bool", "got 1"]),
    ("train {work} -o {out} --set schedule.power=abc", 1, ["schedule.power: 'poly' takes float"]),
    ("train {work} -o {out} --set sampler.oversample_foreground=x", 1, ["sampler.oversample_foreground", '"x"']),
    ("train {work} -o {out} --set loss.include_background=maybe", 1, ["loss.include_background", "bool", "maybe"]),
    ("train {work} -o {out} --set epochs=1.5", 1, ["epochs: expected int, got 1.5"]),
    ("train {work} -o {out} --set augment.p_rotation=2", 1, ["augment.p_rotation is a probability", "got 2"]),
    ("train {work} -o {out} --set augment.p_rotation=abc", 1, ["augment.p_rotation", "abc"]),
    ("train {work} -o {out} --set bogus=1", 1, ["unknown recipe setting 'bogus'"]),
    ("train {work} -o {out} --set loss.name=nosuch", 1, ["no loss named 'nosuch'"]),
    ("train {work} -o {out} --epochs 0", 1, ["--epochs must be at least 1, got 0"]),
    ("train {work} -o {out} --iterations-per-epoch 0", 1, ["--iterations-per-epoch must be at least 1, got 0"]),
    ("train {work} -o {out} --val-iterations 0", 1, ["--val-iterations must be at least 1, got 0"]),
    ("train {work} -o {out} -j -1", 1, ["--workers must be at least 0, got -1"]),
    *_devices("train {{work}} -o {{out}} --device {device}"),
    ("predict -i {nosuch} -o {out} -m {work}", 1, ["input folder", "nosuch does not exist"]),
    ("predict -i {images} -o {out} -m {nosuch}", 1, ["nosuch holds no trained '3d_fullres' model"]),
    ("predict -i {empty} -o {out} -m {work}", 1, ["no images", "empty"]),
    ("predict -i {images} -o {images} -m {work}", 1, ["is the input folder"]),
    ("predict -i {images} -o {images}/sub -m {work}", 1, ["lies inside the input folder"]),
    ("predict -i {two} -o {out} -m {work} -f 0", 1, ["1 of 1 cases failed", "two: ValueError: the image has 2 "
                                                     "channel(s), the plan normalises 1"]),
    ("predict -i {images} -o {out} -m {work} -f 7", 1, ["fold_7"]),
    ("predict -i {images} -o {out} -m {work} --step 0", 1, ["--step must lie in (0, 1]", "got 0.0"]),
    ("predict -i {images} -o {out} -m {work} --step 1.5", 1, ["--step must lie in (0, 1]", "got 1.5"]),
    ("predict -i {images} -o {out} -m {work} --checkpoint nosuch.pth", 1, ["holds nosuch.pth"]),
    ("predict -i {images} -o {out} -m {work} -f 0 --checkpoint nosuch.pth", 1,
     ["fold_0 holds no nosuch.pth (it holds checkpoint_best.pth, checkpoint_final.pth"]),
    ("predict -i {images} -o {out} -m {work} --recipe nosuch", 1, ["no recipe 'nosuch' was trained", "it holds tiny"]),
    ("predict -i {images} -o {out} -m {work} -c nosuch", 1, ["no trained 'nosuch' model"]),
    ("predict -i {images} -o {out} -m {work} --set optimizer.lr=1", 1, ["only change inference.*", "optimizer.lr"]),
    ("predict -i {images} -o {out} -m {work} --set inference.step=abc", 1, ["inference.step", "abc"]),
    *_devices("predict -i {{images}} -o {{out}} -m {{work}} --device {device}"),
    ("predict -i {images} -o {out} -m {work} -c 3d_fullres 3d_fullres", 1, ["configuration 3d_fullres given twice"]),
    ("predict -i {images} -o {out} -m {work} -c 3d_fullres 2d", 1, ["no trained '2d' model"]),
    ("predict -i {images} -o {out} -m {work}/models/3d_fullres/tiny -c 3d_fullres 2d", 1,
     ["is one configuration's model folder", "needs the work folder as -m"]),
    ("crossval {nosuch}", 1, ["nosuch holds no trained '3d_fullres' model"]),
    ("crossval {work} -f 3", 1, ["fold_3"]),
    ("crossval {work} --checkpoint nosuch.pth", 1, ["fold_0 holds no nosuch.pth", "--checkpoint"]),
    ("crossval {work} --recipe nosuch", 1, ["no recipe 'nosuch' was trained"]),
    *_devices("crossval {{work}} --device {device}"),
    ("crossval {work} -c 3d_fullres 2d", 2, ["unrecognized arguments: 2d"]),
    ("best {nosuch}", 1, ["nosuch is no work folder", "decathlete plan -o"]),
    ("best {work}", 1, ["was cross-validated", "decathlete crossval", "--save-probabilities"]),
    ("best {work} -c 2d", 1, ["2d of", "was not cross-validated", "-c 2d --save-probabilities"]),
    ("best {work} --recipe nosuch", 1, ["with recipe nosuch", "decathlete crossval"]),
    ("best {work} -j 0", 2, ["workers must be >= 1"]),
    ("evaluate {nosuch} {refs}", 1, ["prediction folder", "nosuch does not exist"]),
    ("evaluate {refs} {nosuch}", 1, ["reference folder", "nosuch does not exist"]),
    ("evaluate {shape_pred} {refs} -o {out}/s.json", 1, ["case 'synth_000'", "not on the reference grid", "shape"]),
    ("evaluate {other_ids} {refs} -o {out}/s.json", 1, ["have no prediction", "other_000"]),
    ("evaluate {other_ids} {refs} -o {out}/s.json --only-predicted", 1, ["no prediction in", "has a reference"]),
    ("evaluate {corrupt_pred} {refs} -o {out}/s.json", 1, ["synth_001.nii.gz"]),
    ("evaluate {refs} {refs} -o {out}/s.json --labels {nosuch}", 1, ["--labels", "nosuch: no dataset.json"]),
    ("evaluate {refs} {refs} -o {out}/s.json --labels {notds}", 1, ["--labels", "notds: no dataset.json"]),
    ("evaluate {refs} {refs} -o {out}/s.json --nsd-tolerance abc", 1, ["--nsd-tolerance", "'abc'"]),
    ("evaluate {refs} {refs} -o {out}/s.json --labels {raw} --nsd-tolerance nosuch=2", 1, ["label 'nosuch'"]),
    ("search {work} --space {nosuch}.json", 1, ["cannot read the search space", "nosuch.json"]),
    ("search {work} --space {bad_json}", 1, ["cannot read the search space", "bad.json"]),
    ("search {work} --space {list_json}", 1, ["list.json", "JSON object"]),
    ("search {work} --space {bad_space}", 1, ["optimizer.lrr"]),
    ("search {notds} --space {space}", 1, ["notds has no plans.json"]),
    ("search {work} --space {space} --trial-budget abc", 1, ["cannot read the duration 'abc'"]),
    ("search {work} --space {space} --sampler nosuch", 1, ["unknown sampler 'nosuch'"]),
    ("search {work} --space {space} --trials 0", 1, ["--trials must be at least 1, got 0"]),
    ("search {work} --space {space} --set optimizer.lr=abc", 1, ["optimizer.lr: 'sgd' takes float"]),
    *_devices("search {{work}} --space {{space}} --device {device}"),
    ("list nosuch", 2, ["invalid choice: 'nosuch'"]),
    ("demo --data {nosuch} -o {out}", 1, ["no dataset.json", "nosuch"]),
    ("demo --data {corrupt} -o {out}", 1, ["decathlete demo: 1 problem found", "synth_001"]),
    *_devices("demo -o {{out}} --device {device}"),
    ("--plugin nosuch_pkg list", 1, ["cannot import plugin 'nosuch_pkg'", "installed"]),
]


@pytest.mark.parametrize(("command", "status", "parts"), CASES, ids=[c[0] for c in CASES])
def test_a_wrong_input_gets_one_clear_message(command: str, status: int, parts: list[str], paths: dict[str, str],
                                              tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = command.format(**paths, out=tmp_path / "out").split()
    try:
        code = main(argv)
    except SystemExit as err:  # argparse's usage errors
        code = err.code
    out, err = capsys.readouterr()
    assert code == status, err
    assert "Traceback" not in out + err
    for part in parts:
        assert part in err


def test_predict_writes_the_good_cases_and_names_the_broken_one(paths: dict[str, str], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    assert main(["predict", "-i", paths["mixed"], "-o", str(tmp_path), "-m", paths["work"], "-f", "0"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"decathlete predict: 1 of 3 cases failed (the others are in {tmp_path}):\n  broken: ImageReadError" in err
    assert sorted(p.name for p in tmp_path.glob("*.nii.gz")) == ["synth_000.nii.gz", "synth_001.nii.gz"]


def test_the_console_shows_one_line_not_a_traceback(paths: dict[str, str], tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "decathlete.cli", "train", paths["work"], "-o", str(tmp_path),
                          "--set", "optimizer.lr=abc"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 1
    assert run.stderr == "decathlete train: error: optimizer.lr: 'sgd' takes float for lr, got \"abc\"\n"


def test_the_demo_refuses_a_wrong_device_before_writing_its_dataset(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    assert main(["demo", "-o", str(tmp_path / "demo"), "--device", "tpu"]) == 1
    assert "decathlete demo: error: unknown device 'tpu'" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_a_cuda_index_torch_does_not_see_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from decathlete.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"--device cuda:7: torch sees 2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:7")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
