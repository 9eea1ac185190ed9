"""``progress.png``: training and validation loss, pseudo-Dice (raw and EMA) and learning rate per epoch;
``confusion_matrix.png``: the last validation's confusion matrix."""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from decathlete.io.atomic import write_atomic  # noqa: E402

MARKED_EPOCHS = 50  # up to this many epochs every point gets a marker; beyond, the lines alone stay readable


def plot_progress(history: dict[str, list[float]], path: str | Path) -> None:
    """Draw the curves of ``history`` (lists indexed by epoch) into ``path``, atomically."""
    epochs = range(len(history["train_loss"]))
    # A line through one point draws nothing: a one-epoch run (the quick demo) would show empty axes without markers.
    dots = {"marker": "o", "markersize": 4} if len(epochs) <= MARKED_EPOCHS else {}
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=[3, 1])
    ax_loss.plot(epochs, history["train_loss"], label="train loss", color="tab:blue", **dots)
    ax_loss.plot(epochs, history["val_loss"], label="val loss", color="tab:red", **dots)
    ax_loss.set_ylabel("loss")
    ax_dice = ax_loss.twinx()
    ax_dice.plot(epochs, history["pseudo_dice"], ":", label="pseudo-Dice", color="tab:green", **dots)
    ax_dice.plot(epochs, history["ema_dice"], label="pseudo-Dice (EMA)", color="tab:green", **dots)
    ax_dice.set_ylabel("Dice")
    ax_dice.set_ylim(0, 1)
    lines = ax_loss.get_legend_handles_labels()
    more = ax_dice.get_legend_handles_labels()
    ax_loss.legend(lines[0] + more[0], lines[1] + more[1], loc="center right")
    ax_lr.plot(epochs, history["lr"], color="black", **dots)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("epoch")
    ax_lr.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs, not -0.04 ... 0.04
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def plot_confusion(matrix: list[list[int]], path: str | Path, epoch: int) -> None:
    """The validation confusion matrix as a figure, each row normalised to the reference class's voxels (the counts
    written in the cells), atomically."""
    counts = np.asarray(matrix, dtype=float)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    k = len(counts)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * k, 1.0 + 0.8 * k))
    ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, f"{share[i, j]:.2f}\n{int(n)}", ha="center", va="center", fontsize=7,
                color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("reference class")
    ax.set_title(f"validation, epoch {epoch}")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


class TrainingLog:
    """Print a line and append it to ``training_log.txt`` (a no-op unless ``enabled``: rank 0 only)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        tqdm.write(line)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


