"""Score a folder of predicted label maps against a folder of references (``decathlete evaluate PRED REF``).

Files pair by case id, the file name without its image suffix (.nii.gz, .nii, .nrrd, .mha, .mhd; formats may differ
between the folders). Every reference needs a prediction and every prediction a reference: a missing or extra case
is an error naming it, never silently skipped. Each pair must lie on the same grid (`Geometry.same_grid`).
Metrics, conventions and outputs: `decathlete.metrics` (spacing in array order z, y, x).
"""

from __future__ import annotations

import json
import multiprocessing as mp
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from decathlete.io.images import image_suffix, read_label
from decathlete.metrics.efficiency import efficiency_of
from decathlete.metrics.summary import (
    ANY_LABEL,
    DEFAULT_NSD_TOLERANCE_MM,
    LabelSpec,
    both_empty_metrics,
    build_summary,
    case_metrics,
    normalize_labels,
    resolve_tolerances,
    write_summary,
)

Tolerance = Mapping[str, float] | float
IGNORE_NAME = "ignore"  # nnU-Net v2's ignore label, as `decathlete.labels.IGNORE_NAME` (not imported: no torch here)


def _declared_labels(path: str | Path) -> tuple[Path, list[tuple[str, Any]]]:
    """``(dataset.json path, [(name, value or [values])])`` as declared, in either layout."""
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    spec = json.loads(path.read_text(encoding="utf-8")).get("labels")
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"{path}: 'labels' must be a non-empty object")
    if not all(isinstance(v, str) for v in spec.values()):  # nnU-Net v2: name -> value or list of values (region)
        return path, list(spec.items())
    declared = []  # MSD: value -> name
    for key, name in spec.items():
        try:
            declared.append((name, int(key)))
        except ValueError:
            raise ValueError(f"{path}: MSD label key {key!r} is not an integer") from None
    if len({name for name, _ in declared}) < len(declared):
        raise ValueError(f"{path}: a label name is used twice in {spec}")
    return path, declared


def labels_from_dataset_json(path: str | Path) -> dict[str, int | list[int]]:
    """Foreground labels (and nnU-Net regions) declared by a dataset.json, background (value 0) and the ignore
    label left out (pass `ignore_label_from_dataset_json` to `evaluate_folder` to leave its voxels out).

    Args:
        path: a dataset.json or the dataset folder holding it. MSD writes ``"labels": {"1": "liver"}``
            (value -> name); nnU-Net v2 writes ``{"liver": 1, "whole tumour": [1, 2, 3]}`` (name -> value or region).

    Returns:
        ``{name: value or [values]}`` in declaration order.

    Raises:
        FileNotFoundError: no dataset.json. ValueError: no usable ``labels`` object.
    """
    path, declared = _declared_labels(path)
    out = {name: list(value) if isinstance(value, list) else value for name, value in declared
           if value not in (0, [0]) and name != IGNORE_NAME}
    normalize_labels(out)  # type check of every value
    if not out:
        raise ValueError(f"{path}: no foreground label (every label is background 0)")
    return out


def ignore_label_from_dataset_json(path: str | Path) -> int | None:
    """The value of the ``"ignore"`` label (nnU-Net v2's sparse annotations) of a dataset.json, or None."""
    path, declared = _declared_labels(path)
    value = dict(declared).get(IGNORE_NAME)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{path}: the ignore label must be one integer, got {value!r}")
    return value


def _image_files(folder: Path) -> dict[str, Path]:
    """Case id -> image file; other files (summary.json, plots, hidden temporaries) are ignored."""
    files: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or not f.is_file():
            continue
        try:
            suffix = image_suffix(f)
        except ValueError:
            continue
        case = f.name[: -len(suffix)]
        if case in files:
            raise ValueError(f"{folder}: case {case!r} has two files, {files[case].name} and {f.name}")
        files[case] = f
    return files


