"""Training speed on CPU: iterations per second, decathlete vs nnU-Net v2, on Task04_Hippocampus's 3d_fullres plan.

Two measurements, each side in its own subprocess, the sides alternating, the median of ``--repeats`` reported:

``train_step_iterations_per_second``: the network alone. One training step is ``zero_grad`` + forward + loss +
    backward + ``SGD(lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)`` step on random input of the plan's
    (batch, 1, *patch) with deep supervision, the loss being the sum of the cross-entropies of the deep-supervision
    outputs against random labels downsampled (every k-th voxel) to each output. The step code is the same function
    on both sides (``_train_reference.step_loop``); only the network differs: decathlete's ``DynamicUNet`` built from
    its plan (``build_network``) vs ``dynamic_network_architectures``' ``PlainConvUNet`` with the keyword arguments of
    nnU-Net v2's plans, given the same stages, widths, kernel sizes and strides (``_train_reference.build_reference``).
    The plan is decathlete's for all 200 training cases (batch 7, patch 40x56x40, 4 stages, 32..256 features: what
    nnU-Net v2 plans too). Two warm-up steps, then 5 timed steps (1 + 1 with ``--quick``); torch threads = CPU count on
    both sides. Not included: data loading, augmentation, Dice loss, gradient clipping, mixed precision.

``train_loop_iterations_per_second``: the whole training loop, data loading and augmentation included.
    ``decathlete train WORK -c 3d_fullres -f 0 --epochs 1 --iterations-per-epoch N --val-iterations V --device cpu``
    (its defaults otherwise: no loader processes on a CPU) vs ``nnUNetv2_train 4 3d_fullres 0 -tr
    nnUNetTrainer_decathleteBench -device cpu`` with ``nnUNet_n_proc_DA=--workers`` (nnU-Net's defaults otherwise:
    that many augmentation processes for training plus half as many for validation; torch threads = CPU count, as
    ``nnUNetv2_train -device cpu`` sets). ``nnUNetTrainer_decathleteBench`` (``_nnunet_bench_trainer.py``, copied into
    the reference environment's ``nnunetv2/training/nnUNetTrainer/`` for the run and removed afterwards) is
    ``nnUNetTrainer`` with one epoch of N training and V validation iterations read from environment variables,
    timestamps, and no final sliding-window validation (untimed anyway). The figure is N / the training part of the
    epoch: nnU-Net's epoch start to its validation start; decathlete's ``epoch_seconds`` minus the time in its
    validation function (the worker mode of this file wraps ``decathlete.train.trainer.validate_epoch`` with a timer and
    runs the CLI in-process).
    Both systems plan and preprocess beforehand (untimed, once per run in the shared ``Workspace``): ``decathlete
    plan`` + ``decathlete preprocess`` and nnU-Net's conversion, fingerprint, plan and ``nnUNetv2_preprocess -c
    3d_fullres``; ``--quick`` uses the first 20 cases, for which both planners cut the batch to 2 (the 5 % dataset-
    coverage cap), else all 200 (batch 7).
    N = 10 (2 with ``--quick``), V = 2.

Run as a script (``--step-worker`` / ``--loop-worker``) it is decathlete's side of one measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _workspace import BENCH_TRAINER, BENCH_TRAINER_SOURCE, CONFIGURATION, DATASET, NN_BIN, NNUNET_ID
from common import OUR_PYTHON, Record, alternate, median_of, nnunet_device, our_env, ref_env, run_json

HERE = Path(__file__).resolve().parent
REFERENCE_SCRIPT = HERE / "_train_reference.py"
STEP_WARMUP = {False: 2, True: 1}  # by --quick
STEP_ITERATIONS = {False: 5, True: 1}
LOOP_ITERATIONS = {False: 10, True: 2}
LOOP_VAL_ITERATIONS = 2
STEP_NAME, LOOP_NAME = "train_step_iterations_per_second", "train_loop_iterations_per_second"
STEP_REFERENCE = "dynamic_network_architectures PlainConvUNet (nnU-Net v2)"
LOOP_REFERENCE = "nnUNetv2_train -device {}"


# --- decathlete's side (runs in .venv as a subprocess) --------------------------------------------------------------

def _architecture(plans_path: Path) -> dict[str, Any]:
    """What both networks are built from: the plan's stages, widths, kernels, strides, channels, batch and patch."""
    from decathlete.labels import LabelScheme
    from decathlete.planning.plans import Plans

    plans = Plans.load(plans_path)
    config = plans.configuration(CONFIGURATION)
    kwargs = config.network.kwargs
    n_out = LabelScheme.from_dataset(plans.dataset).num_outputs
    return {"features_per_stage": list(kwargs["features_per_stage"]),
            "kernel_sizes": [list(k) for k in kwargs["kernel_sizes"]], "strides": [list(s) for s in kwargs["strides"]],
            "in_channels": len(plans.dataset["channel_names"]), "num_classes": n_out,
            "batch_size": config.batch_size, "patch_size": list(config.patch_size),
            "decathlete_network": {"name": config.network.name, "block": kwargs.get("block", "plain"),
                                   "n_blocks_per_stage": kwargs.get("n_blocks_per_stage", 2),
                                   "n_conv_per_stage_decoder": kwargs.get("n_conv_per_stage_decoder", 2),
                                   "norm": kwargs.get("norm"), "act": kwargs.get("act"),
                                   "deep_supervision": kwargs.get("deep_supervision", True)}}


