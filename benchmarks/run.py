"""``make bench``: run the side-by-side benchmarks and write ``benchmarks/results/latest.{json,md}``.

    python benchmarks/run.py [--only preprocess] [--quick] [--repeats 3] [--workers 2] [--device cuda]

``--device cuda`` runs training and prediction of both sides on the GPU and writes to ``benchmarks/results/gpu/``
(preprocessing and augmentation run on the CPU in both systems, whatever the device).

Reference systems (nnU-Net v2 ...) run from the separate environment ``.venv-bench`` that ``make bench`` creates;
they are never dependencies of the package. The hippocampus benchmarks share one prepared dataset per run
(``_workspace.Workspace``: plans, preprocessed data and models of both systems), made when first needed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_accuracy  # noqa: E402
import bench_augment  # noqa: E402
import bench_memory  # noqa: E402
import bench_predict  # noqa: E402
import bench_preprocess  # noqa: E402
import bench_recipes  # noqa: E402
import bench_train  # noqa: E402
from _workspace import Workspace  # noqa: E402
from common import REPO, check_device, git_commit, machine, now  # noqa: E402

BENCHMARKS = {"preprocess": bench_preprocess.run, "augment": bench_augment.run, "train_step": bench_train.run,
              "predict": bench_predict.run, "accuracy_at_budget": bench_accuracy.run,
              "memory_large_volume": bench_memory.run, "recipes_at_budget": bench_recipes.run}


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _runs(repeats: int) -> str:
    return f"median of {repeats}" if repeats > 1 else "one run"


def write_results(records: list, out_dir: Path, args: argparse.Namespace) -> None:
    """Merge this run's records into latest.json (a record of another benchmark keeps its own date and commit)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = {"machine": machine(args.device), "date": now(), "git_commit": git_commit(), "quick": args.quick,
             "repeats": args.repeats, "workers": args.workers}
    path = out_dir / "latest.json"
    kept = json.loads(path.read_text()).get("records", []) if path.is_file() else []
    fresh = [{**stamp, **r.to_dict()} for r in records]
    for r in fresh:
        r["repeats"] = r["repeats"] or args.repeats
    names = {r["name"] for r in fresh}
    merged = [r for r in kept if r["name"] not in names and "date" in r] + fresh
    path.write_text(json.dumps({"machine": stamp["machine"], "records": merged}, indent=2))
    where = stamp["machine"].get("gpu", f"{stamp['machine']['cores']} cores, {stamp['machine']['cpu']}")
    lines = [f"# Benchmarks ({where}, --device {args.device})", "",
             "| benchmark | unit | decathlete | reference | reference system | ratio | better | date | commit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in merged:
        lines.append(f"| {r['name']} | {r['unit']} | {fmt(r['decathlete'])} | {fmt(r['reference'])} | "
                     f"{r['reference_name']} | {fmt(r['ratio'])} | {r['better']} | {r['date'][:10]} | "
                     f"{r['git_commit']}{' (quick)' if r['quick'] else ''} |")
    notes = [f"- **{r['name']}** ({_runs(r['repeats'])}): {r['note']}" for r in merged if r["note"]]
    (out_dir / "latest.md").write_text("\n".join(lines + ([""] + notes if notes else [])) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="fewer cases, for a run of a few minutes")
    parser.add_argument("--repeats", type=int, help="alternating repeats per side, median reported (default 3; "
                        "--quick: 1)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes, the same for both sides")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: where training and prediction run")
    parser.add_argument("--out-dir", type=Path, help="default benchmarks/results, or benchmarks/results/gpu with cuda")
    parser.add_argument("--datasets", nargs="+", metavar="TASK", choices=list(bench_accuracy.DATASETS),
                        help="accuracy_at_budget: datasets (default both: the hippocampus and Task106 CT)")
    parser.add_argument("--budgets", type=float, nargs="+", metavar="MIN",
                        help="accuracy_at_budget: training budgets in minutes (default 10 20 40; --quick: 0.5); "
                        "recipes_at_budget: the first of them (default 5; --quick: 0.5)")
    args = parser.parse_args()
    try:
        args.device = check_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.out_dir is None:
        args.out_dir = REPO / "benchmarks" / "results" / ("gpu" if args.device != "cpu" else "")
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    records = []
    args.workspace = Workspace(Path(tempfile.mkdtemp(prefix="decathlete-bench-")), args.quick, args.workers,
                               args.device)
    try:
        for name in names:
            print(f"== {name}", flush=True)
            start = time.perf_counter()
            records += BENCHMARKS[name](args)
            print(f"== {name}: {time.perf_counter() - start:.0f} s", flush=True)
    finally:
        args.workspace.close()
    write_results(records, args.out_dir, args)
    print((args.out_dir / "latest.md").read_text())


if __name__ == "__main__":
    main()
