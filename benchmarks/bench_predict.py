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

The weights do not matter for timing: each side predicts with whatever fold-0 model the run's shared ``Workspace``
holds (the training-loop benchmark's last one-epoch model, or one trained for a single iteration when that benchmark
did not run); MONAI uses the initialisation.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from _workspace import BENCH_TRAINER, CONFIGURATION, DATASET, NN_BIN, NNUNET_ID, Workspace
from bench_train import _guarded, _summary, write_architecture
from common import OUR_CLI, Record, alternate, nnunet_device, our_env, ref_env
from peak_rss import measure

HERE = Path(__file__).resolve().parent
CASES = {False: 20, True: 2}
SIDES = {"reference": "nnUNetv2_predict -device {}", "monai": "MONAI sliding_window_inference (gaussian, 0.5)"}


def run(args: Any) -> list[Record]:
    ws = args.workspace
    names = [f"predict_{what}_{tta}" for tta in ("tta", "no_tta") for what in ("seconds_per_case", "peak_rss")]
    if not ws.source.is_dir():
        reference = SIDES["reference"].format(nnunet_device(args.device))
        return [Record(n, "", None, None, reference, "lower", note=f"{ws.source} is absent") for n in names]
    return _run(args, ws, _prepare(args, ws))


def _prepare(args: Any, ws: Workspace) -> tuple[Path, list[str], dict[str, str], str]:
    """Fold-0 models of both systems, image folders, the architecture file; returns (folder, cases, env, problem)."""
    tmp = ws.root / "predict"
    shutil.rmtree(tmp, ignore_errors=True)
    work = ws.our_model()
    cases = ws.splits[0]["val"][:CASES[bool(args.quick)]]
    for folder, name in ((tmp / "images", "{}.nii.gz"), (tmp / "images_nnunet", "{}_0000.nii.gz")):
        folder.mkdir(parents=True)
        for cid in cases:
            (folder / name.format(cid)).symlink_to(ws.data / "imagesTr" / f"{cid}.nii.gz")
    write_architecture(work / "plans.json", tmp / "arch.json")
    problem, env = ws.nnunet_problem, {}
    if not problem:
        try:
            env = ws.nnunet_model()
        except (RuntimeError, OSError) as exc:
            problem = f"nnU-Net setup failed: {str(exc)[-1200:]}"
    return tmp, cases, env, problem


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


def _run(args: Any, ws: Workspace, prepared: tuple[Path, list[str], dict[str, str], str]) -> list[Record]:
    tmp, cases, env, problem = prepared
    n, workers, nn_bin, device = len(cases), ws.workers, NN_BIN, args.device
    records, reference = [], {side: name.format(nnunet_device(device)) for side, name in SIDES.items()}
    for tta in (True, False):
        tag = "tta" if tta else "no_tta"
        ours = [str(OUR_CLI), "predict", "-i", str(tmp / "images"), "-o", str(tmp / "out_ours"), "-m",
                str(ws.our_work), "-f", "0", "--device", device] + ([] if tta else ["--no-tta"])
        theirs = [str(nn_bin / "nnUNetv2_predict"), "-i", str(tmp / "images_nnunet"), "-o", str(tmp / "out_nnunet"),
                  "-d", str(NNUNET_ID), "-c", CONFIGURATION, "-f", "0", "-tr", BENCH_TRAINER, "-device",
                  nnunet_device(device), "-npp", workers, "-nps", workers] + ([] if tta else ["--disable_tta"])
        monai = [str(nn_bin / "python"), str(HERE / "_predict_monai.py"), "--images", str(tmp / "images"), "--out",
                 str(tmp / "out_monai"), "--arch", str(tmp / "arch.json"), "--device", device]
        monai += ["--tta"] if tta else []
        sides = {"decathlete": _guarded(lambda c=ours: _timed(c, our_env(), tmp / "out_ours", n))}
        if not problem:
            sides["reference"] = _guarded(lambda c=theirs: _timed(c, env, tmp / "out_nnunet", n))
        if (nn_bin / "python").exists():
            sides["monai"] = _guarded(lambda c=monai: _timed(c, ref_env(), tmp / "out_monai", n))
        runs = alternate(sides, args.repeats)
        runs.setdefault("reference", [{"error": problem}])
        runs.setdefault("monai", [{"error": ws.nnunet_problem or "not run"}])
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