def pair_cases(pred_dir: str | Path, ref_dir: str | Path,
               only_predicted: bool = False) -> list[tuple[str, Path, Path]]:
    """``(case id, prediction, reference)`` for every case (with ``only_predicted``: every predicted case; references
    without a prediction are left out), sorted by id.

    Raises:
        FileNotFoundError: a folder does not exist. ValueError: no reference, or cases on one side only
            (all of them named), or no prediction at all.
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    for folder, what in ((pred_dir, "prediction"), (ref_dir, "reference")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} folder {folder} does not exist")
    preds, refs = _image_files(pred_dir), _image_files(ref_dir)
    if not refs:
        raise ValueError(f"no reference images in {ref_dir}")
    problems = []
    if only_predicted and not set(preds) & set(refs):
        problems.append(f"no prediction in {pred_dir} has a reference in {ref_dir}")
    elif (missing := sorted(set(refs) - set(preds))) and not only_predicted:
        problems.append(f"{len(missing)} reference case(s) have no prediction in {pred_dir}: {', '.join(missing)} "
                        "(--only-predicted scores the predicted cases alone)")
    if extra := sorted(set(preds) - set(refs)):
        problems.append(
            f"{len(extra)} prediction(s) have no reference in {ref_dir}: {', '.join(extra)} "
            "(wrong folder? move them out to score the rest)"
        )
    if problems:
        raise ValueError("; ".join(problems))
    return [(case, preds[case], refs[case]) for case in sorted(refs) if case in preds]


def evaluate_case(
    case: str, pred_path: Path, ref_path: Path, labels: LabelSpec | None, nsd_tolerance_mm: Tolerance,
    ignore_label: int | None = None,
) -> tuple[dict[str, dict[str, float | int]], list[int], int]:
    """Metrics of one pair of files (runs in a worker process).

    Args:
        case: case id, for messages.
        pred_path, ref_path: label map files.
        labels: name -> value(s); None: every non-zero value of the prediction or reference, named str(value).
        nsd_tolerance_mm: mm, for all labels or per name (names absent from this case are ignored here).
        ignore_label: reference value of voxels that count nowhere (`case_metrics`), or None.

    Returns:
        ``(metrics per label, sorted non-zero reference values, number of voxels)``, the ignore label and its voxels
        left out.

    Raises:
        ValueError: the prediction is not on the reference grid.
    """
    pred, pred_geo = read_label(pred_path)
    ref, ref_geo = read_label(ref_path)
    if diffs := ref_geo.same_grid(pred_geo):
        raise ValueError(f"case {case!r}: prediction {pred_path} is not on the reference grid: {'; '.join(diffs)}")
    ref_values = [int(v) for v in np.unique(ref) if v not in (0, ignore_label)]
    if labels is None:
        labels = {str(v): v for v in sorted(set(ref_values) | {int(v) for v in np.unique(pred)} - {0, ignore_label})}
    if isinstance(nsd_tolerance_mm, Mapping):
        nsd_tolerance_mm = {n: t for n, t in nsd_tolerance_mm.items() if n in labels or n == ANY_LABEL}
    n_voxels = int(ref.size if ignore_label is None else np.count_nonzero(ref != ignore_label))
    return case_metrics(pred, ref, ref_geo.spacing, labels, nsd_tolerance_mm, ignore_label), ref_values, n_voxels


def labels_to_score(source: str | Path | None) -> tuple[dict[str, Any] | None, int | None]:
    """``(labels, ignore label)`` that ``evaluate --labels SOURCE`` scores: a WORKDIR's planned labels or its recipe's
    regions (its plans.json), a dataset folder's or dataset.json's labels, or (None) every value in the references."""
    if source is None:
        return None, None
    if not (Path(source).is_file() or any((Path(source) / name).is_file() for name in ("dataset.json", "plans.json"))):
        raise FileNotFoundError(f"--labels {source}: no dataset.json or plans.json there; give a dataset folder, its "
                                "dataset.json or a work folder")
    if (Path(source) / "plans.json").is_file():
        from decathlete.labels import LabelScheme  # torch: only for a work folder
        from decathlete.planning.plans import Plans

        scheme = LabelScheme.from_dataset(Plans.load(Path(source) / "plans.json").dataset)
        return scheme.evaluation_labels(), scheme.ignore_label
    return labels_from_dataset_json(source), ignore_label_from_dataset_json(source)


def parse_tolerances(items: Sequence[str], labels: Mapping[str, Any] | None = None) -> Tolerance:
    """``--nsd-tolerance`` words: ``MM`` for every label, and/or ``LABEL=MM`` pairs (others: the plain number, else
    1 mm). ``LABEL`` is a label name (case-insensitive) or value of ``labels``; without ``labels`` (the references'
    values are scored) a value.

    Raises:
        ValueError: a word that is neither, two plain numbers, or a label ``labels`` lacks (naming the valid ones).
    """
    by_value = {str(v): n for n, v in (labels or {}).items() if isinstance(v, int)}
    by_name = {str(n).lower(): n for n in (labels or {})}
    tolerances: dict[str, float] = {}
    for item in items:
        key, sep, text = item.rpartition("=")
        try:
            mm = float(text)
        except ValueError:
            raise ValueError(f"--nsd-tolerance expects MM or LABEL=MM (e.g. 1 or Mandible=2), got '{item}'") from None
        key = key.strip() if sep else ANY_LABEL
        if key in tolerances:
            raise ValueError(f"--nsd-tolerance gives '{key if sep else 'every label'}' twice")
        if key != ANY_LABEL and labels is not None:
            name = by_name.get(key.lower()) or by_value.get(key)
            if name is None:
                raise ValueError(f"--nsd-tolerance names the label '{key}', which is not scored here; labels: "
                                 f"{', '.join(f'{n} ({v})' for n, v in labels.items())}")
            key = name
        tolerances[key] = mm
    return tolerances[ANY_LABEL] if list(tolerances) == [ANY_LABEL] else tolerances


def _map(fn: Callable[..., Any], jobs: Sequence[tuple], workers: int, progress: bool) -> list[Any]:
    """``fn`` on every job, in order, with a bar over the cases scored."""
    with tqdm(total=len(jobs), desc="evaluate", unit="case", disable=not progress or not jobs) as bar:
        if workers <= 1 or len(jobs) <= 1:
            results = []
            for job in jobs:
                results.append(fn(*job))
                bar.update()
            return results
        # forkserver: a plain fork of a parent running threads (torch, BLAS pools) can deadlock the children.
        ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
            futures = [pool.submit(fn, *job) for job in jobs]
            for _ in as_completed(futures):  # the bar moves as cases finish, in whatever order
                bar.update()
            return [future.result() for future in futures]


def evaluate_folder(
    pred_dir: str | Path,
    ref_dir: str | Path,
    labels: LabelSpec | None = None,
    nsd_tolerance_mm: Tolerance = DEFAULT_NSD_TOLERANCE_MM,
    workers: int = 1,
    output: str | Path | None = None,
    plots: bool = True,
    ignore_label: int | None = None,
    only_predicted: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every prediction in `pred_dir` against its reference in `ref_dir`.

    Args:
        pred_dir, ref_dir: folders of label maps, paired by case id (see the module docstring).
        labels: name -> value or list of values (a region: their union), e.g. from `labels_from_dataset_json`;
            None: every non-zero value found in the references, named str(value), sorted by value.
        nsd_tolerance_mm: NSD tolerance in mm, one for all labels or ``{name: mm}`` (others get 1 mm).
        workers: processes (> 1: a "forkserver" pool over cases).
        output: summary.json path; the CSV (same stem) and ``boxplot_<metric>.png`` go beside it. None: write nothing.
        plots: write the box plots (with `output`).
        ignore_label: reference value of unannotated voxels (e.g. from `ignore_label_from_dataset_json`): they count
            nowhere and the value is no label; None: every voxel counts.
        only_predicted: score the predicted cases even when references lack a prediction; the summary's
            ``left_out`` names those references (otherwise they are an error).
        progress: a progress bar over the cases scored.

    Returns:
        The summary.json document: ``per_case``, ``mean``, ``foreground_mean``, ``labels``, ``conventions``, and
        ``efficiency`` (the run record and its summary over the scored cases) when ``pred_dir`` holds the
        ``efficiency.json`` of ``predict``.

    Raises:
        FileNotFoundError / ValueError: missing folders, unpaired cases, off-grid predictions, bad labels or
            tolerances, or no foreground label in the references when `labels` is None.
    """
    pairs = pair_cases(pred_dir, ref_dir, only_predicted)
    extra: dict[str, Any] = {}
    if only_predicted:
        scored = {case for case, _, _ in pairs}
        left_out = sorted(set(_image_files(Path(ref_dir))) - scored)
        extra["left_out"] = {"n_reference_cases": len(scored) + len(left_out), "n_scored": len(scored),
                             "n_left_out": len(left_out), "cases": left_out,
                             "why": "no prediction (evaluate --only-predicted)"}
    # The prediction run's cost (``efficiency.json``, written by ``predict``) over the scored cases, when recorded.
    if efficiency := efficiency_of(pred_dir, [case for case, _, _ in pairs]):
        extra["efficiency"] = efficiency
    return evaluate_pairs(pairs, labels, nsd_tolerance_mm, workers, output, plots, where=str(ref_dir),
                          ignore_label=ignore_label, extra=extra or None, progress=progress)


