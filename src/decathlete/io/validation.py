"""Dataset validation that reports every problem at once, each with its case id and a fix; writes nothing.

Passes, cheapest first: structural (dataset.json, ids, paths, file existence; opens no file), headers
(``read_geometry``: dimensionality, channel counts, grids) and voxel data (NaN/Inf, label values; optionally in
worker processes, one case per worker at a time). Grid tolerances (channel vs channel, image vs label) let
float32 header round-off pass and fail anything that misplaces a label by a noticeable fraction of a voxel:

* spacing: relative ``SPACING_RTOL`` = 1e-4 (0.05 voxel of drift across 500 voxels),
* direction cosines: absolute ``DIRECTION_ATOL`` = 1e-3 (about 0.06 degrees),
* origin: ``ORIGIN_TOL_VOXELS`` = 0.01 of the smallest voxel spacing, in mm.
"""

from __future__ import annotations

import multiprocessing
import os
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from decathlete.io.images import read_geometry, read_image, read_label

if TYPE_CHECKING:
    from decathlete.io.datasets import Case, DatasetDescription

SPACING_RTOL = 1e-4
DIRECTION_ATOL = 1e-3
ORIGIN_TOL_VOXELS = 0.01


@dataclass(frozen=True)
class Problem:
    """One problem found in a dataset.

    Attributes:
        case: Case id, or None for dataset-level problems.
        message: What is wrong, with concrete values and paths.
        fix: What the user should do about it.
    """

    case: str | None
    message: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.case or 'dataset'}] {self.message} -> fix: {self.fix}"


class DatasetError(Exception):
    """A dataset has problems; ``str`` lists all of them, one per line, under a count header.

    Attributes:
        problems: Every problem found.
        root: The dataset folder, when known.
    """

    def __init__(self, problems: list[Problem], root: str | Path | None = None) -> None:
        self.problems = list(problems)
        self.root = root
        where = f" in dataset {root}" if root is not None else ""
        header = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''} found{where}:"
        super().__init__("\n".join([header, *(f"  {p}" for p in self.problems)]))

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle through self.args (the formatted text); rebuild from the problems instead.
        return (DatasetError, (self.problems, self.root))


# --------------------------------------------------------------------------------------------- path helpers


def display_path(path: Path, root: Path) -> str:
    """Path relative to the dataset root for messages (absolute when outside)."""
    try:
        return Path(os.path.normpath(path)).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def path_escape_reason(path: Path, root: Path) -> str | None:
    """Why ``path`` leaves the dataset folder (``../`` or an absolute path elsewhere), else None.

    The check is lexical, on what dataset.json says: a symlink the user placed inside the folder (data on another
    disk, a shared copy) is followed, because it is their deliberate choice and we only ever read it. Only string
    operations are used, so the file itself is never opened.
    """
    root = Path(os.path.realpath(root))
    lexical = Path(os.path.normpath(path if path.is_absolute() else root / path))
    if not lexical.is_relative_to(root):
        shown = path.relative_to(root) if path.is_relative_to(root) else path  # keeps the '../' of dataset.json
        return f"'{shown}' points outside the dataset folder {root}"
    return None


# ----------------------------------------------------------------------------------------- structural checks


def _label_declaration_problems(desc: DatasetDescription) -> list[Problem]:
    problems = []
    if 0 not in desc.labels.values():
        problems.append(Problem(None, f"no background label 0 in {desc.labels}", 'declare background, e.g. "0"'))
    plain = Counter(v for v in desc.labels.values() if not isinstance(v, tuple))
    for value, n in sorted(plain.items()):
        if n > 1 and desc.regions is None:
            names = [k for k, v in desc.labels.items() if v == value]
            problems.append(Problem(None, f"label value {value} is declared {n} times ({names})", "keep one name"))
    if any(v < 0 for v in desc.label_values):
        problems.append(Problem(None, f"negative label values in {desc.labels}", "use values 0, 1, 2, ..."))
    rco = desc.regions_class_order
    if desc.regions is not None and rco is not None and len(rco) != len(desc.regions):
        msg = f"regions_class_order has {len(rco)} entries for {len(desc.regions)} regions"
        problems.append(Problem(None, msg, "give one label value per region in regions_class_order"))
    if 0 in desc.labels.values() and all(v >= 0 for v in desc.label_values):  # else reported above
        problems += _label_value_problems(desc)
    return problems


