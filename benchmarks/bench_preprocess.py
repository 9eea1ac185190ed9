"""Preprocessing: seconds per case and peak memory, ``decathlete preprocess`` vs ``nnUNetv2_preprocess``.

Both sides preprocess the 3d_fullres configuration of ../shared/data/Task04_Hippocampus with the same number of
worker processes, starting from an empty output folder each time. Planning (and nnU-Net's dataset conversion and
fingerprint) happens once beforehand and is not timed. decathlete's time includes its full validation pass, which
every verb runs first; nnU-Net's does not verify the dataset unless asked. Memory is the peak of the summed RSS of
the process tree, and the peak summed PSS (shared pages split between the processes that map them) from a separate
run with PSS sampling, which is slower: RSS double-counts copy-on-write pages of forked workers, and nnU-Net forks
a pool of 12 processes just to list files, so its RSS peak overstates what it really holds. PSS is the fair figure.
The dataset and both plans come from the run's shared ``Workspace`` (``--quick``: its first 20 cases), which the last
runs here leave fully preprocessed for the benchmarks after this one.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

from _workspace import CONFIGURATION, DATASET, NN_BIN, NNUNET_ID
from common import OUR_CLI, Record, alternate, median_of
from peak_rss import measure

SIDES = ("decathlete", "nnunet")


def _measured(cmd: list[str], env: dict[str, str] | None = None, pss: bool = False) -> dict[str, float]:
    result = measure(cmd, env=env, pss=pss)
    if result["returncode"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {result['returncode']}")
    return result


def run(args: Any) -> list[Record]:
    ws = args.workspace
    if not ws.source.is_dir():
        note = f"{ws.source} is absent"
        names = ("preprocess_seconds_per_case", "preprocess_peak_memory_pss", "plan_and_preprocess_seconds_per_case")
        return [Record(n, "", None, None, "nnUNetv2_preprocess", "lower", note=note) for n in names]
    n_cases, workers, decathlete = len(ws.case_ids), ws.workers, str(OUR_CLI)
    data, work = ws.data, ws.our_plan()
    problem = ws.nnunet_problem
    env = ws.nnunet_planned() if not problem else {}

    def ours(pss: bool = False) -> dict[str, float]:
        shutil.rmtree(work / "preprocessed", ignore_errors=True)
        return _measured([decathlete, "preprocess", str(work), "-c", CONFIGURATION, "-j", workers], pss=pss)

    def theirs(pss: bool = False) -> dict[str, float]:
        shutil.rmtree(ws.nnunet_pre / f"nnUNetPlans_{CONFIGURATION}", ignore_errors=True)
        return _measured([str(NN_BIN / "nnUNetv2_preprocess"), "-d", str(NNUNET_ID), "-c", CONFIGURATION,
                          "-np", workers], env, pss=pss)

    def ours_all() -> dict[str, float]:
        shutil.rmtree(work, ignore_errors=True)
        chain = (f"{decathlete} plan {data} -o {work} -j {workers} && "
                 f"{decathlete} preprocess {work} -c {CONFIGURATION} -j {workers}")
        return _measured(["sh", "-c", chain])

    def theirs_all() -> dict[str, float]:
        shutil.rmtree(ws.nnunet_pre, ignore_errors=True)
        return _measured([str(NN_BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(NNUNET_ID), "-c", CONFIGURATION,
                          "-np", workers, "-npfp", workers], env)

    def both(mine: Callable[[], dict], reference: Callable[[], dict]) -> dict[str, Callable[[], dict]]:
        return {"decathlete": mine, **({} if problem else {"nnunet": reference})}  # alone: still measured

    runs = alternate(both(ours, theirs), args.repeats)
    whole = alternate(both(ours_all, theirs_all), args.repeats)
    memory = alternate(both(lambda: ours(pss=True), lambda: theirs(pss=True)), 1)
    note = (f"{ws.describe()} of {DATASET}, {CONFIGURATION}, {args.workers} workers; decathlete includes its "
            "validation pass" + (f"; nnU-Net not run: {problem}" if problem else ""))
    rss = {side: round(median_of(runs[side], "peak_rss_mb"), 1) if side in runs else None for side in SIDES}
    per_case = {side: median_of(runs[side], "wall_s") / n_cases if side in runs else None for side in SIDES}
    whole_per_case = {side: median_of(whole[side], "wall_s") / n_cases if side in whole else None for side in SIDES}
    pss = {side: memory[side][0]["peak_pss_mb"] if side in memory else None for side in SIDES}
    return [
        Record("preprocess_seconds_per_case", "s/case", per_case["decathlete"], per_case["nnunet"],
               "nnUNetv2_preprocess", "lower", {"cases": n_cases, "workers": args.workers, "runs": runs}, note),
        Record("preprocess_peak_memory_pss", "MB", pss["decathlete"], pss["nnunet"], "nnUNetv2_preprocess", "lower",
               {"peak_tree_rss_mb_median": rss, "pss_runs": memory},
               note + f"; peak tree RSS (double-counts forked pages): decathlete {rss['decathlete']} MB, "
                      f"nnU-Net {rss['nnunet'] or '—'} MB"),
        Record("plan_and_preprocess_seconds_per_case", "s/case", whole_per_case["decathlete"],
               whole_per_case["nnunet"], "nnUNetv2_plan_and_preprocess", "lower",
               {"runs": whole}, f"validate + fingerprint + plan + preprocess {CONFIGURATION} of {n_cases} cases, "
                                f"{args.workers} workers (`decathlete plan && decathlete preprocess` vs "
                                "`nnUNetv2_plan_and_preprocess -c 3d_fullres -np/-npfp`)"
                                + (f"; nnU-Net not run: {problem}" if problem else "")),
    ]

