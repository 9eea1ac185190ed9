"""Options that several verbs of the command line share: ``-j/--workers``, ``--set``/``--set-file`` and ``--json``
(torch-free, so ``decathlete --help`` stays fast)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def workers(value: str) -> int:
    """``-j`` values: a whole number of processes, at least 1."""
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("workers must be >= 1")
    return n


def _override_file(path: str) -> list[str]:
    from decathlete.recipes.base import read_override_file
    from decathlete.recipes.schema import RecipeError

    try:
        return read_override_file(path)
    except RecipeError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_set(p: argparse.ArgumentParser, what: str) -> None:
    """``--set PATH=VALUE`` and ``--set-file FILE``, both into ``args.overrides`` in command-line order."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help=f"override a recipe field by its dotted name, repeatable (e.g. {what}); the value is JSON or "
                        "a plain string")
    p.add_argument("--set-file", dest="overrides", action="extend", type=_override_file, metavar="FILE",
                   help="overrides from a JSON object of dotted fields and values (e.g. a search's "
                        "best_overrides.json); applied in command-line order with --set")


def add_json(p: argparse.ArgumentParser, show: Callable[[Any, argparse.Namespace], int]) -> None:
    """``--json`` for a verb whose ``func`` returns a result and whose ``show`` prints it for people and returns the
    exit status (`decathlete.cli.main` calls them)."""
    p.add_argument("--json", action="store_true",
                   help="print the result as JSON on stdout (logs and the human summary go to stderr)")
    p.set_defaults(show=show)
