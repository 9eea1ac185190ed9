"""Choosing what to predict with: a configuration, or an ensemble of two, by their cross-validation
(``decathlete best WORKDIR``; nnU-Net v2's ``nnUNetv2_find_best_configuration``, our way).

Candidates are the configurations whose ``decathlete crossval`` ran (``models/<config>/<recipe>/crossval/``) and
every pair of them. A pair is scored by ensembling its members' cross-validation probabilities
(``crossval --save-probabilities``): per case the two configurations' probabilities on the input grid are averaged and
turned into a label map as the predictor does (`decathlete.infer.ensemble.label_map`), written to
``WORKDIR/ensembles/<A>+<B>/`` and scored with `decathlete.evaluate.evaluate_pairs` against the dataset's labels,
exactly as ``crossval`` scores one configuration. A pair without saved probabilities is listed as skipped, with the
command that saves them.

Every candidate is compared on the same cases, the union of the folds' validation cases; configurations whose
cross-validations cover different cases are refused, since their means would not be comparable. As nnU-Net, the
comparison is before postprocessing (the mean foreground Dice of ``crossval/summary.json``; a configuration's
postprocessed score is recorded beside it), and postprocessing is then decided for the winner only: a configuration
keeps the ``postprocessing.json`` its ``crossval`` chose; an ensemble gets one chosen the same way on its own
predictions (`decathlete.infer.postprocess.choose_postprocessing`), saved in its folder, where ``predict -c A B``
finds it. A tie within 1e-9 goes to the candidate with fewer configurations, then to the first by name.
Everything goes to ``WORKDIR/best.json`` with the ``decathlete predict`` command that uses the choice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from decathlete.crossval import NO_POSTPROCESSING, probability_file
from decathlete.data.folds import fold_name
from decathlete.evaluate import evaluate_pairs
from decathlete.infer.ensemble import ENSEMBLES, ensemble_name, label_map
from decathlete.infer.models import model_recipe
from decathlete.infer.outputs import load_probability_file
from decathlete.infer.postprocess import (
    FILENAME,
    choose_postprocessing,
    load_postprocessing,
    reported_only,
    save_postprocessing,
)
from decathlete.io.atomic import write_json_atomic
from decathlete.io.datasets import load_dataset
from decathlete.io.images import image_suffix, read_geometry, write_image
from decathlete.labels import LabelScheme
from decathlete.planning.plans import Plans

BEST_FILE = "best.json"
_TIE = 1e-9
RULE = ("mean foreground Dice of the cross-validation predictions before postprocessing, on the same cases; ties go "
        "to fewer configurations, then to the first by name; postprocessing is then chosen for the winner")


@dataclass
class CrossValidation:
    """One configuration's finished ``crossval``: where it is and the label map of each validation case."""

    configuration: str
    recipe: str
    folder: Path  # WORKDIR/models/<config>/<recipe>
    folds: list[int]
    predictions: dict[str, Path]  # case id -> fold_<k>/validation/<case><ending>
    summary: dict[str, Any]  # crossval/summary.json (before postprocessing)


