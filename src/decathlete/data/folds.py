"""Fold arguments of every verb: cross-validation folds by number, nnU-Net's ``all``, and ``every``.

* ``0``, ``1`` ...: a cross-validation fold of the splits (``fold_<k>``: trained on its training cases, validated on
  its held-out ones).
* ``all``: nnU-Net's fold ``all``: ONE model trained on every case of the splits and validated on the same cases
  (so it has no held-out case to score; folder ``fold_all``).
* ``every``: each cross-validation fold in turn (``train``, ``patches``), or every finished one (``predict``,
  ``crossval``). nnU-Net has no word for it (``nnUNetv2_predict`` defaults to ``-f 0 1 2 3 4``); ``all`` is not used
  for it because nnU-Net gives ``all`` the meaning above.

Several folds may be given (``-f 0 1 2``, ``-f 0 all``), as to ``nnUNetv2_predict``; ``every`` stands alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

ALL: Literal["all"] = "all"
EVERY: Literal["every"] = "every"

Fold = int | Literal["all"]
FoldSpec = list[Fold] | Literal["every"]

_WORDS = ("give fold numbers (0 1 2 ...), 'all' (one model trained on every case, nnU-Net's fold_all) or 'every' "
          "(each cross-validation fold)")


def _one(value: int | str) -> Fold | Literal["every"]:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"fold {value} is negative: {_WORDS}")
        return value
    text = str(value).strip()
    if text in (ALL, EVERY):
        return ALL if text == ALL else EVERY
    if text.isdigit():
        return int(text)
    raise ValueError(f"'{value}' is not a fold: {_WORDS}")


def parse_folds(values: int | str | Sequence[int | str] | None) -> FoldSpec:
    """Fold arguments (CLI words or Python values) as a list of folds, or `EVERY`.

    Args:
        values: one fold or several: fold numbers (int or digits), ``"all"``, or ``"every"`` alone;
            None = ``"every"``.

    Raises:
        ValueError: a word that is no fold, a negative number, a fold given twice, or ``every`` with other folds.
    """
    if values is None:
        return EVERY
    items = [values] if isinstance(values, (int, str)) else list(values)
    if not items:
        raise ValueError(f"no fold given: {_WORDS}")
    folds = [_one(v) for v in items]
    if EVERY in folds:
        if len(folds) > 1:
            raise ValueError("'every' already means each cross-validation fold: give it alone, or name the folds")
        return EVERY
    seen: set[Fold] = set()
    for fold in folds:
        if fold in seen:
            raise ValueError(f"fold {fold} is given twice")
        seen.add(fold)
    return folds  # type: ignore[return-value]  # EVERY was handled above


def single_fold(value: int | str) -> int:
    """One cross-validation fold number (``search`` scores its trials on one fold's held-out cases).

    Raises:
        ValueError: ``all`` (no held-out case), ``every`` (several folds) or a word that is no fold.
    """
    fold = _one(value)
    if fold == ALL:
        raise ValueError("fold 'all' trains on every case and holds none out to score: give one fold number")
    if fold == EVERY:
        raise ValueError("'every' is several folds: give one fold number")
    return int(fold)


def fold_name(fold: Fold) -> str:
    """The fold's folder name: ``fold_<k>`` or ``fold_all``."""
    return f"fold_{fold}"


def fold_of(name: str) -> Fold | None:
    """The fold a folder name stands for (``fold_3`` -> 3, ``fold_all`` -> ``"all"``); None for other names."""
    prefix, _, rest = name.partition("_")
    if prefix != "fold":
        return None
    if rest == ALL:
        return ALL
    return int(rest) if rest.isdigit() else None
