"""Peak memory predicting a large CT: ``decathlete predict`` vs ``nnUNetv2_predict`` on a 300x512x512 volume.

The volume (``_synthetic_ct.py``): int16 HU, 300x512x512 voxels (z, y, x) at 2.5x0.8x0.8 mm, five organs (liver,
spleen, kidneys, spine), so 6 output classes. Both systems get a model for it the same way: their own planner on
four small training cases of the same generator (40x192x192, same spacing, so neither resamples the test volume:
nnU-Net's 3d_fullres plan for such CT is at its median spacing), the network narrowed to 4 base features on both
sides (nnU-Net: ``features_per_stage`` of its ``nnUNetPlans.json`` scaled by 1/8, caps included; decathlete:
``planning.budget.with_width``) so that the benchmark is about the arrays of the volume and not about conv
arithmetic, then one training iteration (weights do not matter for memory). Prediction: the whole command from the
NIfTI file to the written label map, CPU, no TTA, peak RSS summed over the process tree (``peak_rss.measure``),
nnU-Net with ``-npp/-nps --workers`` (its preprocessing and export processes). Sides alternate, median of
``--repeats``; ``--quick`` plans on 24x96x96 cases and predicts a 48x160x160 volume once.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from _workspace import BENCH_TRAINER as TRAINER_NAME
from _workspace import BENCH_TRAINER_SOURCE as TRAINER_SOURCE
from bench_train import _guarded, _summary
from common import (
    BENCH_VENV,
    OUR_CLI,
    OUR_PYTHON,
    Record,
    alternate,
    nnunet_device,
    nnunet_trainer_path,
    our_env,
    ref_env,
    reference_problem,
    remove_trainer,
    run_checked,
)
from peak_rss import measure

HERE = Path(__file__).resolve().parent
NNUNET_ID = 99
RAW = "Task99_SyntheticCT"
TEST_SHAPE = {False: (300, 512, 512), True: (48, 160, 160)}
TRAIN_SHAPE = {False: (40, 192, 192), True: (24, 96, 96)}
BASE_FEATURES = 4

_NARROW_OURS = """
import sys
from decathlete.planning.budget import with_width
from decathlete.planning.plans import Plans
plans = Plans.load(sys.argv[1])
config = plans.configuration("3d_fullres")
plans.configurations["3d_fullres"] = with_width(config, plans, int(sys.argv[2]), config.batch_size)
plans.save(sys.argv[1])
"""


def run(args: Any) -> list[Record]:
    tmp = Path(tempfile.mkdtemp(prefix="decathlete-bench-memory-"))
    installed: list[Path] = []
    try:
        return _run(args, tmp, installed)
    finally:
        for path in installed:
            remove_trainer(path)
        shutil.rmtree(tmp, ignore_errors=True)


def _ours(tmp: Path, workers: str, device: str) -> dict[str, Any]:
    """Plan, narrow, preprocess and train decathlete for one iteration; returns its network description."""
    work = tmp / "decathlete"
    run_checked([str(OUR_CLI), "plan", str(tmp / RAW), "-o", str(work), "-j", workers, "-c", "3d_fullres"])
    run_checked([str(OUR_PYTHON), "-c", _NARROW_OURS, str(work / "plans.json"), str(BASE_FEATURES)], our_env())
    run_checked([str(OUR_CLI), "preprocess", str(work), "-c", "3d_fullres", "-j", workers])
    run_checked([str(OUR_CLI), "train", str(work), "-c", "3d_fullres", "-f", "0", "--epochs", "1",
                 "--iterations-per-epoch", "1", "--val-iterations", "1", "--device", device], our_env())
    config = json.loads((work / "plans.json").read_text())["configurations"]["3d_fullres"]
    return {k: config[k] for k in ("patch_size", "spacing", "features_per_stage", "parameters")}


def _theirs(tmp: Path, workers: str, installed: list[Path], device: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Convert, plan, narrow, preprocess and train nnU-Net for one iteration; returns (env, network description)."""
    env = {**ref_env(), "nnUNet_raw": str(tmp / "nnunet_raw"), "nnUNet_preprocessed": str(tmp / "nnunet_pre"),
           "nnUNet_results": str(tmp / "nnunet_results"), "nnUNet_n_proc_DA": workers}
    nn_bin = BENCH_VENV / "bin"
    run_checked([str(nn_bin / "nnUNetv2_convert_MSD_dataset"), "-i", str(tmp / RAW), "-overwrite_id", str(NNUNET_ID),
                 "-np", workers], env)
    run_checked([str(nn_bin / "nnUNetv2_plan_and_preprocess"), "-d", str(NNUNET_ID), "-c", "3d_fullres",
                 "-np", workers, "-npfp", workers], env)
    plans_path = next((tmp / "nnunet_pre").glob(f"Dataset{NNUNET_ID:03d}_*/nnUNetPlans.json"))
    plans = json.loads(plans_path.read_text())
    config = plans["configurations"]["3d_fullres"]
    kwargs = config["architecture"]["arch_kwargs"]
    scale = BASE_FEATURES / kwargs["features_per_stage"][0]
    kwargs["features_per_stage"] = [max(1, round(f * scale)) for f in kwargs["features_per_stage"]]
    plans_path.write_text(json.dumps(plans, indent=2))
    target = nnunet_trainer_path(TRAINER_NAME)
    installed.append(target)
    shutil.copyfile(TRAINER_SOURCE, target)
    # fold "all": nnU-Net's 5-fold split refuses fewer than five training cases
    run_checked([str(nn_bin / "nnUNetv2_train"), str(NNUNET_ID), "3d_fullres", "all", "-tr", TRAINER_NAME, "-device",
                 nnunet_device(device)],
                {**env, "DECATHLETE_BENCH_ITERATIONS": "1", "DECATHLETE_BENCH_VAL_ITERATIONS": "1"})
    return env, {"patch_size": config["patch_size"], "spacing": config["spacing"],
                 "features_per_stage": kwargs["features_per_stage"]}


