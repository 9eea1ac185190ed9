"""Inference speed and memory: ``decathlete predict`` vs ``nnUNetv2_predict`` and a MONAI sliding-window script.

All three use the same network: Task04_Hippocampus's 3d_fullres plan (decathlete's and nnU-Net's are identical:
4 stages, 32..256 features, patch 40x56x40; see bench_train), on the CPU, with and without mirroring TTA, over the
same held-out images (the first cases of decathlete's fold-0 validation split), starting from the raw NIfTI files
and ending with written label maps. The figure is the wall time of the whole command divided by the number of
cases, so it includes process start and model loading on every side (which is what a user waits for), and the
peak RSS summed over the command's process tree (``peak_rss.measure``). The three sides alternate, median of
``--repeats``.

* decathlete: ``decathlete predict -i IMAGES -o OUT -m WORK -f 0 --device cpu [--no-tta]`` (in-process, tiles
  batched, per-class memory-bounded inversion);
* nnU-Net v2: ``nnUNetv2_predict -i IMAGES -o OUT -d 4 -c 3d_fullres -f 0 -device cpu -npp W -nps W
  [--disable_tta]`` with W = ``--workers`` (its preprocessing and export processes);
* MONAI: ``_predict_monai.py``: nibabel + z-score + ``sliding_window_inference(overlap=0.5, mode="gaussian")``,
  8 mirrorings with TTA; it does not resample (hippocampus images are already at the 1 mm plan spacing) or crop.

The weights do not matter for timing: each model is trained for one iteration (decathlete ``train --epochs 1
--iterations-per-epoch 1``; nnU-Net the one-epoch bench trainer with 1 iteration), MONAI uses the initialisation.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench_augment import _our_env, _ref_env
from bench_preprocess import DATASET, NNUNET_ID, QUICK_CASES, _check, subset_dataset
from bench_train import (
    OUR_CLI,
    OUR_PYTHON,
    TRAINER_NAME,
    TRAINER_SOURCE,
    _guarded,
    _has_reference,
    _nnunet_trainer_path,
    _remove_trainer,
    _run_json,
    _summary,
)
from common import BENCH_VENV, SHARED_DATA, Record, alternate, nnunet_device
from peak_rss import measure

HERE = Path(__file__).resolve().parent
CASES = {False: 20, True: 2}
SIDES = {"reference": "nnUNetv2_predict -device {}", "monai": "MONAI sliding_window_inference (gaussian, 0.5)"}


def run(args: Any) -> list[Record]:
    src = SHARED_DATA / DATASET
    names = [f"predict_{what}_{tta}" for tta in ("tta", "no_tta") for what in ("seconds_per_case", "peak_rss")]
    if not src.is_dir():
        reference = SIDES["reference"].format(nnunet_device(args.device))
        return [Record(n, "", None, None, reference, "lower", note=f"{src} is absent") for n in names]
    tmp = Path(tempfile.mkdtemp(prefix="decathlete-bench-predict-"))
    installed: list[Path] = []
    try:
        return _run(args, src, tmp, installed)
    finally:
        for path in installed:
            _remove_trainer(path)
        shutil.rmtree(tmp, ignore_errors=True)


def _prepare(args: Any, src: Path, tmp: Path, installed: list[Path]) -> tuple[list[str], dict[str, str], str]:
    """Models for decathlete and nnU-Net, the image folders, the architecture file; returns (cases, env, problem)."""
    work, workers = tmp / "decathlete", str(args.workers)
    src = subset_dataset(src, tmp / DATASET, QUICK_CASES) if args.quick else src  # same network, fewer to prepare
    _check([str(OUR_CLI), "plan", str(src), "-o", str(work), "-j", workers, "-c", "3d_fullres"])
    _check([str(OUR_CLI), "preprocess", str(work), "-c", "3d_fullres", "-j", workers])
    _check([str(OUR_CLI), "train", str(work), "-c", "3d_fullres", "-f", "0", "--epochs", "1",
            "--iterations-per-epoch", "1", "--val-iterations", "1", "--device", args.device])
    cases = json.loads((work / "splits.json").read_text())[0]["val"][:CASES[bool(args.quick)]]
    for folder, name in ((tmp / "images", "{}.nii.gz"), (tmp / "images_nnunet", "{}_0000.nii.gz")):
        folder.mkdir()
        for cid in cases:
            (folder / name.format(cid)).symlink_to(src / "imagesTr" / f"{cid}.nii.gz")
    _run_json([str(OUR_PYTHON), str(HERE / "bench_train.py"), "--step-worker", "--plans", str(work / "plans.json"),
               "--write-arch", str(tmp / "arch.json")], _our_env())
    problem = _has_reference()
    env = {**_ref_env(), "nnUNet_raw": str(tmp / "nnunet_raw"), "nnUNet_preprocessed": str(tmp / "nnunet_pre"),
           "nnUNet_results": str(tmp / "nnunet_results"), "nnUNet_n_proc_DA": workers}
    if problem:
        return cases, env, problem
    nn_bin = BENCH_VENV / "bin"
    try:
        _check([str(nn_bin / "nnUNetv2_convert_MSD_dataset"), "-i", str(src), "-overwrite_id", str(NNUNET_ID),
                "-np", workers], env)
        _check([str(nn_bin / "nnUNetv2_plan_and_preprocess"), "-d", str(NNUNET_ID), "-c", "3d_fullres",
                "-np", workers, "-npfp", workers], env)
        target = _nnunet_trainer_path()
        installed.append(target)
        shutil.copyfile(TRAINER_SOURCE, target)
        _check([str(nn_bin / "nnUNetv2_train"), str(NNUNET_ID), "3d_fullres", "0", "-tr", TRAINER_NAME, "-device",
                nnunet_device(args.device)],
               {**env, "DECATHLETE_BENCH_ITERATIONS": "1", "DECATHLETE_BENCH_VAL_ITERATIONS": "1"})
    except (RuntimeError, OSError) as exc:
        problem = f"nnU-Net setup failed: {str(exc)[-1200:]}"
    return cases, env, problem


def _timed(cmd: list[str], env: dict[str, str], out: Path, n: int) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    result = measure(cmd, env=env)
    if result["returncode"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {result['returncode']}")
    written = len(list(out.glob("*.nii.gz")))
    if written != n:
        raise RuntimeError(f"{' '.join(cmd)} wrote {written} of {n} label maps")
    return {"seconds_per_case": result["wall_s"] / n, "peak_rss": result["peak_rss_mb"], "wall_s": result["wall_s"],
            "cpu_s": result["cpu_s"]}


def _run(args: Any, src: Path, tmp: Path, installed: list[Path]) -> list[Record]:
    cases, env, problem = _prepare(args, src, tmp, installed)
    n, workers, nn_bin, device = len(cases), str(args.workers), BENCH_VENV / "bin", args.device
    records, reference = [], {side: name.format(nnunet_device(device)) for side, name in SIDES.items()}
    for tta in (True, False):
        tag = "tta" if tta else "no_tta"
        ours = [str(OUR_CLI), "predict", "-i", str(tmp / "images"), "-o", str(tmp / "out_ours"), "-m",
                str(tmp / "decathlete"), "-f", "0", "--device", device] + ([] if tta else ["--no-tta"])
        theirs = [str(nn_bin / "nnUNetv2_predict"), "-i", str(tmp / "images_nnunet"), "-o", str(tmp / "out_nnunet"),
                  "-d", str(NNUNET_ID), "-c", "3d_fullres", "-f", "0", "-tr", TRAINER_NAME, "-device",
                  nnunet_device(device), "-npp", workers, "-nps", workers] + ([] if tta else ["--disable_tta"])
        monai = [str(nn_bin / "python"), str(HERE / "_predict_monai.py"), "--images", str(tmp / "images"), "--out",
                 str(tmp / "out_monai"), "--arch", str(tmp / "arch.json"), "--device", device]
        monai += ["--tta"] if tta else []
        sides = {"decathlete": _guarded(lambda c=ours: _timed(c, _our_env(), tmp / "out_ours", n))}
        if not problem:
            sides["reference"] = _guarded(lambda c=theirs: _timed(c, env, tmp / "out_nnunet", n))
        if (nn_bin / "python").exists():
            sides["monai"] = _guarded(lambda c=monai: _timed(c, _ref_env(), tmp / "out_monai", n))
        runs = alternate(sides, args.repeats)
        runs.setdefault("reference", [{"error": problem}])
        runs.setdefault("monai", [{"error": _has_reference() or "not run"}])
        for metric, unit in (("seconds_per_case", "s/case"), ("peak_rss", "MB")):
            value = {side: _summary(side_runs, metric) for side, side_runs in runs.items()}
            for ref in ("reference", "monai"):
                name = f"predict_{metric}_{tag}" + ("" if ref == "reference" else "_vs_monai")
                note = (f"{n} held-out cases of {DATASET} (fold-0 validation), 3d_fullres plan (5.6 M parameters, "
                        f"patch 40x56x40), {device}, {'with' if tta else 'without'} mirroring TTA (8 mirrorings); "
                        "whole command from raw NIfTI to written label maps, process start and model loading included; "
                        f"memory = peak RSS summed over the process tree. nnU-Net with -npp/-nps {workers}. "
                        "MONAI script: no resampling/cropping, sw_batch_size 1")
                for side, (_, error) in value.items():
                    if error and side in ("decathlete", ref):
                        note += f"; {side} failed: {error[-600:]}"
                records.append(Record(name, unit, value["decathlete"][0], value[ref][0], reference[ref], "lower",
                                      {"runs": {s: runs[s] for s in ("decathlete", ref)}, "cases": cases}, note))
    return records
