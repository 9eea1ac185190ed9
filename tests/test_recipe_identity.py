"""Bit-identity guard for the built-in recipes: a short, seeded CPU training of ``default`` and ``tiny`` and one
prediction each must give the numbers recorded in ``tests/data/recipe_fingerprint.json``.

The record was made before the recipe contract was refactored (recipes, builders, the one training step); any later
change of arithmetic in sampling, augmentation, the network, the loss, the optimiser step, validation or inference
moves these numbers. On the machine that recorded them they are equal to the last bit (``python
tests/test_recipe_identity.py --check``); the test allows a relative 1e-5, which another CPU's kernels stay within
while any change of what is computed does not.

Re-record only for a deliberate numerical change, and say so in the commit: ``python tests/test_recipe_identity.py
--record``.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from decathlete import api
from decathlete.synthetic import make_synthetic_dataset

RECORD = Path(__file__).parent / "data" / "recipe_fingerprint.json"
SHAPE = (16, 40, 40)
# Measured with 2 threads instead of 1 (other reduction orders, as another CPU's kernels give): losses and weights
# moved by up to 2e-6 relative, the predicted probabilities' projection by 2.4e-5 (of its scale).
TOLERANCE = {"training": 1e-5, "prediction": 1e-4}
BIG_CASE = (24, 60, 60)  # larger than the planned patch: the prediction tiles with Gaussian weights


def _checksum(arrays: list[np.ndarray]) -> dict[str, float]:
    """Sum, sum of squares and a fixed random projection (in units of the norm, so about 1) over all arrays."""
    total = {"sum": 0.0, "sumsq": 0.0, "projection": 0.0}
    for array in arrays:
        flat = np.asarray(array, dtype=np.float64).ravel()
        weights = np.random.default_rng(flat.size).standard_normal(flat.size)
        total["sum"] += float(flat.sum())
        total["sumsq"] += float(flat @ flat)
        total["projection"] += float(flat @ weights)
    total["projection"] /= max(math.sqrt(total["sumsq"]), 1e-12)
    return total


def _fingerprint_recipe(root: Path, data: Path, big: Path, recipe: str) -> dict:
    from decathlete.infer.predictor import Predictor
    from decathlete.io.checkpoint import FINAL, load_checkpoint
    from decathlete.io.datasets import load_dataset

    work = root / recipe
    api.plan(data, work, recipe=recipe, workers=1, progress=False, configurations=["3d_fullres"])
    api.preprocess(work, ["3d_fullres"], workers=1, progress=False)
    [summary] = api.train(work, "3d_fullres", 0, epochs=2, iterations_per_epoch=3, val_iterations=2, device="cpu",
                          num_workers=0, progress=False, seed=0)
    saved = load_checkpoint(Path(summary["folder"]) / FINAL)
    history = saved["state"]["history"]
    model = saved["model"]
    predictions = {}
    for name, dataset, whole_volume in (("held_out", data, True), ("tiled", big, False)):
        case = load_dataset(dataset).training[-1]
        predictor = Predictor(work, "3d_fullres", [0], device="cpu", whole_volume=whole_volume)
        label, probabilities = predictor.predict_case(case.images, return_probabilities=True, case_id=case.id)
        predictions[name] = {"case": case.id, "label_counts": np.bincount(label.ravel().astype(np.int64)).tolist(),
                             "probabilities": _checksum([probabilities.astype(np.float32)])}
    return {
        "training": {
            "train_loss": history["train_loss"], "val_loss": history["val_loss"],
            "pseudo_dice_per_class": history["pseudo_dice_per_class"], "steps": saved["state"]["step"],
            "weights": _checksum([model[k].numpy() for k in sorted(model)]), "n_weight_tensors": len(model)},
        "prediction": predictions,
    }


def compute_fingerprint() -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            data = make_synthetic_dataset(root / "raw", n_cases=8, shape=SHAPE)
            big = make_synthetic_dataset(root / "big", n_cases=1, shape=BIG_CASE, seed=1)
            return {recipe: _fingerprint_recipe(root, data, big, recipe) for recipe in ("default", "tiny")}
    finally:
        torch.set_num_threads(threads)


def _compare(expected: object, actual: object, path: str, tol: float | None) -> list[str]:
    """Differences between the record and a new fingerprint; ``tol`` None = exact, else relative and absolute."""
    if isinstance(expected, dict):
        return [d for k in expected for d in _compare(expected[k], actual[k], f"{path}.{k}", tol)]
    if isinstance(expected, list):
        if len(expected) != len(actual):
            return [f"{path}: length {len(actual)} != {len(expected)}"]
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in _compare(e, a, f"{path}[{i}]", tol)]
    if isinstance(expected, float) and tol is not None:
        same = math.isclose(actual, expected, rel_tol=tol, abs_tol=tol)
    else:
        same = expected == actual
    return [] if same else [f"{path}: {actual!r} != recorded {expected!r}"]


def differences(recorded: dict, actual: dict, exact: bool) -> list[str]:
    return [d for recipe in recorded for part, tol in TOLERANCE.items()
            for d in _compare(recorded[recipe][part], actual[recipe][part], f"{recipe}.{part}", None if exact else tol)]


@pytest.mark.slow
def test_builtin_recipes_train_and_predict_as_recorded() -> None:
    recorded = json.loads(RECORD.read_text())
    found = differences(recorded, compute_fingerprint(), exact=False)
    assert not found, "\n".join(found)


if __name__ == "__main__":
    if sys.argv[1:] == ["--record"]:
        RECORD.parent.mkdir(parents=True, exist_ok=True)
        RECORD.write_text(json.dumps(compute_fingerprint(), indent=1) + "\n")
        print(f"wrote {RECORD}")
    elif sys.argv[1:] == ["--check"]:
        diffs = differences(json.loads(RECORD.read_text()), compute_fingerprint(), exact=True)
        print("\n".join(diffs) or "bit-identical to the record")
        sys.exit(1 if diffs else 0)
    else:
        sys.exit("usage: python tests/test_recipe_identity.py --record | --check")
