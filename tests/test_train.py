"""Training: it learns, it resumes exactly after SIGKILL, it extends, it refuses mismatched resumes, DDP works."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from decathlete import api
from decathlete.io.checkpoint import FINAL, LATEST, load_checkpoint
from decathlete.synthetic import make_synthetic_dataset
from decathlete.train.run import model_folder
from decathlete.train.trainer import TrainOptions, train

SHAPE = (16, 40, 40)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic data planned with the tiny recipe and preprocessed once for the whole module."""
    root = tmp_path_factory.mktemp("train")
    data = make_synthetic_dataset(root / "raw", n_cases=8, shape=SHAPE)
    api.plan(data, root / "work", recipe="tiny", workers=1, progress=False)
    api.preprocess(root / "work", ["3d_fullres"], workers=1, progress=False)
    return root / "work"


pytestmark = pytest.mark.usefixtures("one_thread")


def _fresh(workdir: Path, tmp_path: Path, name: str) -> Path:
    copy = tmp_path / name
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("models"))
    return copy


def test_training_learns_the_organ(workdir: Path, tmp_path: Path) -> None:
    work = _fresh(workdir, tmp_path, "learn")
    summary = train(work, TrainOptions("3d_fullres", 0, epochs=3, iterations_per_epoch=10, val_iterations=4,
                                       device="cpu", num_workers=0, progress=False))
    folder = Path(summary["folder"])
    state = load_checkpoint(folder / FINAL)["state"]
    organ, _lesion = state["history"]["pseudo_dice_per_class"][-1]
    # The organ fills ~5% of the image: chance-level Dice is ~0.1; a working loop is far above it after 30 steps.
    assert organ > 0.7, state["history"]
    assert state["history"]["train_loss"][-1] < state["history"]["train_loss"][0]
    for name in ("checkpoint_best.pth", FINAL, LATEST, "progress.png", "training_log.txt", "plans.json",
                 "recipe.json", "run.json", "confusion_matrix.png"):
        assert (folder / name).is_file(), name
    confusion = np.asarray(state["history"]["confusion"][-1])  # rows reference, columns predicted
    tp, fp, fn = confusion[1, 1], confusion[:, 1].sum() - confusion[1, 1], confusion[1].sum() - confusion[1, 1]
    assert 2 * tp / (2 * tp + fp + fn) == pytest.approx(organ, abs=1e-6)  # the same validation voxels as the Dice
    assert "validation confusion" in (folder / "training_log.txt").read_text()
    run = json.loads((folder / "run.json").read_text())
    assert run["settings"]["seed"] == 0 and run["versions"]["torch"] == torch.__version__
    assert json.loads((folder / "recipe.json").read_text())["epochs"] == 3


def test_validation_bar_counts_the_validation_batches(workdir: Path, tmp_path: Path, bars,
                                                     capsys: pytest.CaptureFixture) -> None:
    made, work = bars("decathlete.train.validation"), _fresh(workdir, tmp_path, "bars")
    options = {"epochs": 2, "iterations_per_epoch": 1, "val_iterations": 3, "device": "cpu", "num_workers": 0}
    train(work, TrainOptions("3d_fullres", 0, model_dir=tmp_path / "shown", **options))
    assert [(bar.desc, bar.n, bar.total, bar.unit, bar.leave) for bar in made] == [
        ("validation 0", 3, 3, "batch", False), ("validation 1", 3, 3, "batch", False)]
    assert "validation 1: 100%" in capsys.readouterr().err
    made.clear()
    train(work, TrainOptions("3d_fullres", 0, model_dir=tmp_path / "quiet", progress=False, **options))
    assert [bar.disable for bar in made] == [True, True] and capsys.readouterr().err == ""


def test_a_one_epoch_training_curve_shows_its_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.colors
    import matplotlib.image

    from decathlete.train import progress

    figures: list = []
    monkeypatch.setattr(progress.plt, "close", figures.append)  # keep the figure to look at its lines
    history = {"train_loss": [0.9], "val_loss": [0.6], "pseudo_dice": [0.3], "ema_dice": [0.3], "lr": [1e-2]}
    progress.plot_progress(history, tmp_path / "progress.png")
    monkeypatch.undo()
    [fig] = figures
    lines = [line for ax in fig.axes for line in ax.get_lines()]
    assert len(lines) == 5 and all(line.get_marker() == "o" and len(line.get_xdata()) == 1 for line in lines)
    # In the saved PNG (90 dpi, rows from the top) the val-loss point is a red dot, not the white of a blank plot.
    x, y = fig.axes[0].transData.transform((0, 0.6)) * 90 / fig.dpi
    png = matplotlib.image.imread(tmp_path / "progress.png")[..., :3]
    row, col = int(round(png.shape[0] - y)), int(round(x))
    around = png[row - 1 : row + 2, col - 1 : col + 2].reshape(-1, 3)
    assert np.abs(around - matplotlib.colors.to_rgb("tab:red")).max(axis=1).min() < 0.1
    progress.plt.close(fig)