def find_best(workdir: str | Path, configurations: Sequence[str] | None = None, recipe: str | None = None,
              workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Score every cross-validated configuration and pair, choose one and its postprocessing (module docstring).

    Args:
        workdir: the work folder.
        configurations: only these (default: every configuration with a ``crossval/summary.json``).
        recipe: the recipe folder of every configuration (default: the plans' recipe, or the only one
            cross-validated).
        workers: processes for scoring.
        progress: progress bars.

    Returns:
        The ``WORKDIR/best.json`` document (written atomically): ``candidates`` (name, configurations, recipes,
        ``foreground_dice``, ``dice`` per label, ``n_cases``, ``postprocessed_foreground_dice``, folder),
        ``cases`` (the case ids every candidate was scored on), ``skipped`` (name, reason, fix), ``chosen`` (a
        candidate with its ``postprocessing``) and ``command``.

    Raises:
        FileNotFoundError: no configuration (or a named one) was cross-validated, or its crossval is incomplete.
        ValueError: the cross-validations cover different cases, or mean different labels.
    """
    workdir = Path(workdir)
    runs = _cross_validations(workdir, configurations, recipe)
    cases = _common_cases(runs)
    plans = Plans.load(runs[0].folder / fold_name(runs[0].folds[0]) / "plans.json")
    scheme = LabelScheme.from_dataset(plans.dataset)
    references = {c.id: c.label for c in load_dataset(plans.dataset["root"]).training}
    scoring = _Scoring(scheme.evaluation_labels(), scheme.ignore_label, scheme.region_based, workers, progress)
    candidates: list[dict[str, Any]] = [_single(run) for run in runs]
    pairs: dict[str, list[tuple[str, Path, Path]]] = {}
    skipped = []
    for members in combinations(runs, 2):
        why = _why_not_ensemble(workdir, members, cases)
        if why is not None:
            skipped.append(why)
            continue
        candidate, pairs[candidate["name"]] = _score_ensemble(workdir, members, cases, references, scoring)
        candidates.append(candidate)
    chosen = dict(_choose(candidates))
    winners = [r for r in runs if r.configuration in chosen["configurations"]]
    if len(winners) == 1:
        chosen["postprocessing"] = _summary_of(load_postprocessing(winners[0].folder), winners[0].folder / FILENAME)
    else:
        chosen["postprocessing"] = pp = _ensemble_postprocessing(winners, pairs[chosen["name"]], scoring)
        if pp["foreground"] or pp["per_class"]:  # its postprocessed score, as a configuration's crossval records it
            after = sum(pp["mean_dice_after"].values()) / len(pp["mean_dice_after"])
            chosen["postprocessed_foreground_dice"] = after
            next(c for c in candidates if c["name"] == chosen["name"])["postprocessed_foreground_dice"] = after
    document = {"workdir": str(workdir), "rule": RULE, "n_cases": len(cases), "cases": cases,
                "candidates": candidates, "skipped": skipped, "chosen": chosen,
                "command": predict_command(workdir, chosen["configurations"], recipe)}
    write_json_atomic(workdir / BEST_FILE, document)
    return document


@dataclass(frozen=True)
class _Scoring:
    """How predictions are scored: as ``crossval`` does for this dataset."""

    labels: dict[str, Any]
    ignore_label: int | None
    region_based: bool
    workers: int
    progress: bool


def predict_command(workdir: Path, configurations: Sequence[str], recipe: str | None = None) -> str:
    """The ``decathlete predict`` command line that predicts with the chosen configuration(s)."""
    return (f"decathlete predict -i IN -o OUT -m {workdir} -c {' '.join(configurations)}"
            + (f" --recipe {recipe}" if recipe else ""))


def _cross_validations(workdir: Path, configurations: Sequence[str] | None,
                       recipe: str | None) -> list[CrossValidation]:
    """The finished ``crossval`` of each configuration (of those named), in name order."""
    models = workdir / "models"
    if not (workdir / "plans.json").is_file() and not models.is_dir():
        raise FileNotFoundError(f"{workdir} is no work folder (no plans.json, no models/); give the folder that "
                                "`decathlete plan -o` wrote")
    if configurations and (twice := sorted({c for c in configurations if list(configurations).count(c) > 1})):
        raise ValueError(f"configuration {', '.join(twice)} given twice")
    if configurations:
        names = sorted(configurations)
    else:
        names = sorted(d.name for d in models.iterdir() if d.is_dir()) if models.is_dir() else []
    runs, missing = [], []
    for name in names:
        folder = _crossval_folder(workdir, name, recipe)
        if folder is None:
            missing.append(name)
        else:
            runs.append(_load(name, folder))
    if configurations and missing:
        raise FileNotFoundError(
            f"{', '.join(missing)} of {workdir} was not cross-validated{f' with recipe {recipe}' if recipe else ''} "
            f"(no models/{missing[0]}/<recipe>/crossval/summary.json): run `decathlete crossval {workdir} -c "
            f"{missing[0]} --save-probabilities` first")
    if not runs:
        raise FileNotFoundError(
            f"no configuration of {workdir} was cross-validated{f' with recipe {recipe}' if recipe else ''}: run "
            f"`decathlete crossval {workdir} -c CONFIG --save-probabilities` for each trained configuration first")
    return runs


def _crossval_folder(workdir: Path, configuration: str, recipe: str | None) -> Path | None:
    """``models/<config>/<recipe>`` holding a ``crossval/summary.json``: the recipe named, the plans' recipe, or the
    only one; None when there is none."""
    base = workdir / "models" / configuration
    done = sorted(d for d in base.iterdir() if (d / "crossval" / "summary.json").is_file()) if base.is_dir() else []
    if recipe is not None:
        return base / recipe if base / recipe in done else None
    if len(done) > 1:
        planned = Plans.load(workdir / "plans.json").recipe if (workdir / "plans.json").is_file() else None
        if planned not in [d.name for d in done]:
            raise ValueError(f"{configuration} was cross-validated with several recipes "
                             f"({', '.join(d.name for d in done)}); choose one with --recipe")
        return base / planned
    return done[0] if done else None


def _load(configuration: str, folder: Path) -> CrossValidation:
    """A configuration's crossval: its summary, its folds and, per validation case, the fold's label map."""
    result_path = folder / "crossval" / "result.json"
    if not result_path.is_file():
        raise FileNotFoundError(f"the crossval of {configuration} did not finish ({result_path} is missing): run "
                                f"`decathlete crossval {folder.parent.parent.parent} -c {configuration}` again")
    folds = [int(k) for k in json.loads(result_path.read_text())["folds"]]
    summary = json.loads((folder / "crossval" / "summary.json").read_text())
    predictions: dict[str, Path] = {}
    for k in folds:
        validation = folder / fold_name(k) / "validation"
        files = _label_files(validation)
        for entry in json.loads((validation / "summary.json").read_text())["per_case"]:
            if entry["case"] in files:
                predictions.setdefault(entry["case"], files[entry["case"]])
    cases = [entry["case"] for entry in summary["per_case"]]
    if lost := [c for c in cases if c not in predictions]:
        raise FileNotFoundError(f"the crossval of {configuration} lacks the prediction of {len(lost)} case(s) "
                                f"(e.g. {lost[0]}) under {folder}/fold_*/validation/: run `decathlete crossval "
                                f"{folder.parent.parent.parent} -c {configuration}` again")
    return CrossValidation(configuration, folder.name, folder, folds, {c: predictions[c] for c in cases}, summary)


def _label_files(folder: Path) -> dict[str, Path]:
    """Case id -> label map file of a validation folder (npz, JSON, CSV and plots are no label maps)."""
    files = {}
    for f in sorted(folder.iterdir()) if folder.is_dir() else []:
        try:
            suffix = image_suffix(f)
        except ValueError:
            continue
        if f.is_file() and not f.name.startswith("."):
            files[f.name[: -len(suffix)]] = f
    return files


def _common_cases(runs: Sequence[CrossValidation]) -> list[str]:
    """The validation cases every configuration was cross-validated on (refused when they differ)."""
    first = runs[0]
    for run in runs[1:]:
        if set(run.predictions) != set(first.predictions):
            only_first = sorted(set(first.predictions) - set(run.predictions))
            only_run = sorted(set(run.predictions) - set(first.predictions))
            what = "; ".join(f"{len(c)} only in {n} (e.g. {c[0]})" for n, c in
                             ((first.configuration, only_first), (run.configuration, only_run)) if c)
            raise ValueError(
                f"the cross-validations of {first.configuration} (folds {_folds(first)}, {len(first.predictions)} "
                f"cases) and {run.configuration} (folds {_folds(run)}, {len(run.predictions)} cases) cover different "
                f"cases, so their scores cannot be compared: {what}; crossval the same folds of the same splits for "
                "every configuration, or choose among some with -c")
    return sorted(first.predictions)


def _folds(run: CrossValidation) -> str:
    return ", ".join(map(str, run.folds))


def _scores(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Mean foreground Dice and Dice per label of an evaluation summary."""
    return {"foreground_dice": summary["foreground_mean"]["dice"],
            "dice": {name: values["dice"] for name, values in summary["mean"].items()}}


def _single(run: CrossValidation) -> dict[str, Any]:
    """A configuration as a candidate: its crossval's scores, and its postprocessed score when a step was kept."""
    spec = load_postprocessing(run.folder) or {}
    post = run.folder / "crossval_postprocessed" / "summary.json"
    kept = bool(spec.get("foreground") or spec.get("per_class")) and post.is_file()
    return {"name": run.configuration, "configurations": [run.configuration],
            "recipes": {run.configuration: run.recipe}, **_scores(run.summary), "n_cases": len(run.predictions),
            "postprocessed_foreground_dice": json.loads(post.read_text())["foreground_mean"]["dice"] if kept else None,
            "folder": str(run.folder)}


def _why_not_ensemble(workdir: Path, members: Sequence[CrossValidation], cases: Sequence[str]
                      ) -> dict[str, Any] | None:  # fmt: skip
    """Why a pair cannot be scored (missing probabilities, different recipes) and the fix; None when it can."""
    name = ensemble_name([m.configuration for m in members])
    base = {"name": name, "configurations": [m.configuration for m in members]}
    reasons, fixes = [], []
    for m in members:
        lacking = [c for c in cases if not probability_file(m.predictions[c]).is_file()]
        if lacking:
            reasons.append(f"{m.configuration} has no saved validation probabilities for {len(lacking)} of "
                           f"{len(cases)} cases (e.g. {lacking[0]})")
            fixes.append(f"decathlete crossval {workdir} -c {m.configuration} --save-probabilities")
    if reasons:
        return {**base, "reason": "; ".join(reasons), "fix": " and ".join(f"`{f}`" for f in fixes)}
    if len({m.recipe for m in members}) > 1:
        return {**base, "reason": f"different recipes ({', '.join(f'{m.configuration}: {m.recipe}' for m in members)})"
                f"; predict runs one recipe for every configuration", "fix": "choose one recipe with --recipe"}
    return None


def _score_ensemble(workdir: Path, members: Sequence[CrossValidation], cases: Sequence[str],
                    references: Mapping[str, Path | None], scoring: _Scoring
                    ) -> tuple[dict[str, Any], list[tuple[str, Path, Path]]]:  # fmt: skip
    """Average the pair's probabilities per case into ``WORKDIR/ensembles/<A>+<B>/``, score the label maps; an
    older ``postprocessing.json`` there (chosen on other predictions) is removed."""
    names = [m.configuration for m in members]
    out = workdir / ENSEMBLES / ensemble_name(names)
    out.mkdir(parents=True, exist_ok=True)
    (out / FILENAME).unlink(missing_ok=True)
    pairs = []
    for case in tqdm(cases, desc=f"ensemble {ensemble_name(names)}", unit="case", disable=not scoring.progress):
        reference = references.get(case)
        if reference is None:
            raise FileNotFoundError(f"case {case} of the cross-validation is no labelled case of the dataset")
        pairs.append((case, _ensemble_case(members, case, out, scoring.region_based), Path(reference)))
    summary = evaluate_pairs(pairs, scoring.labels, workers=scoring.workers, output=out / "summary.json",
                             ignore_label=scoring.ignore_label, progress=scoring.progress)
    candidate = {"name": ensemble_name(names), "configurations": names,
                 "recipes": {m.configuration: m.recipe for m in members}, **_scores(summary), "n_cases": len(pairs),
                 "postprocessed_foreground_dice": None, "folder": str(out)}
    return candidate, pairs


def _ensemble_case(members: Sequence[CrossValidation], case: str, out: Path, region_based: bool) -> Path:
    """The mean of the members' probabilities of ``case`` as a label map on the first member's prediction's grid."""
    geometry, _ = read_geometry(members[0].predictions[case])
    total, values = None, None
    for m in members:
        probabilities, class_values = load_probability_file(probability_file(m.predictions[case]))
        diffs = list(geometry.same_grid(read_geometry(m.predictions[case])[0]))
        if probabilities.shape[1:] != geometry.shape:
            diffs.append(f"probabilities of shape {probabilities.shape[1:]} on a grid of {geometry.shape}")
        if diffs:
            raise ValueError(f"case {case}: {m.configuration}'s validation prediction or probabilities are not on "
                             f"{members[0].configuration}'s grid ({'; '.join(diffs)}); predict them again with "
                             f"`decathlete crossval {m.folder.parent.parent.parent} -c {m.configuration} "
                             "--save-probabilities --overwrite`")
        if values is not None and class_values != values:
            raise ValueError(f"case {case}: {m.configuration}'s probabilities are of labels {class_values}, "
                             f"{members[0].configuration}'s of {values}")
        total, values = probabilities if total is None else total + probabilities, class_values
    assert total is not None and values is not None
    label = label_map(total / len(members), values, region_based)
    target = out / members[0].predictions[case].name
    write_image(label, geometry, target, dtype=label.dtype)
    return target


def _choose(candidates: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The best mean foreground Dice; within 1e-9 the fewest configurations, then the first listed (by name)."""
    top = max(c["foreground_dice"] for c in candidates)
    return min((c for c in candidates if c["foreground_dice"] >= top - _TIE), key=lambda c: len(c["configurations"]))


def _ensemble_postprocessing(members: Sequence[CrossValidation], pairs: Sequence[tuple[str, Path, Path]],
                             scoring: _Scoring) -> dict[str, Any]:
    """Choose the winning ensemble's postprocessing on its predictions and save it in its folder, for predict."""
    spec = choose_postprocessing([(p, r) for _, p, r in pairs], scoring.labels, scoring.ignore_label)
    recipes = [model_recipe(dirs, Plans.load(dirs[0] / "plans.json"))
               for dirs in ([m.folder / fold_name(k) for k in m.folds] for m in members)]
    if not all(r.inference.postprocessing for r in recipes):
        spec = reported_only(spec, NO_POSTPROCESSING)
    spec.update(configurations=[m.configuration for m in members], recipes={m.configuration: m.recipe for m in members})
    path = save_postprocessing(spec, pairs[0][1].parent)
    return _summary_of(spec, path)


def _summary_of(spec: Mapping[str, Any] | None, path: Path) -> dict[str, Any]:
    """What best.json records of a postprocessing choice."""
    if spec is None:
        return {"file": None, "foreground": False, "per_class": {}, "note": f"no {path}: none is applied"}
    return {"file": str(path), **{k: spec[k] for k in ("foreground", "per_class", "mean_dice_before",
                                                        "mean_dice_after")}}
