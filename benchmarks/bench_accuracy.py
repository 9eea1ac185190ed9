"""Accuracy at a training budget: fold-0 validation Dice after the same CPU wall-clock time, on two datasets:
Task04_Hippocampus (MRI, 2 small structures) and Task106_OpenKBP_HeadNeckCT (CT, 7 organs at risk, 0.5 % foreground;
records named ``accuracy_at_budget_task106_*``). ``--datasets`` runs a subset.

decathlete: ``decathlete plan DATA --time-budget B --device cpu`` (the budget planner measures step times of every
configuration on this machine, narrows/batches each network to fit and records which configuration to train,
``plans.json``'s ``budget_choice``), ``preprocess`` and ``train -f 0`` of that configuration (the plan's iterations,
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
preprocessing and nnU-Net's data unpacking are outside the budget on both sides). The dataset (all 200 cases;
``--quick``: the first 20, with a 30 s budget that exercises the harness rather than compares) and nnU-Net's plan and
preprocessed data come from the run's shared ``Workspace``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from _workspace import CONFIGURATION, DATASET, NN_BIN, NNUNET_ID, Workspace
from common import OUR_CLI, Record, nnunet_device, our_env, run_checked, run_json

HERE = Path(__file__).resolve().parent
TRAINER_SOURCE = HERE / "_nnunet_budget_trainer.py"
TRAINER_NAME = "nnUNetTrainer_decathleteBudget"
BUDGET_MINUTES = {False: [10.0, 20.0, 40.0], True: [0.5]}


def _reference(device: str) -> str:
    return f"nnUNetv2_train -device {nnunet_device(device)} (default plan), stopped at the budget"


DATASETS = {DATASET: NNUNET_ID, "Task106_OpenKBP_HeadNeckCT": 106}  # nnU-Net's DatasetXXX number for each


def _name(minutes: float, dataset: str = DATASET) -> str:
    task = "" if dataset == DATASET else dataset.split("_", 1)[0].lower() + "_"  # the hippocampus keeps its names
    return f"accuracy_at_budget_{task}{minutes:g}min_dice"


def run(args: Any) -> list[Record]:
    budgets = sorted(float(b) for b in (getattr(args, "budgets", None) or BUDGET_MINUTES[bool(args.quick)]))
    records = []
    for dataset in getattr(args, "datasets", None) or list(DATASETS):
        if dataset == DATASET:
            records += _run_dataset(args.workspace, budgets, args.device)
            continue
        ws = args.workspace
        other = Workspace(ws.root / dataset, ws.quick, int(ws.workers), ws.device, dataset, DATASETS[dataset])
        try:
            records += _run_dataset(other, budgets, args.device)
        finally:
            other.close()
    return records


def _run_dataset(ws: Workspace, budgets: list[float], device: str) -> list[Record]:
    if not ws.source.is_dir():
        return [Record(_name(m, ws.dataset), "Dice", None, None, _reference(device), "higher",
                       note=f"{ws.source} is absent") for m in budgets]
    tmp = ws.root / "accuracy"
    val = ws.splits[0]["val"]
    images, labels = held_out_folders(ws, tmp)
    ours = {m: _ours(ws, tmp / f"decathlete_{m:g}", m, images, labels, device) for m in budgets}
    ref_problem = ws.nnunet_problem
    theirs: dict[float, dict[str, Any]] = {}
    if not ref_problem:
        try:
            theirs = _theirs(ws, tmp, budgets, labels, device)
        except (RuntimeError, OSError, KeyError, StopIteration) as exc:
            ref_problem = f"nnU-Net failed: {str(exc)[-1200:]}"
    names = [v for k, v in sorted(json.loads((ws.data / "dataset.json").read_text())["labels"].items(),
                                  key=lambda kv: int(kv[0])) if int(k) > 0]
    records = []
    for m in budgets:
        o, t = ours[m], theirs.get(m, {"error": ref_problem or "no result"})
        note = (f"fold 0 of {len(ws.case_ids)} cases ({len(val)} held out) of {ws.dataset}, {m:g} min of training "
                f"on {device} (torch threads = CPU count on both sides); mean Dice over {', '.join(names)} of the "
                "held-out cases predicted from the raw images with mirroring TTA, no postprocessing. decathlete: "
                + _describe(o) + "; nnU-Net: " + _describe(t))
        records.append(Record(_name(m, ws.dataset), "Dice", o.get("dice"), t.get("dice"), _reference(device),
                              "higher", {"decathlete": o, "reference": t, "validation_cases": val}, note, repeats=1))
    return records


def held_out_folders(ws: Workspace, tmp: Path) -> tuple[Path, Path]:
    """``tmp`` (emptied) with links to fold 0's held-out images and labels: ``(images, labels)``."""
    shutil.rmtree(tmp, ignore_errors=True)
    images, labels = tmp / "val_images", tmp / "val_labels"
    for folder, sub in ((images, "imagesTr"), (labels, "labelsTr")):
        folder.mkdir(parents=True)
        for cid in ws.splits[0]["val"]:
            (folder / f"{cid}.nii.gz").symlink_to(ws.data / sub / f"{cid}.nii.gz")
    return images, labels


def _scores(pred: Path, labels: Path, data: Path, tag: str) -> dict[str, Any]:
    summary_path = pred.parent / f"summary_{tag}.json"
    run_checked([str(OUR_CLI), "evaluate", str(pred), str(labels), "--labels", str(data), "-o", str(summary_path)])
    summary = json.loads(summary_path.read_text())
    per_class = {name: {k: round(v[k], 4) for k in ("dice", "nsd", "hd95")} for name, v in summary["mean"].items()}
    return {"dice": round(summary["foreground_mean"]["dice"], 4), "per_class": per_class}


