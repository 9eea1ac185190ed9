"""``progress.png``: training and validation loss, pseudo-Dice (raw and EMA) and learning rate per epoch."""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from decathlete.io.atomic import write_atomic  # noqa: E402


def plot_progress(history: dict[str, list[float]], path: str | Path) -> None:
    """Draw the curves of ``history`` (lists indexed by epoch) into ``path``, atomically."""
    epochs = range(len(history["train_loss"]))
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=[3, 1])
    ax_loss.plot(epochs, history["train_loss"], label="train loss", color="tab:blue")
    ax_loss.plot(epochs, history["val_loss"], label="val loss", color="tab:red")
    ax_loss.set_ylabel("loss")
    ax_dice = ax_loss.twinx()
    ax_dice.plot(epochs, history["pseudo_dice"], ":", label="pseudo-Dice", color="tab:green")
    ax_dice.plot(epochs, history["ema_dice"], label="pseudo-Dice (EMA)", color="tab:green")
    ax_dice.set_ylabel("Dice")
    ax_dice.set_ylim(0, 1)
    lines = ax_loss.get_legend_handles_labels()
    more = ax_dice.get_legend_handles_labels()
    ax_loss.legend(lines[0] + more[0], lines[1] + more[1], loc="center right")
    ax_lr.plot(epochs, history["lr"], color="black")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("epoch")
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


