"""One run's prepared dataset (Task04_Hippocampus unless named), shared by the benchmarks instead of each preparing
its own.

preprocess, train_step, train_loop, predict and accuracy_at_budget all need the same dataset planned (and most of
them preprocessed, some a trained model) by both systems. None of that preparation is timed, but redoing it in every
benchmark cost minutes per run, most of it nnU-Net's start-up (~5 s per command) and its dataset conversion,
fingerprint, planning and preprocessing. A ``Workspace`` does each step once, when a benchmark first asks for it, and
checks before reusing anything that it is still complete (a benchmark that times preprocessing deletes and rewrites
the preprocessed folders; the training-loop benchmark replaces the models), so any subset of benchmarks, in any
order, finds what it needs.

The dataset: the first ``QUICK_CASES`` training cases with ``--quick`` (copied outside the repository so both
systems see the same subset), else all of them, read in place. Both systems use decathlete's seeded fold split
(``splits.json`` / nnU-Net's ``splits_final.json``), so "fold 0" is the same cases on both sides everywhere.

The models are for timing prediction only, so whatever fold-0 model is there (the loop benchmark's last run, or a
one-iteration training made here) is good enough: the weights do not change the work of a forward pass.
"""

from __future__ import annotations

import json
import shutil
from functools import cached_property
from pathlib import Path

from common import (
    BENCH_VENV,
    OUR_CLI,
    SHARED_DATA,
    nnunet_device,
    nnunet_trainer_path,
    our_env,
    ref_env,
    reference_problem,
    remove_trainer,
    run_checked,
    subset_dataset,
)

DATASET = "Task04_Hippocampus"
NNUNET_ID = 4
QUICK_CASES = 20  # both planners still give the full network (5.6 M parameters, patch 40x56x40) and batch 2
CONFIGURATION = "3d_fullres"
NN_BIN = BENCH_VENV / "bin"
BENCH_TRAINER = "nnUNetTrainer_decathleteBench"  # _nnunet_bench_trainer.py: one short epoch
BENCH_TRAINER_SOURCE = Path(__file__).resolve().parent / "_nnunet_bench_trainer.py"