def _label_value_problems(desc: DatasetDescription) -> list[Problem]:
    """nnU-Net v2's rules: labels 0..N-1 (output k is label k: a gap fails training with an index error) and the
    ignore label, if any, right after them. Region members may be any values, as the outputs are the regions."""
    ignore, name = desc.labels.get("ignore"), f"dataset '{desc.name}'"
    if isinstance(ignore, tuple):
        fix = 'give "ignore" one integer value, the largest of all labels'
        return [Problem(None, f"{name}: the ignore label is a region {list(ignore)}", fix)]
    values = sorted({x for k, v in desc.labels.items() if k != "ignore" for x in (v if isinstance(v, tuple) else (v,))})
    misplaced = ignore is not None and any(v >= ignore for v in values)  # a gap left by the ignore label is its fault
    if desc.regions is None and values != list(range(len(values))) and not misplaced:
        msg = f"{name}: label values {values} are not consecutive (nnU-Net v2 requires 0..N-1)"
        fix = f"relabel the label files and dataset.json 'labels' so the values are 0..{len(values) - 1}"
        if desc.layout == "nnunetv2":
            fix += " (or train regions: region-based labels, lists in 'labels', may use any values)"
        return [Problem(None, msg, fix)]
    n = len(values) if desc.regions is None else max(values, default=0) + 1  # the ignore label's value
    if ignore is not None and ignore != n:
        msg = f"{name}: the ignore label {ignore} must be the largest value, right after the labels {values}"
        labels = f"the labels 0..{n - 1} and " if desc.regions is None else ""
        return [Problem(None, msg, f'relabel to {labels}the ignore voxels {n}, and declare "ignore": {n}')]
    return []


def _file_problems(case: Case, desc: DatasetDescription, labelled: bool) -> list[Problem]:
    """Paths that leave the dataset folder or do not exist; checked with realpath/stat only."""
    problems = []
    per_channel = len(case.images) > 1 or desc.layout == "nnunetv2"
    files: list[tuple[str, Path]] = []
    for i, p in enumerate(case.images):
        name = desc.channel_names[i] if i < len(desc.channel_names) else "?"
        files.append((f"image channel {i} ({name})" if per_channel else "image", p))
    if case.label is not None:
        files.append(("label", case.label))
    elif labelled:
        fix = 'add "label": "./labelsTr/<case>.nii.gz" to its training entry, or move the case to "test"'
        problems.append(Problem(case.id, "training case has no label", fix))
    for what, p in files:
        reason = path_escape_reason(p, desc.root)
        if reason is not None:
            fix = "keep every file inside the dataset folder (copy it in; relative paths without '../')"
            problems.append(Problem(case.id, f"{what} path {reason}; it was not opened", fix))
        elif not os.path.exists(p):
            if desc.layout == "nnunetv2":
                fix = f"add {display_path(p, desc.root)} or remove all of the case's files"
            else:
                fix = "add the file or correct its path in dataset.json"
            broken = " (a broken symlink)" if os.path.islink(p) else ""
            problems.append(Problem(case.id, f"{what} file {display_path(p, desc.root)} does not exist{broken}", fix))
        elif not os.path.isfile(p):
            problems.append(Problem(case.id, f"{what} {display_path(p, desc.root)} is not a file", "point to a file"))
    return problems


def _split_problems(desc: DatasetDescription) -> list[Problem]:
    problems: list[Problem] = []
    known = {c.id for c in desc.training}
    for k, fold in enumerate(desc.splits or []):
        unknown = sorted((set(fold["train"]) | set(fold["val"])) - known)
        if unknown:
            shown = ", ".join(unknown[:10]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 10 else "")
            msg = f"splits.json fold {k} names case ids that are not training cases: {shown}"
            problems.append(Problem(None, msg, "remove them from splits.json or add the cases to the training set"))
        both = sorted(set(fold["train"]) & set(fold["val"]))
        if both:
            msg = f"splits.json fold {k} has cases in both train and val: {', '.join(both[:10])}"
            problems.append(Problem(None, msg, "put each case in only one of train/val per fold"))
    return problems


def structural_problems(desc: DatasetDescription) -> list[Problem]:
    """Everything checkable without opening an image: channels, labels, ids, paths, file existence, splits.

    Args:
        desc: The dataset description.

    Returns:
        Every problem found (empty when fine).
    """
    problems: list[Problem] = []
    if not desc.channel_names:
        key = "channel_names" if desc.layout == "nnunetv2" else "modality"
        msg = f"dataset.json declares 0 channels ('{key}' is empty)"
        problems.append(Problem(None, msg, f'fill \'{key}\' with one name per channel, e.g. {{"0": "CT"}}'))
    if not desc.training:
        problems.append(Problem(None, "the training list is empty", "add at least one labelled case"))
    problems += _label_declaration_problems(desc)
    for kind, cases in (("training", desc.training), ("test", desc.test)):
        for cid, n in Counter(c.id for c in cases).items():
            if n > 1:
                fix = "give every case a unique file name (the case id is the file name without suffix)"
                problems.append(Problem(cid, f"case id '{cid}' appears {n} times in {kind}", fix))
    for c in desc.training:
        problems += _file_problems(c, desc, labelled=True)
    for c in desc.test:
        problems += _file_problems(c, desc, labelled=False)
    return problems + _split_problems(desc)