def _timed(cmd: list[str], env: dict[str, str], out: Path, name: str) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    result = measure(cmd, env=env)
    if result["returncode"] != 0 or not (out / name).is_file():
        raise RuntimeError(f"{' '.join(cmd)} exited with {result['returncode']} and wrote {sorted(out.glob('*'))}")
    return {"peak_rss": result["peak_rss_mb"], "wall_s": result["wall_s"], "cpu_s": result["cpu_s"]}


def _run(args: Any, tmp: Path, installed: list[Path]) -> list[Record]:
    shape, workers = TEST_SHAPE[bool(args.quick)], str(args.workers)
    train_shape = TRAIN_SHAPE[bool(args.quick)]
    repeats = 1 if args.quick else args.repeats
    run_checked([str(OUR_PYTHON), str(HERE / "_synthetic_ct.py"), str(tmp), "--test-shape", *map(str, shape),
                 "--train-shape", *map(str, train_shape)], our_env())
    (tmp / "test_nnunet").mkdir()
    (tmp / "test_nnunet" / "ct_0000.nii.gz").symlink_to(tmp / "test" / "ct.nii.gz")
    device, ours_net, problem = args.device, _ours(tmp, workers, args.device), reference_problem()
    env, their_net = {}, {}
    if not problem:
        try:
            env, their_net = _theirs(tmp, workers, installed, device)
        except (RuntimeError, OSError, StopIteration, KeyError) as exc:
            problem = f"nnU-Net setup failed: {str(exc)[-1200:]}"
    ours = [str(OUR_CLI), "predict", "-i", str(tmp / "test"), "-o", str(tmp / "out_ours"), "-m",
            str(tmp / "decathlete"), "-f", "0", "--no-tta", "--device", device]
    theirs = [str(BENCH_VENV / "bin" / "nnUNetv2_predict"), "-i", str(tmp / "test_nnunet"), "-o",
              str(tmp / "out_nnunet"), "-d", str(NNUNET_ID), "-c", "3d_fullres", "-f", "all", "-tr", TRAINER_NAME,
              "-chk", "checkpoint_final.pth", "-device", nnunet_device(device), "-npp", workers, "-nps", workers,
              "--disable_tta"]
    sides = {"decathlete": _guarded(lambda: _timed(ours, our_env(), tmp / "out_ours", "ct.nii.gz"))}
    if not problem:
        sides["reference"] = _guarded(lambda: _timed(theirs, env, tmp / "out_nnunet", "ct.nii.gz"))
    runs = alternate(sides, repeats)
    runs.setdefault("reference", [{"error": problem}])
    voxels = shape[0] * shape[1] * shape[2]
    note = (f"synthetic CT {'x'.join(map(str, shape))} voxels (z, y, x) at 2.5x0.8x0.8 mm, int16, 6 classes "
            f"({voxels * 2 / 1e6:.0f} MB as int16; one float32 6-class stack at this grid {6 * voxels * 4 / 1e6:.0f}"
            f" MB); both models planned by their own planner on 4 cases {'x'.join(map(str, train_shape))} at the "
            f"same spacing, narrowed to {BASE_FEATURES} base features, one training iteration; {device}, no TTA, "
            f"whole command, peak RSS summed over the process tree; nnU-Net with -npp/-nps {workers}. decathlete "
            f"net {ours_net}; nnU-Net net {their_net}")
    records, reference = [], f"nnUNetv2_predict -device {nnunet_device(device)}"
    for metric, name, unit in (("peak_rss", "memory_large_volume_peak_rss", "MB"),
                               ("wall_s", "memory_large_volume_seconds", "s")):
        value = {side: _summary(side_runs, metric) for side, side_runs in runs.items()}
        text = note + "".join(f"; {side} failed: {err[-600:]}" for side, (_, err) in value.items() if err)
        records.append(Record(name, unit, value["decathlete"][0], value["reference"][0], reference, "lower",
                              {"runs": runs, "shape_zyx": shape, "decathlete_network": ours_net,
                               "nnunet_network": their_net}, text, repeats=repeats))
    return records
