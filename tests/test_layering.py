"""The seams between stages hold: planning/ and infer/ import nothing from train/ (the training step reaches the
budget probe through the caller, and models are rebuilt from recipes and plans, not from trainer internals)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "decathlete"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("stage", ["planning", "infer", "recipes", "nets", "losses", "data", "preprocess", "io"])
def test_stage_does_not_import_the_trainer(stage: str) -> None:
    offenders = {f"{path.name}: {module}" for path in (PACKAGE / stage).glob("*.py") for module in _imports(path)
                 if module == "decathlete.train" or module.startswith("decathlete.train.")}
    assert not offenders, offenders