# --------------------------------------------------------------------------------------------- header checks


def _readable(path: Path, root: Path) -> bool:
    # Escaping or missing files were reported by structural_problems; never open them here.
    return path_escape_reason(path, root) is None and os.path.isfile(path)


def _header_problems(case: Case, desc: DatasetDescription) -> tuple[list[Problem], bool]:
    """Dimensionality, channel counts and grid agreement from headers; returns (problems, data readable)."""
    problems: list[Problem] = []
    ok = True
    single_file = len(case.images) == 1
    geometries: list[tuple[str, Any]] = []
    names = desc.channel_names
    files = [(f"image channel {i} ({names[i] if i < len(names) else '?'})", p) for i, p in enumerate(case.images)]
    if single_file:
        files = [("image", case.images[0])]
    if case.label is not None:
        files.append(("label", case.label))
    for what, path in files:
        if not _readable(path, desc.root):
            ok = False
            continue
        shown = display_path(path, desc.root)
        try:
            geometry, n_channels = read_geometry(path)
        except Exception as e:  # any reader failure is a problem of this file, not of the validator
            reason = _reason(e, path)
            if "expected a 3D" in reason:  # 2D or 5D files: the reader names the shape it found
                fix = "store a 3D volume (a single slice as a 1-slice 3D volume), or 4D (x, y, z, channel) for channels"
            else:
                fix = "re-export the file (e.g. with SimpleITK or nibabel); check that it is not truncated"
            problems.append(Problem(case.id, f"{what} file {shown} cannot be read: {reason}", fix))
            ok = False
            continue
        expected = desc.num_channels if single_file and what == "image" else 1
        if n_channels != expected and desc.num_channels > 0:  # 0 declared channels is reported once, structurally
            ok = False
            if what == "label":
                msg, fix = f"label file {shown} has {n_channels} channels", "store the label as a single 3D volume"
            elif single_file:
                key = "channel_names" if desc.layout == "nnunetv2" else "modality"
                declared = f"'{key}' declares {expected} {list(desc.channel_names)}"
                msg = f"image file {shown} has {n_channels} channel(s) but dataset.json {declared}"
                fix = f"make '{key}' list one name per channel, or store the case with {expected} channel(s)"
            else:
                msg, fix = f"{what} file {shown} has {n_channels} channels", "store one 3D file per channel"
            problems.append(Problem(case.id, msg, fix))
            continue
        if not all(np.isfinite(s) and s > 0 for s in geometry.spacing):
            problems.append(Problem(case.id, f"{what} file {shown} has spacing {geometry.spacing}", "fix the header"))
        geometries.append((what, geometry))
    for what, geometry in geometries[1:]:
        ref_what, ref = geometries[0]
        origin_tol = ORIGIN_TOL_VOXELS * float(min(ref.spacing))
        diffs = ref.same_grid(geometry, SPACING_RTOL, DIRECTION_ATOL, origin_tol)
        if diffs:
            # read_image refuses channels of different shapes: skip the data checks rather than report twice.
            ok = ok and (what == "label" or geometry.shape == ref.shape)
            msg = f"{what} does not lie on the grid of the {ref_what}: {'; '.join(diffs)}"
            fix = f"resample or re-export the {what} onto the {ref_what} grid (same shape, spacing, origin, direction)"
            problems.append(Problem(case.id, msg, fix))
    return problems, ok


# ----------------------------------------------------------------------------------------------- data checks


def _reason(e: Exception, path: str | Path | None = None) -> str:
    """The reader's reason without the file path it may prefix (messages name the file themselves)."""
    reason = getattr(e, "reason", None) or f"{type(e).__name__}: {e}"
    return reason.split(f"{path}: ", 1)[-1] if path is not None else reason


_Job = tuple[str, tuple[str, ...], "str | None", tuple[int, ...], tuple[str, ...], str]


