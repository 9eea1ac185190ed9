"""Writing a run's predictions into an output folder: resumable, atomic, with provenance and the cost of each case.

One implementation for every kind of predictor (a configuration's folds, an ensemble of configurations), so all of
them skip the cases they already wrote, refuse (or redo) the outputs another run made
(`decathlete.infer.provenance`), write the label map last and atomically (its presence means "done"), collect failed
cases and report them after the others, and write ``efficiency.json``. The predictor supplies one function that
segments a case; everything about the folder is here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from decathlete.errors import CasesFailed
from decathlete.infer.cases import output_ending
from decathlete.infer.efficiency import phase
from decathlete.infer.provenance import Provenance
from decathlete.io.atomic import is_temporary_of, write_atomic
from decathlete.io.images import Geometry, write_image
from decathlete.metrics.efficiency import write_efficiency

# (image files, case id, return probabilities, phase seconds to fill, progress) -> (label, probabilities, geometry)
PredictFn = Callable[[Sequence[Path], str, bool, dict[str, float] | None, bool],
                     tuple[np.ndarray, np.ndarray | None, Geometry]]


class Meter(Protocol):
    """What `write_predictions` needs of an efficiency meter (`decathlete.infer.efficiency.EfficiencyMeter`)."""

    def case(self, record: dict[str, Any]) -> Any: ...

    def run_record(self, **about: Any) -> dict[str, Any]: ...


def write_predictions(cases: Mapping[str, Sequence[Path]], output_dir: str | Path, predict: PredictFn, *,
                      description: Mapping[str, Any], context: Mapping[str, Any], class_values: Sequence[int],
                      meter: Meter, about: Mapping[str, Any], overwrite: bool = False,
                      save_probabilities: bool = False, progress: bool = True,
                      on_conflict: str = "refuse") -> dict[str, Any]:  # fmt: skip
    """Predict ``cases`` (case id -> image files) into ``output_dir/<case><ending>``, skipping finished ones.

    Args:
        predict: segments one case (`PredictFn`).
        description: what makes this run's label maps what they are (the provenance identity).
        context: recorded with the run but no part of its identity (model folder, folds left out ...).
        class_values: the label (or region order) of each probability channel, saved with the probabilities.
        meter: measures each case; ``about`` goes into its run record.
        overwrite: predict cases whose output exists again.
        save_probabilities: also write ``<case>.npz`` (float16 ``probabilities`` (K, z, y, x) on the input grid and
            ``class_values``); a case whose npz is missing is predicted again.
        on_conflict: ``"refuse"`` outputs another run made (``FileExistsError`` with the fix), or ``"redo"`` them.

    Returns:
        ``{"n_cases", "n_done", "n_skipped", "seconds", "case_seconds", "outputs", "efficiency"}``.

    Raises:
        FileExistsError: outputs of another run, with ``on_conflict="refuse"``. CasesFailed: after the other cases
            are written, naming the cases that failed.
    """
    start = time.perf_counter()
    output_dir = Path(output_dir)
    cases = {cid: [Path(p) for p in paths] for cid, paths in cases.items()}
    targets = {cid: output_dir / f"{cid}{output_ending(paths[0])}" for cid, paths in cases.items()}
    output_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(output_dir, {p.name for p in targets.values()} | {f"{cid}.npz" for cid in cases})
    provenance = Provenance(output_dir, description, context)
    existing = [cid for cid in cases if targets[cid].exists()]
    conflicts = {} if overwrite else provenance.conflicts(existing)
    if conflicts and on_conflict == "refuse":
        raise FileExistsError(
            f"{output_dir} already holds predictions of {len(conflicts)} of these cases (e.g. "
            f"{next(iter(conflicts))}) made with another model or settings ({provenance.explain(conflicts)}); "
            "predict into another folder (-o), or replace them with --overwrite")
    npz_missing = {cid: save_probabilities and not (output_dir / f"{cid}.npz").exists() for cid in cases}
    todo = [cid for cid in cases if overwrite or npz_missing[cid] or cid in conflicts or cid not in existing]
    seconds, failed, costs = {}, {}, {}
    for cid in tqdm(todo, desc="predict", unit="case", disable=not progress or not todo):
        t0 = time.perf_counter()
        try:
            with meter.case(cost := {}) as phases:  # a large case takes minutes: a bar over its tiles too
                label, full, geometry = predict(cases[cid], cid, save_probabilities, phases, progress)
                provenance.record(cid)  # before the label map: an entry without one is simply redone
                with phase(phases, "export"):
                    if full is not None:
                        save_probability_file(output_dir / f"{cid}.npz", full, class_values)
                    write_image(label, geometry, targets[cid], dtype=label.dtype)  # last: it means "done"
        except Exception as exc:  # the other cases go on; Ctrl-C (not an Exception) stops at once
            failed[cid] = f"{type(exc).__name__}: {exc}"
            continue
        seconds[cid], costs[cid] = time.perf_counter() - t0, cost
    efficiency = write_efficiency(output_dir, meter.run_record(**about), costs) if costs else None
    if failed:
        raise CasesFailed(failed, len(todo), output_dir)
    return {"n_cases": len(cases), "n_done": len(todo), "n_skipped": len(cases) - len(todo),
            "seconds": time.perf_counter() - start, "case_seconds": seconds,
            "outputs": {cid: str(t) for cid, t in targets.items()}, "efficiency": efficiency}


def _remove_stale_temporaries(output_dir: Path, finals: set[str]) -> None:
    """Temporaries a killed run left, of our own file names only."""
    for stale in output_dir.glob(".tmp-*"):
        if stale.is_file() and any(is_temporary_of(stale, n) for n in finals):
            stale.unlink(missing_ok=True)


def save_probability_file(path: Path, probabilities: np.ndarray, class_values: Sequence[int]) -> None:
    """Write ``<case>.npz`` atomically: ``probabilities`` (K, z, y, x) as given (float16) and ``class_values``."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: numpy would append ".npz" to a temporary's name
            np.savez_compressed(f, probabilities=probabilities, class_values=np.asarray(class_values))

    write_atomic(path, write)


def load_probability_file(path: str | Path) -> tuple[np.ndarray, list[int]]:
    """``(probabilities float32 (K, z, y, x), class_values)`` of a ``<case>.npz`` written by `save_probability_file`."""
    with np.load(path) as data:
        return data["probabilities"].astype(np.float32), [int(v) for v in data["class_values"]]
