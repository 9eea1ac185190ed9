"""``nnUNetTrainer_decathleteBudget``: nnU-Net v2's default trainer stopped at a wall-clock budget (bench_accuracy).

Not part of decathlete and never imported by it: ``bench_accuracy`` copies this file into
``nnunetv2/training/nnUNetTrainer/`` of the reference environment for its run (see ``_nnunet_bench_trainer.py`` for
why that folder) and removes it afterwards.

Everything is ``nnUNetTrainer`` as shipped (plan, 1000 epochs x 250 iterations, poly schedule, loss, deep
supervision, augmentation, data-loader processes from ``nnUNet_n_proc_DA``) except:

* ``DECATHLETE_BENCH_MARKS`` (comma-separated seconds, ascending): when the time since the start of the first epoch
  passes a mark, after the training step that passed it, the trainer saves ``checkpoint_budget_<mark>.pth`` (the
  nnU-Net checkpoint format, loadable by ``nnUNetv2_predict -chk``); after the last mark it ends training. This is
  "killed at the budget, its state at that moment" — kinder to nnU-Net than a real kill, which would leave no
  checkpoint at all: the stock trainer writes ``checkpoint_latest`` every 50 epochs and one epoch takes over an hour
  on 2 CPU cores. Its learning rate at that point is still close to the initial 0.01 (poly over 1000 epochs): that
  is nnU-Net's default behaviour under a time limit, which is what the benchmark compares.
* The final sliding-window validation (``perform_actual_validation``) is skipped: the benchmark predicts the same
  validation cases itself with ``nnUNetv2_predict``.
"""

import json
import os
from time import time

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

CUDA = torch.device("cuda")


class _BudgetReached(Exception):
    pass


class nnUNetTrainer_decathleteBudget(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = CUDA):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._marks = [float(m) for m in os.environ["DECATHLETE_BENCH_MARKS"].split(",")]
        self._start = None
        self._saved = []

    def on_epoch_start(self):
        if self._start is None:
            self._start = time()
        super().on_epoch_start()

    def train_step(self, batch: dict) -> dict:
        result = super().train_step(batch)
        self._steps = getattr(self, "_steps", 0) + 1
        elapsed = time() - self._start
        while self._marks and elapsed >= self._marks[0]:
            mark = self._marks.pop(0)
            name = f"checkpoint_budget_{int(mark)}.pth"
            self.save_checkpoint(os.path.join(self.output_folder, name))
            self._saved.append({"mark_seconds": mark, "elapsed_seconds": elapsed, "iterations": self._steps,
                                "epoch": self.current_epoch, "checkpoint": name,
                                "lr": self.optimizer.param_groups[0]["lr"]})
        if not self._marks:
            raise _BudgetReached
        return result

    def run_training(self):
        try:
            super().run_training()
        except _BudgetReached:
            self.on_train_end()

    def perform_actual_validation(self, save_probabilities: bool = False):
        pass

    def on_train_end(self):
        super().on_train_end()
        if self.local_rank == 0:
            with open(os.path.join(self.output_folder, "bench_budget.json"), "w") as f:
                json.dump({"checkpoints": self._saved, "batch_size": self.batch_size,
                           "patch_size": [int(p) for p in self.configuration_manager.patch_size],
                           "torch_threads": torch.get_num_threads()}, f, indent=2)