def _data_problems(job: _Job) -> list[Problem]:
    """Voxel checks of one case (NaN/Inf, label values); module-level so worker processes can run it."""
    case_id, images, label, label_values, channel_names, root = job
    problems: list[Problem] = []
    try:
        with warnings.catch_warnings():  # grid differences between channels were reported by the header checks
            warnings.simplefilter("ignore")
            data, _ = read_image([Path(p) for p in images])
        for c in range(data.shape[0]):
            n_nan = int(np.count_nonzero(np.isnan(data[c])))
            n_inf = int(np.count_nonzero(np.isinf(data[c])))
            if n_nan or n_inf:
                name = channel_names[c] if c < len(channel_names) else "?"
                msg = f"image channel {c} ({name}) has {n_nan} NaN and {n_inf} Inf voxels (of {data[c].size})"
                fix = "replace non-finite values before training (e.g. with the image minimum via numpy.nan_to_num)"
                problems.append(Problem(case_id, msg, fix))
        del data  # one case in memory at a time
    except Exception as e:
        shown = display_path(Path(getattr(e, "path", None) or images[0]), Path(root))
        msg = f"image file {shown} cannot be read: {_reason(e, getattr(e, 'path', None))}"
        problems.append(Problem(case_id, msg, "re-export the image file (check that it is not truncated)"))
    if label is None:
        return problems
    shown = display_path(Path(label), Path(root))
    try:
        seg, _ = read_label(Path(label))
    except ValueError as e:  # read_label's verdict on float labels holding non-integer (or non-finite) values
        fix = "labels must hold integer class values: round them and save as an integer type (e.g. uint8)"
        problems.append(Problem(case_id, f"label file {shown} has non-integral values: {_reason(e, label)}", fix))
        return problems
    except Exception as e:
        msg = f"label file {shown} cannot be read: {_reason(e, label)}"
        problems.append(Problem(case_id, msg, "re-export the label file (check that it is not truncated)"))
        return problems
    values, counts = np.unique(seg, return_counts=True)
    bad = [(int(v), int(n)) for v, n in zip(values, counts, strict=True) if int(v) not in label_values]
    if bad:
        listed = ", ".join(f"{v} ({n} voxels)" for v, n in bad[:20]) + (" ..." if len(bad) > 20 else "")
        msg = f"label has values not declared in dataset.json 'labels' {list(label_values)}: {listed}"
        fix = "declare these values in dataset.json 'labels' or remap them to declared values"
        problems.append(Problem(case_id, msg, fix))
    return problems


def _run_data_checks(jobs: list[_Job], workers: int) -> list[Problem]:
    if workers <= 1 or len(jobs) <= 1:
        return [p for job in jobs for p in _data_problems(job)]
    # spawn, not fork: the caller may hold threads (torch, BLAS) that make forked children deadlock.
    ctx = multiprocessing.get_context("spawn")
    chunksize = max(1, len(jobs) // (workers * 8))
    try:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
            return [p for result in pool.map(_data_problems, jobs, chunksize=chunksize) for p in result]
    except BrokenProcessPool as e:
        fix = "rerun with fewer workers (each holds one case in memory) or on a machine with more memory"
        return [Problem(None, f"a validation worker process died ({e}); data checks are incomplete", fix)]


# ------------------------------------------------------------------------------------------------ entry points


def _validate(
    root_or_desc: str | Path | DatasetDescription, workers: int, check_data: bool
) -> tuple[DatasetDescription | None, list[Problem]]:
    from decathlete.io.datasets import DatasetDescription, parse_dataset  # lazy: datasets imports this module

    if isinstance(root_or_desc, DatasetDescription):
        desc, problems = root_or_desc, []
    else:
        try:
            desc, problems = parse_dataset(root_or_desc)
        except DatasetError as e:
            return None, list(e.problems)
    problems += structural_problems(desc)
    jobs: list[_Job] = []
    for case in (*desc.training, *desc.test):
        found, readable = _header_problems(case, desc)
        problems += found
        if readable and check_data:
            label = None if case.label is None else str(case.label)
            images = tuple(str(p) for p in case.images)
            jobs.append((case.id, images, label, desc.label_values, desc.channel_names, str(desc.root)))
    problems += _run_data_checks(jobs, workers)
    # Dataset-level problems first, then grouped per case in dataset order (the sort is stable).
    order = {c.id: i for i, c in reversed(list(enumerate((*desc.training, *desc.test))))}
    problems.sort(key=lambda p: -1 if p.case is None else order.get(p.case, len(order)))
    return desc, problems


def validate_dataset(
    root_or_desc: str | Path | DatasetDescription, workers: int = 1, check_data: bool = True
) -> list[Problem]:
    """Check a raw dataset and return every problem found (empty list when it is fine). Writes nothing.

    Args:
        root_or_desc: Dataset folder (MSD or nnU-Net v2 layout) or an already loaded description.
        workers: Processes for the voxel-data checks (one case in memory per process).
        check_data: Also read voxel data (NaN/Inf, label values); headers are always checked.

    Returns:
        The problems, dataset-level ones first, then per case in dataset order.
    """
    return _validate(root_or_desc, workers, check_data)[1]


def check_dataset(root_or_desc: str | Path | DatasetDescription, workers: int = 1) -> DatasetDescription:
    """Validate a dataset fully and return its description.

    Args:
        root_or_desc: Dataset folder or description.
        workers: Processes for the voxel-data checks.

    Returns:
        The dataset description.

    Raises:
        DatasetError: Listing every problem, if there is any.
    """
    desc, problems = _validate(root_or_desc, workers, check_data=True)
    if problems or desc is None:
        raise DatasetError(problems, root=None if desc is None else desc.root)
    return desc
