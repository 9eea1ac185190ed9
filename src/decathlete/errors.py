"""Errors the command line reports as one message, without a traceback (torch-free, so the CLI imports them cheaply)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


class CasesFailed(RuntimeError):
    """Some cases could not be predicted (the others were written): one line per failed case with its reason."""

    def __init__(self, failed: Mapping[str, str], n_todo: int, output_dir: Path) -> None:
        self.failed = dict(failed)
        lines = "".join(f"\n  {cid}: {err}" for cid, err in sorted(self.failed.items()))
        super().__init__(f"{len(failed)} of {n_todo} cases failed (the others are in {output_dir}):{lines}")


class ImageReadError(Exception):
    """A file (or DICOM folder) that exists in a supported format but cannot be read."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")