class Workspace:
    """Lazily prepared dataset, plans, preprocessed data and fold-0 models of both systems under ``root``."""

    def __init__(self, root: Path, quick: bool, workers: int, device: str, dataset: str = DATASET,
                 nnunet_id: int = NNUNET_ID) -> None:
        self.root, self.quick, self.workers, self.device = Path(root), quick, str(workers), device
        self.dataset, self.nnunet_id = dataset, nnunet_id  # nnU-Net's DatasetXXX number for the converted copy
        self.our_work = self.root / "decathlete"
        self._installed: dict[str, Path] = {}

    # --- the dataset ------------------------------------------------------------------------------------------------

    @property
    def source(self) -> Path:
        return SHARED_DATA / self.dataset

    @cached_property
    def data(self) -> Path:
        if not self.quick:
            return self.source
        return subset_dataset(self.source, self.root / self.dataset, QUICK_CASES)

    @cached_property
    def case_ids(self) -> list[str]:
        entries = json.loads((self.data / "dataset.json").read_text())["training"]
        return sorted(Path(e["label"]).name.removesuffix(".nii.gz") for e in entries)

    @cached_property
    def splits(self) -> list[dict[str, list[str]]]:
        from decathlete.data.splits import make_splits  # the orchestrator runs in decathlete's environment

        return make_splits(self.case_ids)

    def describe(self) -> str:
        return f"the first {QUICK_CASES} cases" if self.quick else f"all {len(self.case_ids)} cases"

    # --- decathlete -------------------------------------------------------------------------------------------------

    def our_plan(self) -> Path:
        """decathlete's default plan (validates the dataset); returns the work folder."""
        if not (self.our_work / "plans.json").is_file():
            run_checked([str(OUR_CLI), "plan", str(self.data), "-o", str(self.our_work), "-j", self.workers])
        splits = self.our_work / "splits.json"
        if not splits.is_file():
            splits.write_text(json.dumps(self.splits, indent=2))
        return self.our_work

    def our_preprocessed(self) -> Path:
        from decathlete.preprocess.cache import case_is_complete

        work = self.our_plan()
        folder = work / "preprocessed" / CONFIGURATION
        if not all(case_is_complete(folder, cid) for cid in self.case_ids):
            run_checked([str(OUR_CLI), "preprocess", str(work), "-c", CONFIGURATION, "-j", self.workers])
        return work

    def our_model(self) -> Path:
        """A fold-0 ``checkpoint_final.pth`` of the default plan (one training iteration if none is there)."""
        work = self.our_preprocessed()
        if not list((work / "models" / CONFIGURATION).glob("*/fold_0/checkpoint_final.pth")):
            run_checked([str(OUR_CLI), "train", str(work), "-c", CONFIGURATION, "-f", "0", "--epochs", "1",
                         "--iterations-per-epoch", "1", "--val-iterations", "1", "--device", self.device], our_env())
        return work

    # --- nnU-Net v2 ---------------------------------------------------------------------------------------------------

    @property
    def nnunet_problem(self) -> str:
        return reference_problem()

    @property
    def nnunet_env(self) -> dict[str, str]:
        return {**ref_env(), "nnUNet_raw": str(self.root / "nnunet_raw"),
                "nnUNet_preprocessed": str(self.root / "nnunet_pre"),
                "nnUNet_results": str(self.root / "nnunet_results"), "nnUNet_n_proc_DA": self.workers}

    @property
    def nnunet_raw(self) -> Path:
        return self.root / "nnunet_raw" / f"Dataset{self.nnunet_id:03d}_{self.msd_name.split('_', 1)[1]}"

    @property
    def nnunet_pre(self) -> Path:
        return self.root / "nnunet_pre" / self.nnunet_raw.name

    @property
    def nnunet_results(self) -> Path:
        return self.root / "nnunet_results" / self.nnunet_raw.name

    @property
    def msd_name(self) -> str:
        """``TaskNN_Name`` with one underscore, as nnU-Net's MSD converter splits the folder name."""
        task, name = self.dataset.split("_", 1)
        return f"{task}_{name.replace('_', '')}"

    @property
    def msd_source(self) -> Path:
        """The dataset as nnU-Net's MSD converter takes it: it asserts an ``imagesTs`` folder (Task106 has none)
        and a folder name with one underscore, so other datasets are given through links next to an empty one."""
        if (self.data / "imagesTs").is_dir() and self.msd_name == self.data.name:
            return self.data
        shadow = self.root / "msd_source" / self.msd_name
        if not shadow.is_dir():
            shadow.mkdir(parents=True)
            for name in ("dataset.json", "imagesTr", "labelsTr"):
                (shadow / name).symlink_to((self.data / name).resolve())
            (shadow / "imagesTs").mkdir()
        return shadow

    def nnunet_planned(self) -> dict[str, str]:
        """Converted (``nnUNetv2_convert_MSD_dataset``), fingerprinted and planned; returns the environment."""
        env = self.nnunet_env
        if not (self.nnunet_raw / "dataset.json").is_file():
            run_checked([str(NN_BIN / "nnUNetv2_convert_MSD_dataset"), "-i", str(self.msd_source), "-overwrite_id",
                         str(self.nnunet_id), "-np", self.workers], env)
        if not (self.nnunet_pre / "dataset_fingerprint.json").is_file():
            run_checked([str(NN_BIN / "nnUNetv2_extract_fingerprint"), "-d", str(self.nnunet_id), "-np",
                         self.workers], env)
        if not (self.nnunet_pre / "nnUNetPlans.json").is_file():
            run_checked([str(NN_BIN / "nnUNetv2_plan_experiment"), "-d", str(self.nnunet_id)], env)
        (self.nnunet_pre / "splits_final.json").write_text(json.dumps(self.splits, indent=2))
        return env

    def nnunet_preprocessed(self) -> dict[str, str]:
        env = self.nnunet_planned()
        folder = self.nnunet_pre / f"nnUNetPlans_{CONFIGURATION}"
        if not all((folder / f"{cid}.pkl").is_file() for cid in self.case_ids):  # nnU-Net writes the .pkl last
            run_checked([str(NN_BIN / "nnUNetv2_preprocess"), "-d", str(self.nnunet_id), "-c", CONFIGURATION, "-np",
                         self.workers], env)
        return env

    def nnunet_trainer(self, source: Path, name: str) -> None:
        """Install a benchmark trainer into the reference nnunetv2 package until ``close``."""
        if name not in self._installed:
            target = nnunet_trainer_path(name)
            self._installed[name] = target
            shutil.copyfile(source, target)

    def nnunet_model(self) -> dict[str, str]:
        """A fold-0 ``checkpoint_final.pth`` of nnU-Net's default plan trained by the bench trainer."""
        env = self.nnunet_preprocessed()
        self.nnunet_trainer(BENCH_TRAINER_SOURCE, BENCH_TRAINER)
        if not list(self.nnunet_results.glob(f"{BENCH_TRAINER}__*/fold_0/checkpoint_final.pth")):
            run_checked([str(NN_BIN / "nnUNetv2_train"), str(self.nnunet_id), CONFIGURATION, "0", "-tr", BENCH_TRAINER,
                         "-device", nnunet_device(self.device)],
                        {**env, "DECATHLETE_BENCH_ITERATIONS": "1", "DECATHLETE_BENCH_VAL_ITERATIONS": "1"})
        return env

    def close(self) -> None:
        for target in self._installed.values():
            remove_trainer(target)
        self._installed.clear()
        shutil.rmtree(self.root, ignore_errors=True)