def evaluate_pairs(
    pairs: Sequence[tuple[str, Path, Path]],
    labels: LabelSpec | None = None,
    nsd_tolerance_mm: Tolerance = DEFAULT_NSD_TOLERANCE_MM,
    workers: int = 1,
    output: str | Path | None = None,
    plots: bool = True,
    where: str = "the references",
    ignore_label: int | None = None,
    extra: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`evaluate_folder` for explicit ``(case id, prediction file, reference file)`` triples; ``extra`` entries are
    added to the summary."""
    pairs = [(c, Path(p), Path(r)) for c, p, r in pairs]
    spec = None if labels is None else normalize_labels(labels)
    if spec is not None:
        resolve_tolerances(list(spec), nsd_tolerance_mm)  # fail on a bad tolerance before the work
    jobs = [(c, p, r, spec, nsd_tolerance_mm, ignore_label) for c, p, r in pairs]
    results = _map(evaluate_case, jobs, workers, progress)
    if spec is None:
        values = sorted(set().union(*(ref_values for _, ref_values, _ in results)))
        if not values:
            raise ValueError(f"no foreground label in {where}; pass labels to score anyway")
        spec = {str(v): (v,) for v in values}
        # A label absent from both masks of a case was not computed there: fill in the both-empty values.
        results = [({n: m.get(n) or both_empty_metrics(size) for n in spec}, rv, size) for m, rv, size in results]
    tolerances = resolve_tolerances(list(spec), nsd_tolerance_mm)
    per_case = [{"case": case, "metrics": metrics} for (case, _, _), (metrics, _, _) in zip(pairs, results)]
    summary = {**build_summary(per_case, spec, tolerances), **(extra or {})}
    if output is not None:
        write_summary(summary, output, plots=plots)
    return summary
