"""The cascade end to end on a generated large CT, through the command line a user would type.

    python benchmarks/cascade_large_ct.py --root /tmp/cascade_ct [--cases 3] [--shape 160 320 320] [--budget 2m]

Writes ``--cases`` synthetic CT volumes (`_synthetic_ct.synthetic_ct`, int16 HU, 5 organs) and one new case, then:
``plan`` (for the CPU, a time budget per configuration) -> ``preprocess`` -> ``train -c 3d_lowres -f every`` ->
``crossval -c 3d_lowres`` (which writes the cascade's inputs) -> ``train -c 3d_cascade_fullres -f 0`` ->
``predict -c 3d_cascade_fullres -f 0`` of the new case (``--with-fullres``: 3d_fullres fold 0 trained for the same
budget and predicting it too, for comparison). It checks that the plan holds 2d, 3d_fullres, 3d_lowres and
3d_cascade_fullres and that the prediction carries the input's exact geometry, and records the Dice of both stages
on the new case (its reference is generated with it), the planned configurations and the time of every command in
``benchmarks/results/cascade_large_ct.json``. This is a check that the cascade works at full size on a CPU, not an
accuracy benchmark: every stage trains for ``--budget``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _synthetic_ct import ORGANS, RAW_NAME, _save, synthetic_ct  # noqa: E402
from common import OUR_CLI, REPO, git_commit, machine, now  # noqa: E402
from decathlete.io.atomic import write_json_atomic  # noqa: E402
from decathlete.io.images import read_geometry, read_label  # noqa: E402
from decathlete.metrics.overlap import overlap_metrics  # noqa: E402

PLANNED = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")


def make_dataset(root: Path, cases: int, shape: tuple[int, int, int]) -> tuple[Path, Path, Path]:
    """The raw dataset, the folder holding the new case, and the new case's reference."""
    raw = root / RAW_NAME
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(cases):
        image, label = synthetic_ct(shape, seed=i)
        _save(image, raw / "imagesTr" / f"ct_{i:03d}.nii.gz")
        _save(label, raw / "labelsTr" / f"ct_{i:03d}.nii.gz")
        training.append({"image": f"./imagesTr/ct_{i:03d}.nii.gz", "label": f"./labelsTr/ct_{i:03d}.nii.gz"})
    labels = {"0": "background", **{str(v[0]): name for name, v in ORGANS.items()}}
    (raw / "dataset.json").write_text(json.dumps({"name": "SyntheticCT", "modality": {"0": "CT"}, "labels": labels,
                                                  "numTraining": cases, "training": training}, indent=2))
    new, reference = root / "new", root / "reference"
    new.mkdir(exist_ok=True)
    reference.mkdir(exist_ok=True)
    image, label = synthetic_ct(shape, seed=1000)
    _save(image, new / "ct_new.nii.gz")
    _save(label, reference / "ct_new.nii.gz")
    return raw, new, reference / "ct_new.nii.gz"


def run(cmd: list[str], times: dict[str, float], name: str) -> None:
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    times[name] = round(time.perf_counter() - start, 1)


def organ_dice(prediction: Path, reference: Path) -> dict[str, float]:
    pred, ref = read_label(prediction)[0], read_label(reference)[0]
    return {name: round(float(overlap_metrics(pred == v[0], ref == v[0], (1, 1, 1))["dice"]), 4)
            for name, v in ORGANS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="scratch folder (emptied)")
    parser.add_argument("--cases", type=int, default=3, help="training volumes (at least 3: a fold each)")
    parser.add_argument("--shape", type=int, nargs=3, default=(160, 320, 320), help="volume shape (z, y, x)")
    parser.add_argument("--budget", default="2m", help="training time budget of each configuration")
    parser.add_argument("--workers", type=int, default=2, help="processes for preprocessing and scoring")
    parser.add_argument("--with-fullres", action="store_true",
                        help="also train 3d_fullres fold 0 for the budget and predict the new case with it")
    args = parser.parse_args()
    shutil.rmtree(args.root, ignore_errors=True)
    args.root.mkdir(parents=True)
    times: dict[str, float] = {}
    start = time.perf_counter()
    raw, new, reference = make_dataset(args.root, args.cases, tuple(args.shape))
    times["generate"] = round(time.perf_counter() - start, 1)
    work, cli, j = args.root / "work", str(OUR_CLI), str(args.workers)
    run([cli, "plan", str(raw), "-o", str(work), "--time-budget", args.budget, "--device", "cpu", "-j", j], times,
        "plan")
    plans = json.loads((work / "plans.json").read_text())
    missing = [c for c in PLANNED if c not in plans["configurations"]]
    if missing:
        raise SystemExit(f"the plan lacks {missing}")
    run([cli, "preprocess", str(work), "-j", j], times, "preprocess")
    run([cli, "train", str(work), "-c", "3d_lowres", "-f", "every"], times, "train_3d_lowres_every_fold")
    run([cli, "crossval", str(work), "-c", "3d_lowres", "-j", j], times, "crossval_3d_lowres")
    run([cli, "train", str(work), "-c", "3d_cascade_fullres", "-f", "0"], times, "train_3d_cascade_fullres_fold_0")
    compared = ("3d_lowres", "3d_cascade_fullres", *(("3d_fullres",) if args.with_fullres else ()))
    if args.with_fullres:
        run([cli, "train", str(work), "-c", "3d_fullres", "-f", "0"], times, "train_3d_fullres_fold_0")
    outputs = {}
    for config in compared:
        outputs[config] = args.root / f"predicted_{config}"
        run([cli, "predict", "-i", str(new), "-o", str(outputs[config]), "-m", str(work), "-c", config, "-f", "0"],
            times, f"predict_{config}_fold_0")
    geometry_in = read_geometry(new / "ct_new.nii.gz")[0]
    exact = {c: read_geometry(o / "ct_new.nii.gz")[0] == geometry_in for c, o in outputs.items()}
    if not all(exact.values()):
        raise SystemExit(f"a prediction does not carry the input's geometry: {exact}")
    record = {
        "what": "the 3d_lowres -> 3d_cascade_fullres cascade end to end on generated large CT (module docstring)",
        "command": " ".join(["python", "benchmarks/cascade_large_ct.py", *sys.argv[1:]]), "commit": git_commit(),
        "date": now(), "machine": machine("cpu"), "cases": args.cases, "shape": list(args.shape),
        "budget_per_configuration": args.budget,
        "planned": {n: {k: c[k] for k in ("spacing", "patch_size", "batch_size", "median_shape", "features_per_stage",
                                          "previous_stage", "training") if k in c}
                    for n, c in plans["configurations"].items()},
        "geometry_exact": exact, "seconds": times,
        "new_case_dice": {c: organ_dice(o / "ct_new.nii.gz", reference) for c, o in outputs.items()},
        "note": "each stage trained for the budget only; Dice on one generated case, a check, not an accuracy claim",
    }
    for config in record["new_case_dice"]:
        record["new_case_dice"][config]["mean"] = round(float(np.mean(list(record["new_case_dice"][config].values()))),
                                                        4)
    write_json_atomic(REPO / "benchmarks" / "results" / "cascade_large_ct.json", record)
    print(json.dumps({k: record[k] for k in ("geometry_exact", "seconds", "new_case_dice")}, indent=2))


if __name__ == "__main__":
    main()
