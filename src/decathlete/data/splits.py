"""Cross-validation splits: a user's ``splits.json`` wins; otherwise a seeded k-fold split written to the work folder.

The file format is nnU-Net's: a list of ``{"train": [ids], "val": [ids]}``, one entry per fold. Fold ``all``
(`decathlete.data.folds`) is nnU-Net's: every case of the splits is both its training and its validation set.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from decathlete.data.folds import ALL, EVERY, Fold, FoldSpec
from decathlete.io.atomic import write_json_atomic
from decathlete.planning.plans import Plans

DEFAULT_FOLDS = 5
SPLIT_SEED = 12345


def make_splits(case_ids: Sequence[str], n_folds: int = DEFAULT_FOLDS, seed: int = SPLIT_SEED) -> list[dict]:
    """Shuffle the sorted ids with ``seed`` and cut them into ``n_folds`` validation sets of near-equal size.

    With a single case it is both the training and the validation set (a smoke test, not an evaluation).
    """
    ids = sorted(case_ids)
    if len(ids) == 1:
        return [{"train": ids, "val": ids}]
    n_folds = min(n_folds, len(ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = []
    for val_idx in np.array_split(order, n_folds):
        val = sorted(ids[i] for i in val_idx)
        folds.append({"train": [i for i in ids if i not in set(val)], "val": val})
    return folds


def load_or_create_splits(workdir: str | Path, case_ids: Sequence[str], user_splits: list[dict] | None = None,
                          n_folds: int = DEFAULT_FOLDS) -> list[dict]:
    """The user's splits if given, else ``WORKDIR/splits.json`` if present, else new seeded splits saved there."""
    if user_splits:
        return user_splits
    path = Path(workdir) / "splits.json"
    if path.is_file():
        return json.loads(path.read_text())
    splits = make_splits(case_ids, n_folds)
    write_json_atomic(path, splits)
    return splits


def preprocessed_ids(workdir: str | Path, plans: Plans) -> list[str]:
    """Every case preprocessed for any configuration of the plans (the ids the splits cover)."""
    from decathlete.preprocess.cache import list_cases

    ids: set[str] = set()
    for config in plans.configurations.values():
        folder = Path(workdir) / "preprocessed" / config.data_identifier
        if folder.is_dir():
            ids.update(list_cases(folder))
    if not ids:
        raise FileNotFoundError(f"no preprocessed cases under {Path(workdir) / 'preprocessed'}; run "
                                f"`decathlete preprocess {workdir}` first")
    return sorted(ids)


def missing_preprocessed(workdir: str | Path, data_identifier: str, case_ids: Sequence[str]) -> list[str]:
    """The ids among ``case_ids`` without a complete case in ``WORKDIR/preprocessed/<data_identifier>``."""
    from decathlete.preprocess.cache import list_cases

    have = set(list_cases(Path(workdir) / "preprocessed" / data_identifier))
    return sorted(set(case_ids) - have)


def check_fold_preprocessed(workdir: str | Path, data_identifier: str, configuration: str, fold: Fold,
                            split: dict[str, list[str]]) -> None:
    """Every case of the fold must be preprocessed for the configuration, before anything is trained on it.

    Raises:
        FileNotFoundError: naming how many cases lack, one of them, and the ``decathlete preprocess`` command.
    """
    cases = sorted(set(split["train"]) | set(split["val"]))
    missing = missing_preprocessed(workdir, data_identifier, cases)
    if missing:
        raise FileNotFoundError(
            f"fold {fold} of '{configuration}': {len(missing)} of its {len(cases)} cases are not preprocessed in "
            f"{Path(workdir) / 'preprocessed' / data_identifier} (e.g. {missing[0]}); run "
            f"`decathlete preprocess {workdir} -c {configuration}` first")


def fold_split(workdir: str | Path, plans: Plans, fold: Fold) -> dict[str, list[str]]:
    """``{"train": [...], "val": [...]}`` of one fold (the splits are created when missing); fold ``"all"``: every
    case of the splits in both, as nnU-Net's ``do_split`` for fold ``all``."""
    splits = load_or_create_splits(workdir, preprocessed_ids(workdir, plans), plans.dataset.get("splits"))
    if fold == ALL:
        every = sorted({case for split in splits for part in ("train", "val") for case in split[part]})
        return {"train": every, "val": list(every)}
    if not 0 <= fold < len(splits):
        raise ValueError(f"fold {fold} does not exist: the splits have folds 0..{len(splits) - 1} (and 'all', one "
                         "model trained on every case)")
    return splits[fold]


def fold_count(workdir: str | Path) -> int:
    """Number of cross-validation folds of the work folder's splits (created when missing)."""
    plans = Plans.load(Path(workdir) / "plans.json")
    return len(load_or_create_splits(workdir, preprocessed_ids(workdir, plans), plans.dataset.get("splits")))


def expand_folds(workdir: str | Path, folds: FoldSpec) -> list[Fold]:
    """The folds to train (or draw patches for): ``"every"`` = each cross-validation fold of the splits."""
    return list(range(fold_count(workdir))) if folds == EVERY else list(folds)
