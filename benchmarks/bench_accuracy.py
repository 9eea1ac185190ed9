"""Accuracy at a training budget: fold-0 validation Dice on Task04_Hippocampus after the same CPU wall-clock time.

decathlete: ``decathlete plan DATA --time-budget B --device cpu -c 3d_fullres`` (the budget planner measures step
times on this machine and narrows/batches the network to fit), ``preprocess``, ``train -f 0`` (the plan's iterations,
capped at B, schedule annealed over B), one run per budget.

nnU-Net v2: its default plan (``nnUNetv2_plan_and_preprocess -c 3d_fullres``) trained by ``nnUNetv2_train 4
3d_fullres 0 -device cpu -tr nnUNetTrainer_decathleteBudget``: the stock trainer, which saves a checkpoint when the
time since its first epoch started passes each budget and stops after the largest (``_nnunet_budget_trainer.py``;
one run serves all budgets because nnU-Net's schedule does not depend on the budget).

Both train on the same fold-0 split (decathlete's seeded split written as nnU-Net's ``splits_final.json``), then
predict the same held-out images from the raw files with mirroring TTA (``decathlete predict -f 0`` with
``checkpoint_final.pth`` / ``nnUNetv2_predict -f 0 -chk checkpoint_budget_<s>.pth``), and both predictions are scored
by the same evaluator (``decathlete evaluate``: Dice, NSD at 1 mm, HD95). No postprocessing on either side. Nothing
else runs on the machine meanwhile; the budgets are wall-clock seconds of training (process start, planning,
preprocessing and nnU-Net's data unpacking are outside the budget on both sides).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_augment import _our_env, _ref_env
from bench_preprocess import DATASET, NNUNET_ID, QUICK_CASES, _check, subset_dataset
from bench_train import OUR_CLI, OUR_PYTHON, _has_reference, _nnunet_trainer_path, _remove_trainer
from common import BENCH_VENV, SHARED_DATA, Record, nnunet_device

HERE = Path(__file__).resolve().parent
TRAINER_SOURCE = HERE / "_nnunet_budget_trainer.py"
TRAINER_NAME = "nnUNetTrainer_decathleteBudget"
BUDGET_MINUTES = {False: [10.0, 20.0, 40.0], True: [0.5]}
def _reference(device: str) -> str:
    return f"nnUNetv2_train -device {nnunet_device(device)} (default plan), stopped at the budget"


def _name(minutes: float) -> str:
    return f"accuracy_at_budget_{minutes:g}min_dice"


def run(args: Any) -> list[Record]:
    budgets = [float(b) for b in (getattr(args, "budgets", None) or BUDGET_MINUTES[bool(args.quick)])]
    src = SHARED_DATA / DATASET
    if not src.is_dir():
        return [Record(_name(m), "Dice", None, None, _reference(args.device), "higher", note=f"{src} is absent")
                for m in budgets]
    tmp = Path(tempfile.mkdtemp(prefix="decathlete-bench-accuracy-"))
    installed: list[Path] = []
    try:
        return _run(args, src, tmp, sorted(budgets), installed)
    finally:
        for path in installed:
            _remove_trainer(path)
        shutil.rmtree(tmp, ignore_errors=True)


def _run(args: Any, src: Path, tmp: Path, budgets: list[float], installed: list[Path]) -> list[Record]:
    data = subset_dataset(src, tmp / DATASET, QUICK_CASES // 2) if args.quick else src
    ids = sorted(Path(e["label"]).name.removesuffix(".nii.gz")
                 for e in json.loads((data / "dataset.json").read_text())["training"])
    splits = _splits(ids)
    val = splits[0]["val"]
    images, labels = tmp / "val_images", tmp / "val_labels"
    for folder, sub in ((images, "imagesTr"), (labels, "labelsTr")):
        folder.mkdir()
        for cid in val:
            (folder / f"{cid}.nii.gz").symlink_to(data / sub / f"{cid}.nii.gz")
    ours = {m: _ours(data, tmp / f"decathlete_{m:g}", m, splits, images, labels, args.workers, args.device)
            for m in budgets}
    ref_problem = _has_reference()
    theirs: dict[float, dict[str, Any]] = {}
    if not ref_problem:
        try:
            theirs = _theirs(data, tmp, budgets, splits, labels, args.workers, installed, args.device)
        except (RuntimeError, OSError, KeyError, StopIteration) as exc:
            ref_problem = f"nnU-Net failed: {str(exc)[-1200:]}"
    records = []
    for m in budgets:
        o, t = ours[m], theirs.get(m, {"error": ref_problem or "no result"})
        note = (f"fold 0 of {len(ids)} cases ({len(val)} held out) of {DATASET}, {m:g} min of training on "
                f"{args.device} (torch threads = CPU count on both sides); mean Dice over anterior/posterior of the "
                "held-out cases predicted from the raw images with mirroring TTA, no postprocessing. decathlete: "
                + _describe(o) + "; nnU-Net: " + _describe(t))
        records.append(Record(_name(m), "Dice", o.get("dice"), t.get("dice"), _reference(args.device), "higher",
                              {"decathlete": o, "reference": t, "validation_cases": val}, note, repeats=1))
    return records


def _splits(ids: list[str]) -> list[dict[str, list[str]]]:
    out = subprocess.run([str(OUR_PYTHON), "-c", "import json, sys; from decathlete.data.splits import make_splits; "
                          "print(json.dumps(make_splits(json.loads(sys.argv[1]))))", json.dumps(ids)],
                         env=_our_env(), capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _scores(pred: Path, labels: Path, data: Path, tag: str) -> dict[str, Any]:
    summary_path = pred.parent / f"summary_{tag}.json"
    _check([str(OUR_CLI), "evaluate", str(pred), str(labels), "--labels", str(data), "-o", str(summary_path)])
    summary = json.loads(summary_path.read_text())
    per_class = {name: {k: round(v[k], 4) for k in ("dice", "nsd", "hd95")} for name, v in summary["mean"].items()}
    return {"dice": round(summary["foreground_mean"]["dice"], 4), "per_class": per_class}


def _ours(data: Path, work: Path, minutes: float, splits: list, images: Path, labels: Path,
          workers: int, device: str) -> dict[str, Any]:
    try:
        budget = f"{minutes * 60:g}s"
        _check([str(OUR_CLI), "plan", str(data), "-o", str(work), "-j", str(workers), "--time-budget", budget,
                "--device", device, "-c", "3d_fullres"])
        _check([str(OUR_CLI), "preprocess", str(work), "-c", "3d_fullres", "-j", str(workers)])
        (work / "splits.json").write_text(json.dumps(splits))
        t0 = time.perf_counter()
        _check([str(OUR_CLI), "train", str(work), "-c", "3d_fullres", "-f", "0", "--device", device], _our_env())
        train_seconds = time.perf_counter() - t0
        run = next((work / "models" / "3d_fullres").glob("*/fold_0/run.json"))
        config = json.loads(run.read_text())["configuration"]
        log = (run.parent / "training_log.txt").read_text().splitlines()
        done = json.loads(log[-1].split("done: ", 1)[1])
        pred = work / "predictions"
        t0 = time.perf_counter()
        _check([str(OUR_CLI), "predict", "-i", str(images), "-o", str(pred), "-m", str(work), "-f", "0",
                "--device", device])
        predict_seconds = time.perf_counter() - t0
        training = config["training"]
        return {**_scores(pred, labels, data, "decathlete"), "train_process_seconds": round(train_seconds, 1),
                "train_loop_seconds": round(done["seconds"], 1), "predicted_seconds": training["predicted_seconds"],
                "steps": done["steps"], "planned_iterations": training["iterations"],
                "stopped_by_time_budget": done["stopped_by_time_budget"], "step_seconds": training["step_seconds"],
                "parameters": config["parameters"], "features_per_stage": config["features_per_stage"],
                "batch_size": config["batch_size"], "patch_size": config["patch_size"],
                "predict_seconds_per_case": round(predict_seconds / len(list(images.iterdir())), 3),
                "probe": training["candidates"]}
    except (RuntimeError, OSError, KeyError, StopIteration, IndexError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {str(exc)[-1200:]}"}


def _theirs(data: Path, tmp: Path, budgets: list[float], splits: list, labels: Path, workers: int,
            installed: list[Path], device: str) -> dict[float, dict[str, Any]]:
    env = {**_ref_env(), "nnUNet_raw": str(tmp / "nnunet_raw"), "nnUNet_preprocessed": str(tmp / "nnunet_pre"),
           "nnUNet_results": str(tmp / "nnunet_results"), "nnUNet_n_proc_DA": str(workers)}
    nn_bin = BENCH_VENV / "bin"
    _check([str(nn_bin / "nnUNetv2_convert_MSD_dataset"), "-i", str(data), "-overwrite_id", str(NNUNET_ID),
            "-np", str(workers)], env)
    _check([str(nn_bin / "nnUNetv2_plan_and_preprocess"), "-d", str(NNUNET_ID), "-c", "3d_fullres",
            "-np", str(workers), "-npfp", str(workers)], env)
    pre = next((tmp / "nnunet_pre").glob(f"Dataset{NNUNET_ID:03d}_*"))
    (pre / "splits_final.json").write_text(json.dumps(splits))
    target = _nnunet_trainer_path(TRAINER_NAME)
    installed.append(target)
    shutil.copyfile(TRAINER_SOURCE, target)
    marks = ",".join(f"{m * 60:g}" for m in budgets)
    _check([str(nn_bin / "nnUNetv2_train"), str(NNUNET_ID), "3d_fullres", "0", "-tr", TRAINER_NAME, "-device",
            nnunet_device(device)], {**env, "DECATHLETE_BENCH_MARKS": marks})
    fold = next((tmp / "nnunet_results").glob(f"*/{TRAINER_NAME}__*/fold_0"))
    saved = {round(c["mark_seconds"]): c for c in json.loads((fold / "bench_budget.json").read_text())["checkpoints"]}
    raw_images = next((tmp / "nnunet_raw").glob(f"Dataset{NNUNET_ID:03d}_*")) / "imagesTr"
    images = tmp / "nnunet_val_images"
    images.mkdir()
    for cid in splits[0]["val"]:
        (images / f"{cid}_0000.nii.gz").symlink_to(raw_images / f"{cid}_0000.nii.gz")
    out: dict[float, dict[str, Any]] = {}
    for m in budgets:
        info = saved[round(m * 60)]
        pred = tmp / f"nnunet_pred_{m:g}"
        t0 = time.perf_counter()
        _check([str(nn_bin / "nnUNetv2_predict"), "-i", str(images), "-o", str(pred), "-d", str(NNUNET_ID), "-c",
                "3d_fullres", "-f", "0", "-tr", TRAINER_NAME, "-chk", info["checkpoint"], "-device",
                nnunet_device(device)], env)
        seconds = time.perf_counter() - t0  # its dataset/plans JSON files in pred are ignored by the evaluator
        out[m] = {**_scores(pred, labels, data, "nnunet"), "steps": info["iterations"],
                  "elapsed_seconds": round(info["elapsed_seconds"], 1), "epoch": info["epoch"], "lr": info["lr"],
                  "checkpoint": info["checkpoint"], "predict_seconds_per_case": round(seconds / len(splits[0]["val"]),
                                                                                      3)}
    return out


def _describe(side: dict[str, Any]) -> str:
    if "error" in side:
        return f"failed: {side['error'][-500:]}"
    if "parameters" in side:
        return (f"budget plan {side['features_per_stage']} features, {side['parameters']:,} parameters, batch "
                f"{side['batch_size']}, patch {side['patch_size']}, {side['step_seconds']} s/step measured, "
                f"{side['steps']} of {side['planned_iterations']} planned steps in {side['train_loop_seconds']} s "
                f"(predicted {side['predicted_seconds']} s), per class {side['per_class']}")
    return (f"default plan, {side['steps']} steps ({side['elapsed_seconds']} s, epoch {side['epoch']}, lr "
            f"{side['lr']:.4g}), {side['checkpoint']}, per class {side['per_class']}")