def _ours(ws: Workspace, work: Path, minutes: float, images: Path, labels: Path, device: str,
          recipe: str = "default") -> dict[str, Any]:
    try:
        budget, workers = f"{minutes * 60:g}s", ws.workers
        run_checked([str(OUR_CLI), "plan", str(ws.data), "-o", str(work), "-j", workers, "--time-budget", budget,
                     "--device", device, "--recipe", recipe])
        choice = json.loads((work / "plans.json").read_text())["budget_choice"]
        name = choice["configuration"]  # what the plan says to train in this budget (budget rule 7)
        run_checked([str(OUR_CLI), "preprocess", str(work), "-c", name, "-j", workers])
        (work / "splits.json").write_text(json.dumps(ws.splits))
        t0 = time.perf_counter()
        [done] = run_json([str(OUR_CLI), "train", str(work), "-c", name, "-f", "0", "--device", device,
                           "--json"], our_env())  # the fold's summary, alone on stdout
        train_seconds = time.perf_counter() - t0
        run = next((work / "models" / name).glob("*/fold_0/run.json"))
        config = json.loads(run.read_text())["configuration"]
        pred = work / "predictions"
        t0 = time.perf_counter()
        run_checked([str(OUR_CLI), "predict", "-i", str(images), "-o", str(pred), "-m", str(work), "-c", name,
                     "-f", "0", "--device", device])
        predict_seconds = time.perf_counter() - t0
        training = config["training"]
        return {**_scores(pred, labels, ws.data, "decathlete"), "configuration": name, "budget_choice": choice,
                "train_process_seconds": round(train_seconds, 1),
                "train_loop_seconds": round(done["seconds"], 1), "predicted_seconds": training["predicted_seconds"],
                "steps": done["steps"], "planned_iterations": training["iterations"],
                "stopped_by_time_budget": done["stopped_by_time_budget"], "step_seconds": training["step_seconds"],
                "iterations_per_second": round(done["steps"] / max(done["seconds"], 1e-9), 3),
                "parameters": config["parameters"], "features_per_stage": config["features_per_stage"],
                "batch_size": config["batch_size"], "patch_size": config["patch_size"],
                "predict_seconds_per_case": round(predict_seconds / len(list(images.iterdir())), 3),
                "probe": training["candidates"]}
    except (RuntimeError, OSError, KeyError, StopIteration, IndexError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {str(exc)[-1200:]}"}


def _theirs(ws: Workspace, tmp: Path, budgets: list[float], labels: Path, device: str) -> dict[float, dict[str, Any]]:
    env = ws.nnunet_preprocessed()  # with decathlete's split as splits_final.json
    ws.nnunet_trainer(TRAINER_SOURCE, TRAINER_NAME)
    for old in ws.nnunet_results.glob(f"{TRAINER_NAME}__*"):
        shutil.rmtree(old)
    marks = ",".join(f"{m * 60:g}" for m in budgets)
    run_checked([str(NN_BIN / "nnUNetv2_train"), str(ws.nnunet_id), CONFIGURATION, "0", "-tr", TRAINER_NAME,
                 "-device", nnunet_device(device)], {**env, "DECATHLETE_BENCH_MARKS": marks})
    fold = next(ws.nnunet_results.glob(f"{TRAINER_NAME}__*/fold_0"))
    saved = {round(c["mark_seconds"]): c for c in json.loads((fold / "bench_budget.json").read_text())["checkpoints"]}
    raw_images = ws.nnunet_raw / "imagesTr"
    images = tmp / "nnunet_val_images"
    images.mkdir()
    val = ws.splits[0]["val"]
    for cid in val:
        (images / f"{cid}_0000.nii.gz").symlink_to(raw_images / f"{cid}_0000.nii.gz")
    out: dict[float, dict[str, Any]] = {}
    for m in budgets:
        info = saved[round(m * 60)]
        pred = tmp / f"nnunet_pred_{m:g}"
        t0 = time.perf_counter()
        run_checked([str(NN_BIN / "nnUNetv2_predict"), "-i", str(images), "-o", str(pred), "-d", str(ws.nnunet_id),
                     "-c", CONFIGURATION, "-f", "0", "-tr", TRAINER_NAME, "-chk", info["checkpoint"], "-device",
                     nnunet_device(device), "-npp", ws.workers, "-nps", ws.workers], env)
        seconds = time.perf_counter() - t0  # its dataset/plans JSON files in pred are ignored by the evaluator
        out[m] = {**_scores(pred, labels, ws.data, "nnunet"), "steps": info["iterations"],
                  "elapsed_seconds": round(info["elapsed_seconds"], 1), "epoch": info["epoch"], "lr": info["lr"],
                  "checkpoint": info["checkpoint"], "predict_seconds_per_case": round(seconds / len(val), 3)}
    return out


def _describe(side: dict[str, Any]) -> str:
    if "error" in side:
        return f"failed: {side['error'][-500:]}"
    if "parameters" in side:
        return (f"budget plan {side.get('configuration', CONFIGURATION)}, {side['features_per_stage']} features, "
                f"{side['parameters']:,} parameters, batch "
                f"{side['batch_size']}, patch {side['patch_size']}, {side['step_seconds']} s/step measured, "
                f"{side['steps']} of {side['planned_iterations']} planned steps in {side['train_loop_seconds']} s "
                f"(predicted {side['predicted_seconds']} s), per class {side['per_class']}")
    return (f"default plan, {side['steps']} steps ({side['elapsed_seconds']} s, epoch {side['epoch']}, lr "
            f"{side['lr']:.4g}), {side['checkpoint']}, per class {side['per_class']}")
