"""Preprocessing: seconds per case and peak memory, ``decathlete preprocess`` vs ``nnUNetv2_preprocess``.

Both sides preprocess the 3d_fullres configuration of ../shared/data/Task04_Hippocampus with the same number of
worker processes, starting from an empty output folder each time. Planning (and nnU-Net's dataset conversion and
fingerprint) happens once beforehand and is not timed. decathlete's time includes its full validation pass, which
every verb runs first; nnU-Net's does not verify the dataset unless asked. Memory is the peak of the summed RSS of
the process tree, and the peak summed PSS (shared pages split between the processes that map them) from a separate
run with PSS sampling, which is slower: RSS double-counts copy-on-write pages of forked workers, and nnU-Net forks
a pool of 12 processes just to list files, so its RSS peak overstates what it really holds. PSS is the fair figure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from common import BENCH_VENV, REPO, SHARED_DATA, Record, alternate, median_of
from peak_rss import measure

DATASET = "Task04_Hippocampus"
NNUNET_ID = 4
QUICK_CASES = 40


def subset_dataset(src: Path, dst: Path, n: int) -> Path:
    """Copy the first ``n`` training cases (outside the repository) so both systems see the same subset."""
    meta = json.loads((src / "dataset.json").read_text())
    meta["training"], meta["test"] = meta["training"][:n], []
    meta["numTraining"], meta["numTest"] = n, 0
    for entry in meta["training"]:
        for key in ("image", "label"):
            target = dst / entry[key]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / entry[key], target)
    (dst / "dataset.json").write_text(json.dumps(meta, indent=2))
    (dst / "imagesTs").mkdir(exist_ok=True)  # nnUNetv2_convert_MSD_dataset asserts that it exists
    return dst


def _check(cmd: list[str], env: dict[str, str] | None = None) -> None:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def _measured(cmd: list[str], env: dict[str, str] | None = None, pss: bool = False) -> dict[str, float]:
    result = measure(cmd, env=env, pss=pss)
    if result["returncode"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {result['returncode']}")
    return result


def run(args: Any) -> list[Record]:
    src = SHARED_DATA / DATASET
    if not src.is_dir():
        note = f"{src} is absent"
        return [Record("preprocess_seconds_per_case", "s/case", None, None, "nnUNetv2_preprocess", "lower", note=note)]
    tmp = Path(tempfile.mkdtemp(prefix="decathlete-bench-preprocess-"))
    try:
        return _run(args, src, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(args: Any, src: Path, tmp: Path) -> list[Record]:
    data = subset_dataset(src, tmp / DATASET, QUICK_CASES // 2) if args.quick else src
    n_cases = len(json.loads((data / "dataset.json").read_text())["training"])
    workers = str(args.workers)
    decathlete = str(REPO / ".venv" / "bin" / "decathlete")
    work = tmp / "decathlete"
    _check([decathlete, "plan", str(data), "-o", str(work), "-j", workers])
    nn_bin = BENCH_VENV / "bin"
    env = {**os.environ, "nnUNet_raw": str(tmp / "nnunet_raw"), "nnUNet_preprocessed": str(tmp / "nnunet_pre"),
           "nnUNet_results": str(tmp / "nnunet_results")}
    _check([str(nn_bin / "nnUNetv2_convert_MSD_dataset"), "-i", str(data), "-overwrite_id", str(NNUNET_ID),
            "-np", workers], env)
    _check([str(nn_bin / "nnUNetv2_extract_fingerprint"), "-d", str(NNUNET_ID), "-np", workers], env)
    _check([str(nn_bin / "nnUNetv2_plan_experiment"), "-d", str(NNUNET_ID)], env)
    nn_out = next((tmp / "nnunet_pre").glob(f"Dataset{NNUNET_ID:03d}_*"))

    def ours(pss: bool = False) -> dict[str, float]:
        shutil.rmtree(work / "preprocessed", ignore_errors=True)
        return _measured([decathlete, "preprocess", str(work), "-c", "3d_fullres", "-j", workers], pss=pss)

    def theirs(pss: bool = False) -> dict[str, float]:
        shutil.rmtree(nn_out / "nnUNetPlans_3d_fullres", ignore_errors=True)
        return _measured([str(nn_bin / "nnUNetv2_preprocess"), "-d", str(NNUNET_ID), "-c", "3d_fullres",
                          "-np", workers], env, pss=pss)

    def ours_all() -> dict[str, float]:
        shutil.rmtree(work, ignore_errors=True)
        chain = (f"{decathlete} plan {data} -o {work} -j {workers} && "
                 f"{decathlete} preprocess {work} -c 3d_fullres -j {workers}")
        return _measured(["sh", "-c", chain])

    def theirs_all() -> dict[str, float]:
        shutil.rmtree(nn_out, ignore_errors=True)
        return _measured([str(nn_bin / "nnUNetv2_plan_and_preprocess"), "-d", str(NNUNET_ID), "-c", "3d_fullres",
                          "-np", workers, "-npfp", workers], env)

    runs = alternate({"decathlete": ours, "nnunet": theirs}, args.repeats)
    whole = alternate({"decathlete": ours_all, "nnunet": theirs_all}, args.repeats)
    memory = alternate({"decathlete": lambda: ours(pss=True), "nnunet": lambda: theirs(pss=True)}, 1)
    note = f"{n_cases} cases of {DATASET}, 3d_fullres, {args.workers} workers; decathlete includes its validation pass"
    rss = {side: median_of(r, "peak_rss_mb") for side, r in runs.items()}
    return [
        Record("preprocess_seconds_per_case", "s/case", median_of(runs["decathlete"], "wall_s") / n_cases,
               median_of(runs["nnunet"], "wall_s") / n_cases, "nnUNetv2_preprocess", "lower",
               {"cases": n_cases, "workers": args.workers, "runs": runs}, note),
        Record("preprocess_peak_memory_pss", "MB", memory["decathlete"][0]["peak_pss_mb"],
               memory["nnunet"][0]["peak_pss_mb"], "nnUNetv2_preprocess", "lower",
               {"peak_tree_rss_mb_median": rss, "pss_runs": memory},
               note + f"; peak tree RSS (double-counts forked pages): decathlete {rss['decathlete']:.0f} MB, "
                      f"nnU-Net {rss['nnunet']:.0f} MB"),
        Record("plan_and_preprocess_seconds_per_case", "s/case", median_of(whole["decathlete"], "wall_s") / n_cases,
               median_of(whole["nnunet"], "wall_s") / n_cases, "nnUNetv2_plan_and_preprocess", "lower",
               {"runs": whole}, f"validate + fingerprint + plan + preprocess 3d_fullres of {n_cases} cases, "
                                f"{args.workers} workers (`decathlete plan && decathlete preprocess` vs "
                                "`nnUNetv2_plan_and_preprocess -c 3d_fullres -np/-npfp`)"),
    ]