def _step_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from _train_reference import step_loop
    from decathlete.planning.plans import Plans
    from decathlete.recipes.build import build_network

    plans = Plans.load(args.plans)
    torch.manual_seed(args.seed)
    net = build_network(plans.configuration(CONFIGURATION), plans)
    out = step_loop(net, json.loads(args.arch.read_text()), args.warmup, args.iterations, args.threads, args.seed,
                    args.device)
    out["network"] = f"decathlete {type(net).__name__}"
    return out


def _loop_worker(args: argparse.Namespace) -> dict[str, Any]:
    """``decathlete train`` (the CLI, in this process) with a timer around the validation of each epoch."""
    import time

    import torch

    import decathlete.train.trainer as trainer
    from decathlete.cli import main
    from decathlete.io.checkpoint import load_checkpoint

    validate, val_seconds = trainer.validate_epoch, []

    def timed_validate(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        result = validate(*a, **k)
        val_seconds.append(time.perf_counter() - t0)
        return result

    trainer.validate_epoch = timed_validate
    rc = main(["train", str(args.work), "-c", CONFIGURATION, "-f", "0", "--epochs", "1", "--iterations-per-epoch",
               str(args.iterations), "--val-iterations", str(args.val_iterations), "--device", args.device])
    if rc != 0:
        raise SystemExit(rc)
    final = next((args.work / "models" / CONFIGURATION).glob("*/fold_0/checkpoint_final.pth"))
    saved = load_checkpoint(final)
    epoch = float(saved["state"]["history"]["epoch_seconds"][0])
    config = json.loads((final.parent / "run.json").read_text())["configuration"]
    return {"epoch_seconds": epoch, "validation_seconds": val_seconds[0], "train_seconds": epoch - val_seconds[0],
            "iterations": args.iterations, "val_iterations": args.val_iterations,
            "batch_size": config["batch_size"], "patch_size": config["patch_size"],
            "num_workers": saved["settings"]["num_workers"], "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__}


def worker_main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--step-worker", action="store_true")
    parser.add_argument("--loop-worker", action="store_true")
    parser.add_argument("--plans", type=Path)
    parser.add_argument("--arch", type=Path)
    parser.add_argument("--warmup", type=int, default=STEP_WARMUP[False])
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--val-iterations", type=int, default=LOOP_VAL_ITERATIONS)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    out = _step_worker(args) if args.step_worker else _loop_worker(args)
    print(json.dumps(out))


# --- orchestration ---------------------------------------------------------------------------------------------------

def _guarded(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """A side that fails is not run again: every later repeat returns the first error."""
    failure: list[str] = []

    def run() -> dict[str, Any]:
        if failure:
            return {"error": failure[0]}
        try:
            return fn()
        except (RuntimeError, OSError, ValueError, KeyError, StopIteration) as exc:
            failure.append(f"{type(exc).__name__}: {str(exc)[-1200:]}")
            return {"error": failure[0]}

    return run


def _summary(runs: list[dict[str, Any]], key: str) -> tuple[float | None, str]:
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        return None, errors[0]
    return round(median_of(runs, key), 5), ""


def run(args: Any) -> list[Record]:
    """Both records: the training step (network only), then the training loop."""
    return run_step(args) + run_loop(args)


def write_architecture(plans: Path, out: Path) -> dict[str, Any]:
    """The network both sides build, from decathlete's plan (the orchestrator runs in decathlete's environment)."""
    arch = _architecture(plans)
    out.write_text(json.dumps(arch, indent=2))
    return arch


def run_step(args: Any) -> list[Record]:
    ws = args.workspace
    if not ws.source.is_dir():
        return [Record(STEP_NAME, "iterations/s", None, None, STEP_REFERENCE, "higher", note=f"{ws.source} is absent")]
    plans, arch_path = ws.our_plan() / "plans.json", ws.root / "arch.json"
    arch = write_architecture(plans, arch_path)
    n, warmup, threads = STEP_ITERATIONS[bool(args.quick)], STEP_WARMUP[bool(args.quick)], os.cpu_count() or 1
    timing = ["--warmup", str(warmup), "--iterations", str(n), "--threads", str(threads), "--device", args.device]
    ours = _guarded(lambda: run_json([str(OUR_PYTHON), __file__, "--step-worker", "--plans", str(plans), "--arch",
                                       str(arch_path), *timing], our_env()))
    theirs = _guarded(lambda: run_json([str(NN_BIN / "python"), str(REFERENCE_SCRIPT), "--json",
                                         "--arch", str(arch_path), *timing], ref_env()))
    ref_problem = ws.nnunet_problem
    runs = alternate({"decathlete": ours, **({} if ref_problem else {"reference": theirs})}, args.repeats)
    runs.setdefault("reference", [{"error": ref_problem}])
    value = {side: _summary(side_runs, "iterations_per_second") for side, side_runs in runs.items()}
    params = {side: next((r["parameters"] for r in side_runs if "parameters" in r), None)
              for side, side_runs in runs.items()}
    net = arch["decathlete_network"]
    plain = (net["block"], net["n_blocks_per_stage"], net["n_conv_per_stage_decoder"]) == ("plain", 2, 2)
    shape = f"batch {arch['batch_size']}, patch {'x'.join(map(str, arch['patch_size']))}"
    note = (f"decathlete's 3d_fullres plan of {ws.describe()} of {DATASET} ({shape}, "
            f"{len(arch['features_per_stage'])} stages, features {arch['features_per_stage']}); {warmup} warm-up + "
            f"{n} timed steps per run, {threads} torch threads per side (the machine's CPU count), {args.device}, "
            f"fp32. Step: zero_grad + forward + sum of CE over the {len(arch['features_per_stage']) - 1} "
            "deep-supervision outputs (random labels, strided downsampling) + backward + SGD(0.01, momentum 0.99, "
            "Nesterov, wd 3e-5) step, the same code on both sides; random input. decathlete DynamicUNet (convs "
            "without bias before InstanceNorm) vs PlainConvUNet with nnU-Net's plan kwargs (conv_bias=True): "
            f"{params.get('decathlete')} vs {params.get('reference')} parameters. No data loading, augmentation, "
            "Dice term, gradient clipping")
    if not plain:
        note += f"; WARNING: decathlete's plan is not a plain 2-conv U-Net ({net})"
    for side, (_, error) in value.items():
        if error:
            note += f"; {side} failed: {error[-600:]}"
    details = {"architecture": arch, "threads": threads, "warmup": warmup, "timed_iterations": n,
               "repeats": args.repeats, "parameters": params,
               "per_run_iterations_per_second": {side: [r.get("iterations_per_second") for r in side_runs]
                                                 for side, side_runs in runs.items()},
               "runs": runs}
    return [Record(STEP_NAME, "iterations/s", value["decathlete"][0], value["reference"][0], STEP_REFERENCE,
                   "higher", details, note)]


def run_loop(args: Any) -> list[Record]:
    ws = args.workspace
    if not ws.source.is_dir():
        return [Record(LOOP_NAME, "iterations/s", None, None, LOOP_REFERENCE.format(nnunet_device(args.device)),
                       "higher", note=f"{ws.source} is absent")]
    n_cases = len(ws.case_ids)
    n, v, workers = LOOP_ITERATIONS[bool(args.quick)], LOOP_VAL_ITERATIONS, ws.workers
    work = ws.our_preprocessed()
    ref_problem, env = ws.nnunet_problem, {}
    if not ref_problem:
        try:
            env = ws.nnunet_preprocessed()
            ws.nnunet_trainer(BENCH_TRAINER_SOURCE, BENCH_TRAINER)
        except (RuntimeError, OSError) as exc:
            ref_problem = f"nnU-Net setup failed: {str(exc)[-1200:]}"

    def ours() -> dict[str, Any]:
        shutil.rmtree(work / "models", ignore_errors=True)
        r = run_json([str(OUR_PYTHON), __file__, "--loop-worker", "--work", str(work), "--iterations", str(n),
                       "--val-iterations", str(v), "--device", args.device], our_env())
        return {**r, "iterations_per_second": n / r["train_seconds"],
                "epoch_iterations_per_second": (n + v) / r["epoch_seconds"]}

    def theirs() -> dict[str, Any]:
        for old in ws.nnunet_results.glob(f"{BENCH_TRAINER}__*"):
            shutil.rmtree(old)
        cmd = [str(NN_BIN / "nnUNetv2_train"), str(NNUNET_ID), CONFIGURATION, "0", "-tr", BENCH_TRAINER,
               "-device", nnunet_device(args.device)]
        proc = subprocess.run(cmd, env={**env, "DECATHLETE_BENCH_ITERATIONS": str(n),
                                        "DECATHLETE_BENCH_VAL_ITERATIONS": str(v)}, capture_output=True, text=True)
        found = list(ws.nnunet_results.glob(f"{BENCH_TRAINER}__*/fold_0/bench_timing.json"))
        if proc.returncode != 0 or not found:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-1500:]}\n"
                               f"{proc.stderr[-1500:]}")
        r = json.loads(found[0].read_text())
        return {**r, "iterations_per_second": n / r["train_seconds"],
                "epoch_iterations_per_second": (n + v) / r["epoch_seconds"]}

    runs = alternate({"decathlete": _guarded(ours), **({} if ref_problem else {"reference": _guarded(theirs)})},
                     args.repeats)
    runs.setdefault("reference", [{"error": ref_problem}])
    value = {side: _summary(side_runs, "iterations_per_second") for side, side_runs in runs.items()}
    epoch_rate = {side: _summary(side_runs, "epoch_iterations_per_second")[0] for side, side_runs in runs.items()}

    def first(side: str, key: str) -> Any:
        return next((r[key] for r in runs[side] if key in r), None)

    batch = {side: first(side, "batch_size") for side in runs}
    threads = {side: first(side, "torch_threads") for side in runs}
    note = (f"{ws.describe()} of {DATASET} (fold 0), 3d_fullres, "
            f"batch {batch['decathlete']} (nnU-Net {batch['reference']}), {args.device}; one epoch of {n} training + "
            f"{v} validation iterations; figure = {n} / training part of the epoch (nnU-Net: epoch start to validation "
            "start; decathlete: epoch_seconds minus its validation). torch threads: decathlete "
            f"{threads['decathlete']}, nnU-Net {threads['reference']}; data: decathlete in-process (its CPU default, 0 "
            f"loader workers), nnU-Net nnUNet_n_proc_DA={workers} augmentation processes (+1 for validation) "
            "alongside the training threads (its default). The first iterations include one-time warm-up on both "
            "sides; nnU-Net's workers start prefetching (up to 6 batches) during its untimed setup. Whole epoch, "
            f"(N+V)/epoch time: decathlete {epoch_rate['decathlete']}, nnU-Net {epoch_rate['reference']} "
            "iterations/s. Planning and preprocessing untimed; nnU-Net's final sliding-window validation skipped")
    if batch["decathlete"] != batch["reference"] and batch["reference"] is not None:
        note += f"; WARNING: the batch sizes differ ({batch})"
    for side, (_, error) in value.items():
        if error:
            note += f"; {side} failed: {error[-600:]}"
    details = {"cases": n_cases, "iterations": n, "val_iterations": v, "repeats": args.repeats,
               "nnUNet_n_proc_DA": args.workers, "batch_size": batch, "torch_threads": threads,
               "epoch_iterations_per_second": epoch_rate,
               "per_run_iterations_per_second": {side: [r.get("iterations_per_second") for r in side_runs]
                                                 for side, side_runs in runs.items()},
               "runs": runs}
    return [Record(LOOP_NAME, "iterations/s", value["decathlete"][0], value["reference"][0],
                   LOOP_REFERENCE.format(nnunet_device(args.device)), "higher", details, note)]


if __name__ == "__main__":
    worker_main()
