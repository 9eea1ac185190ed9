"""Cross-validation: predict every fold's held-out cases, score them, and choose the postprocessing on them.

``decathlete crossval WORKDIR -c CONFIG [-f FOLDS]`` after training (default: every cross-validation fold; each must
have finished training, since a score of some folds is not the cross-validation score; ``fold_all`` is refused: it
was trained on every case and holds none out). Each fold's model predicts the validation cases of
its split from the RAW images (exactly what ``predict`` does for new data: preprocessing, sliding window, TTA,
inversion, written with the input's geometry), so these scores are what a user gets, not the trainer's patch-based
pseudo-Dice. Writes, under ``WORKDIR/models/<config>/<recipe>/``:

* ``fold_<k>/validation/<case>.nii.gz`` and ``fold_<k>/validation/summary.json`` (+ CSV, box plots); with
  ``save_probabilities`` also ``fold_<k>/validation/<case>.npz`` (the probabilities on the input grid, as
  ``predict --save-probabilities`` writes them), which `decathlete.selection` needs to score ensembles;
* ``crossval/result.json``: the key figures, and whether every case's probabilities are saved;
* ``crossval/summary.json``: all folds' validation cases together;
* ``postprocessing.json`` (:mod:`decathlete.infer.postprocess`), which ``predict`` then applies, and, when a step
  was kept, ``crossval_postprocessed/`` with the postprocessed predictions and their ``summary.json``;
* for a configuration a cascade stage builds on (``3d_lowres``), once that stage's cases are preprocessed:
  ``predicted_next_stage/<data identifier>/``, the predictions on the cascade's grid it trains with
  (`decathlete.data.cascade`; otherwise its training writes them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from decathlete.data.cascade import prepare_previous_stage
from decathlete.data.folds import ALL, EVERY, fold_of, parse_folds
from decathlete.data.splits import fold_split
from decathlete.evaluate import evaluate_pairs
from decathlete.infer.models import resolve_fold_dirs, trained_folds, unfinished
from decathlete.infer.postprocess import (
    apply_postprocessing,
    choose_postprocessing,
    reported_only,
    save_postprocessing,
)
from decathlete.infer.predictor import load_predictor
from decathlete.io.atomic import write_json_atomic
from decathlete.io.checkpoint import FINAL
from decathlete.io.datasets import load_dataset
from decathlete.io.images import image_suffix, read_label, write_image
from decathlete.labels import LabelScheme
from decathlete.planning.plans import Plans
from decathlete.preprocess.cache import read_properties
from decathlete.recipes.base import Recipe

NO_POSTPROCESSING = ("the recipe allows no postprocessing (inference.postprocessing=false): the candidates are "
                     "reported, none is applied")


def cross_validate(workdir: str | Path, configuration: str = "3d_fullres",
                   folds: Sequence[int | str] | int | str = EVERY, *,
                   recipe: str | None = None, checkpoint: str = FINAL, device: str = "auto", tta: bool | None = None,
                   step: float | None = None, workers: int = 1, overwrite: bool = False, progress: bool = True,
                   whole_volume: bool = True, overrides: Sequence[str] = (),
                   save_probabilities: bool = False) -> dict[str, Any]:
    """Predict, score and choose postprocessing (module docstring); returns the key figures.

    ``tta``, ``step`` and ``overrides`` (``inference.*`` only) default to the model's recipe. ``save_probabilities``
    also writes each validation case's ``<case>.npz`` (a case predicted earlier without it is predicted again).

    Returns:
        ``{"folds", "n_cases", "mean", "foreground_mean", "postprocessing", "postprocessed_mean", "folder",
        "probabilities_saved"}`` (the last: every validation case has its ``.npz``).

    Raises:
        ValueError: fold ``all`` asked for. FileNotFoundError: a fold whose training did not finish (with the fixes).
    """
    workdir = Path(workdir)
    fold_dirs = _finished_folds(workdir, configuration, folds, recipe, checkpoint)
    root = fold_dirs[0].parent
    pairs: list[tuple[str, Path, Path]] = []
    for fold_dir in fold_dirs:
        fold = validate_fold(workdir, fold_dir, configuration, checkpoint=checkpoint, device=device, tta=tta,
                             step=step, workers=workers, overwrite=overwrite, progress=progress,
                             whole_volume=whole_volume, overrides=overrides,
                             save_probabilities=save_probabilities)
        pairs += fold.pairs
    labels, ignore = fold.labels, fold.ignore_label
    summary = evaluate_pairs(pairs, labels, workers=workers, output=root / "crossval" / "summary.json",
                             ignore_label=ignore, progress=progress)
    spec = choose_postprocessing([(p, r) for _, p, r in pairs], labels, ignore)
    if not fold.recipe.inference.postprocessing:
        spec = reported_only(spec, NO_POSTPROCESSING)
    spec["folds"] = [fold_of(d.name) for d in fold_dirs]
    save_postprocessing(spec, root)
    result = {"folds": spec["folds"], "n_cases": len(pairs), "mean": summary["mean"],
              "foreground_mean": summary["foreground_mean"], "postprocessing": {
                  k: spec[k] for k in ("foreground", "per_class", "mean_dice_before", "mean_dice_after")},
              "postprocessed_mean": None, "folder": str(root),
              "probabilities_saved": all(probability_file(p).is_file() for _, p, _ in pairs)}
    if spec["foreground"] or spec["per_class"]:
        scored = _score_postprocessed(pairs, spec, labels, root, workers, ignore, progress)
        result["postprocessed_mean"] = scored["mean"]
    result["next_stages"] = write_next_stage_inputs(workdir, root, configuration, [cid for cid, _, _ in pairs])
    write_json_atomic(root / "crossval" / "result.json", result)
    return result


def write_next_stage_inputs(workdir: Path, root: Path, configuration: str, case_ids: list[str]) -> dict[str, str]:
    """Cascade stage -> the folder of its inputs written from these predictions (module docstring); stages whose
    cases are not all preprocessed yet are left to their training."""
    plans = Plans.load(workdir / "plans.json") if (workdir / "plans.json").is_file() else None
    written = {}
    for name, config in (plans.configurations.items() if plans else ()):
        cache_dir = workdir / "preprocessed" / config.data_identifier
        if config.previous_stage == configuration and root.parent == workdir / "models" / configuration \
                and all(read_properties(cache_dir, cid) is not None for cid in case_ids):
            written[name] = str(prepare_previous_stage(workdir, plans, config, root.name, case_ids))
    return written


def _finished_folds(workdir: Path, configuration: str, folds: Sequence[int | str] | int | str, recipe: str | None,
                    checkpoint: str) -> list[Path]:
    """The cross-validation folds to score, all finished (refused otherwise, with the fixes)."""
    spec = parse_folds(folds)
    if spec != EVERY and ALL in spec:
        raise ValueError("fold 'all' was trained on every case and holds none out, so it has no cross-validation "
                         "score; crossval the cross-validation folds (`-f every`, the default, or fold numbers)")
    fold_dirs = resolve_fold_dirs(workdir, configuration, spec, recipe)
    done, skipped = trained_folds(fold_dirs, checkpoint, configuration, offer_fold_all=False)
    if skipped:
        left = [d for d in fold_dirs if d.name in skipped]
        raise FileNotFoundError(f"{unfinished(left, checkpoint, configuration)}; or score only the finished folds: "
                                f"`-f {' '.join(str(fold_of(d.name)) for d in done)}`")
    return done


@dataclass
class FoldValidation:
    """One fold's validation: (case, prediction, reference) triples, their summary, how they were scored, and the
    model's recipe."""

    pairs: list[tuple[str, Path, Path]]
    summary: dict[str, Any]
    labels: dict[str, Any]
    ignore_label: int | None
    recipe: Recipe


