"""Atomic file writes: write a hidden temporary in the same folder, then ``os.replace`` it over the target.

Readers never see half a file, and a killed process leaves at most a temporary (``.tmp-<pid>-<token>-<name>``)
that :func:`is_temporary_of` recognises for clean-up. The temporary keeps the final name at its end so libraries
that pick the format from the suffix (nibabel's ``.nii.gz``, blosc2's ``.b2nd``) still do.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"


def temporary_path(path: Path) -> Path:
    """A unique hidden sibling of ``path`` whose name ends with ``path.name``."""
    return path.with_name(f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{path.name}")


def is_temporary_of(candidate: Path, final_name: str | None = None) -> bool:
    """Whether ``candidate`` is a temporary of :func:`temporary_path` (for ``final_name``, when given)."""
    name = candidate.name
    if not name.startswith(TMP_PREFIX):
        return False
    parts = name[len(TMP_PREFIX):].split("-", 2)
    return len(parts) == 3 and (final_name is None or parts[2] == final_name)


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temporary)``, then move the temporary over ``path``; on any failure remove it and re-raise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any, default: Callable[[Any], Any] | None = None,
                      indent: int = 2) -> None:
    """Serialise ``obj`` first (a serialisation error leaves nothing behind), then write it atomically."""
    text = json.dumps(obj, indent=indent, default=default)

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    write_atomic(path, write)
