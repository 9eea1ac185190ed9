"""What produced each prediction in an output folder (``OUT/provenance.json``), so that a rerun skips only what the
same model with the same settings already wrote.

A run is described by its model (fold names, checkpoint contents), configuration, recipe and the settings that
change a label map (mirroring axes, step, tile weighting, whole-volume inference, postprocessing). Its record also
keeps context that is not part of that identity: where the model folder was and which unfinished folds were left
out (a moved model, or a fold that another process is still training, makes the same label maps).
Each case's entry is written before its label map (which is written last, atomically): a kill between the two leaves
an entry without a label map, which the next run simply predicts. A label map whose entry names another run, or that
has no entry, was made by something else: ``predict`` refuses it with the fix, and ``crossval``, which owns its
validation folders, predicts it again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from decathlete.io.atomic import write_json_atomic

PROVENANCE_FILE = "provenance.json"


def file_digest(path: Path) -> str:
    """SHA-256 of a file (a checkpoint: retrained or replaced weights change it, a copy does not)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def run_key(description: Mapping[str, Any]) -> str:
    """A short stable id of a run description."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:12]


class Provenance:
    """The provenance file of one output folder."""

    def __init__(self, output_dir: Path, description: Mapping[str, Any],
                 context: Mapping[str, Any] | None = None) -> None:
        """``description`` identifies the run; ``context`` (keys other than the description's) is recorded with
        it, as of the latest run with that identity."""
        self.path = Path(output_dir) / PROVENANCE_FILE
        self.description = json.loads(json.dumps(description, sort_keys=True))
        self.context = json.loads(json.dumps(dict(context or {}), sort_keys=True))
        self.key = run_key(self.description)
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.runs: dict[str, Any] = data.get("runs", {})
        self.cases: dict[str, str] = data.get("cases", {})

    def made_here(self, case: str) -> bool:
        return self.cases.get(case) == self.key

    def conflicts(self, existing: Sequence[str]) -> dict[str, str | None]:
        """Cases with an output that another run (its key), or an unknown one (None), produced."""
        return {case: self.cases.get(case) for case in existing if not self.made_here(case)}

    def explain(self, conflicts: Mapping[str, str | None]) -> str:
        """What differs between this run and the one that made the first conflicting output."""
        other_key = next(iter(conflicts.values()))
        other = self.runs.get(other_key) if other_key else None
        if other is None:
            return "made by an unknown run (no provenance entry)"
        changed = [f"{k}: {json.dumps(other.get(k))} -> {json.dumps(v)}" for k, v in self.description.items()
                   if other.get(k) != v]
        return "; ".join(changed) or "another run"

    def record(self, case: str) -> None:
        """Note that this run is writing ``case`` (before its label map is written)."""
        self.cases[case] = self.key
        self.runs[self.key] = {**self.description, **self.context}
        write_json_atomic(self.path, {"runs": self.runs, "cases": self.cases})