def validate_fold(workdir: str | Path, fold_dir: str | Path, configuration: str = "3d_fullres", *,
                  checkpoint: str = FINAL, device: str = "auto", tta: bool | None = None, step: float | None = None,
                  workers: int = 1, overwrite: bool = False, progress: bool = True, whole_volume: bool = True,
                  overrides: Sequence[str] = (), save_probabilities: bool = False) -> FoldValidation:
    """The model in ``fold_dir`` (``.../fold_<k>``, trained on WORKDIR's split ``k``) predicts that split's validation
    cases from the raw images into ``fold_dir/validation/`` and scores them there (``summary.json``), without
    postprocessing; with ``save_probabilities`` also ``<case>.npz``. A case predicted again without it loses an
    older ``.npz``, which no longer belongs to its label map."""
    fold_dir = Path(fold_dir)
    fold = fold_of(fold_dir.name)
    if fold is None:
        raise ValueError(f"{fold_dir} is no fold folder (fold_<k> or fold_all)")
    plans = Plans.load(fold_dir / "plans.json")
    cases = {c.id: c for c in load_dataset(plans.dataset["root"]).training}
    scheme = LabelScheme.from_dataset(plans.dataset)
    labels, ignore = scheme.evaluation_labels(), scheme.ignore_label  # regions, for region-based models
    val_ids = fold_split(workdir, plans, fold)["val"]
    out = fold_dir / "validation"
    predictor = load_predictor(fold_dir.parent, configuration, [fold], checkpoint=checkpoint, device=device, tta=tta,
                               step=step, postprocess=False, whole_volume=whole_volume, overrides=overrides)
    done = predictor.predict_cases({cid: cases[cid].images for cid in val_ids}, out, overwrite=overwrite,
                                   save_probabilities=save_probabilities, progress=progress,
                                   on_conflict="redo")  # the fold's own folder
    if not save_probabilities:
        for cid in done["case_seconds"]:  # predicted now: an older npz is another model's
            probability_file(Path(done["outputs"][cid])).unlink(missing_ok=True)
    pairs = [(cid, Path(done["outputs"][cid]), cases[cid].label) for cid in val_ids]
    summary = evaluate_pairs(pairs, labels, workers=workers, output=out / "summary.json", ignore_label=ignore,
                             progress=progress)
    return FoldValidation(pairs, summary, labels, ignore, predictor.recipe)


def probability_file(prediction: Path) -> Path:
    """The ``<case>.npz`` beside a prediction ``<case><ending>``."""
    return prediction.with_name(f"{prediction.name[:-len(image_suffix(prediction))]}.npz")


def _score_postprocessed(pairs: list[tuple[str, Path, Path]], spec: dict[str, Any], labels: dict[str, Any],
                         root: Path, workers: int, ignore_label: int | None = None,
                         progress: bool = True) -> dict[str, Any]:
    out = root / "crossval_postprocessed"
    out.mkdir(parents=True, exist_ok=True)
    done = []
    for cid, pred, ref in pairs:
        seg, geometry = read_label(pred)
        target = out / pred.name
        write_image(apply_postprocessing(seg, spec), geometry, target, dtype=seg.dtype)
        done.append((cid, target, ref))
    return evaluate_pairs(done, labels, workers=workers, output=out / "summary.json", ignore_label=ignore_label,
                          progress=progress)