def test_refuses_to_overwrite_and_mismatched_resume(workdir: Path, tmp_path: Path) -> None:
    work = _fresh(workdir, tmp_path, "refuse")
    kwargs = {"iterations_per_epoch": 2, "val_iterations": 1, "device": "cpu", "num_workers": 0, "progress": False}
    train(work, TrainOptions("3d_fullres", 1, epochs=1, **kwargs))
    with pytest.raises(FileExistsError, match="--resume"):
        train(work, TrainOptions("3d_fullres", 1, epochs=1, **kwargs))
    with pytest.raises(ValueError, match="recipe or seed differs"):
        train(work, TrainOptions("3d_fullres", 1, epochs=2, resume=True, seed=1, **kwargs))
    extended = train(work, TrainOptions("3d_fullres", 1, epochs=2, resume=True, **kwargs))  # a finished run grows
    assert extended["epochs"] == 2 and extended["steps"] == 4


def test_extending_a_finished_run_does_not_warm_the_learning_rate_up(workdir: Path, tmp_path: Path) -> None:
    work = _fresh(workdir, tmp_path, "extend")
    kwargs = {"iterations_per_epoch": 4, "val_iterations": 1, "device": "cpu", "num_workers": 0, "progress": False}
    train(work, TrainOptions("3d_fullres", 0, epochs=1, **kwargs))
    summary = train(work, TrainOptions("3d_fullres", 0, epochs=3, resume=True, **kwargs))
    lrs = load_checkpoint(Path(summary["folder"]) / FINAL)["state"]["history"]["lr"]  # each epoch's last rate
    # poly over 4 steps ended at 0.01 * (1/4)^0.9; re-evaluated over 12 steps, step 4 would be 0.01 * (2/3)^0.9
    assert lrs[0] == pytest.approx(0.01 * 0.25**0.9)
    assert 0 < lrs[2] < lrs[1] < lrs[0]
    assert "no warm-up" in (Path(summary["folder"]) / "training_log.txt").read_text()


def _cli(work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "decathlete.cli", "train", str(work), "-c", "3d_fullres", "-f", "0", "--epochs",
            "3", "--iterations-per-epoch", "4", "--val-iterations", "2", "--device", "cpu", "-j", "0", *extra]


def test_sigkill_mid_epoch_then_resume_gives_identical_weights(workdir: Path, tmp_path: Path) -> None:
    straight = _fresh(workdir, tmp_path, "straight")
    subprocess.run(_cli(straight), env=ENV, check=True, capture_output=True)
    killed = _fresh(workdir, tmp_path, "killed")
    folder = model_folder(killed, "3d_fullres", "tiny", 0)
    proc = subprocess.Popen(_cli(killed), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (folder / LATEST).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted = load_checkpoint(folder / LATEST)["state"]
    assert 1 <= interrupted["epoch"] < 3
    subprocess.run(_cli(killed, "--resume"), env=ENV, check=True, capture_output=True)
    a = load_checkpoint(model_folder(straight, "3d_fullres", "tiny", 0) / FINAL)
    b = load_checkpoint(folder / FINAL)
    assert a["state"]["step"] == b["state"]["step"] == 12
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert a["state"]["history"]["train_loss"] == b["state"]["history"]["train_loss"]
    assert not list(folder.glob(".tmp-*"))


def test_ddp_two_cpu_processes(workdir: Path, tmp_path: Path) -> None:
    work = _fresh(workdir, tmp_path, "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "decathlete.cli", "train", str(work), "-c", "3d_fullres", "-f", "0", "--epochs", "2",
           "--iterations-per-epoch", "2", "--val-iterations", "1", "--device", "cpu", "-j", "0"]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, errors="replace", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = model_folder(work, "3d_fullres", "tiny", 0)
    log = (folder / "training_log.txt").read_text()
    assert "world 2" in log and log.count("epoch 1:") == 1  # rank 0 alone writes
    saved = load_checkpoint(folder / FINAL)
    assert saved["state"]["step"] == 4
