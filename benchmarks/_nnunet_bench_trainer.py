"""``nnUNetTrainer_decathleteBench``: nnU-Net v2's default trainer, one short epoch, timed (``bench_train``).

Not part of decathlete and never imported by it: ``bench_train`` copies this file as
``nnUNetTrainer_decathleteBench.py`` into ``nnunetv2/training/nnUNetTrainer/`` of the reference environment for the
duration of its run, because ``nnUNetv2_train -tr NAME`` finds trainer classes by name by walking that package
(``recursive_find_trainer_class_by_name``: first the folder's own modules, then its subpackages in alphabetical
order; ``nnUNet_extTrainer`` folders only after that). Not into ``variants/benchmarking/`` next to nnU-Net's own
benchmark trainers: the walk reaches ``primus/`` first, which imports timm -> torchvision, and the torchvision in the
CPU reference environment fails to import ("operator torchvision::nms does not exist").

Configured the nnU-Net way, through environment variables set by the harness:

* ``DECATHLETE_BENCH_ITERATIONS``: training iterations of the single epoch (``num_iterations_per_epoch``);
* ``DECATHLETE_BENCH_VAL_ITERATIONS``: validation iterations (``num_val_iterations_per_epoch``).

Everything else is ``nnUNetTrainer`` as shipped (data loader worker processes from ``nnUNet_n_proc_DA``, loss, deep
supervision, augmentation, optimiser, checkpointing), except that the final sliding-window validation of the fold
(``perform_actual_validation``), which runs after training and is not timed, is skipped. The only additions are
timestamps: the epoch start (nnU-Net's own ``epoch_start_timestamps``), the end of every training step, the start
of the validation part and the epoch end (``epoch_end_timestamps``), written to ``bench_timing.json`` in the output
folder when training ends.
"""

import json
import os
from time import time

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

CUDA = torch.device("cuda")  # nnUNetTrainer's default device (nnUNetv2_train always passes one)


class nnUNetTrainer_decathleteBench(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = CUDA):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = int(os.environ["DECATHLETE_BENCH_ITERATIONS"])
        self.num_val_iterations_per_epoch = int(os.environ["DECATHLETE_BENCH_VAL_ITERATIONS"])
        self._bench_step_ends = []
        self._bench_val_starts = []

    def train_step(self, batch: dict) -> dict:
        result = super().train_step(batch)  # returns the loss as a numpy array: the step is finished
        self._bench_step_ends.append(time())
        return result

    def on_validation_epoch_start(self):
        self._bench_val_starts.append(time())
        super().on_validation_epoch_start()

    def perform_actual_validation(self, save_probabilities: bool = False):
        pass

    def on_train_end(self):
        super().on_train_end()
        if self.local_rank != 0:
            return
        starts = self.logger.get_value("epoch_start_timestamps", step=None)
        ends = self.logger.get_value("epoch_end_timestamps", step=None)
        start, end, val_start = starts[0], ends[0], self._bench_val_starts[0]
        timing = {
            "epoch_seconds": end - start, "train_seconds": val_start - start, "validation_seconds": end - val_start,
            "step_end_seconds": [t - start for t in self._bench_step_ends],
            "iterations": self.num_iterations_per_epoch, "val_iterations": self.num_val_iterations_per_epoch,
            "batch_size": self.batch_size, "patch_size": [int(p) for p in self.configuration_manager.patch_size],
            "n_proc_DA": get_allowed_n_proc_DA(), "torch_threads": torch.get_num_threads(),
            "device": str(self.device), "torch": torch.__version__,
        }
        with open(os.path.join(self.output_folder, "bench_timing.json"), "w") as f:
            json.dump(timing, f, indent=2)
