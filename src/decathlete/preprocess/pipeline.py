"""Preprocess one case, or a whole dataset in parallel, into the on-disk cache (`decathlete.preprocess.cache`).

Per case, in nnU-Net v2's order: read -> transpose -> crop to the nonzero box -> normalise -> resample -> class
locations.
Normalising before resampling matters: CT is clipped before cubic interpolation, which bounds its ringing, and
the nonzero mask used by masked z-scores is exact at native resolution.

Config keys (a plans.json configuration; everything else in it is ignored):

* ``"spacing"``: target spacing (z, y, x) mm; two values mean (y, x) with z kept per case; missing = no resampling.
* ``"normalization"``: one spec per channel (`decathlete.preprocess.normalization`); missing = z-score each.
* ``"resampling"``: ``image_order`` (3), ``label_order`` (1), ``anisotropy_threshold`` (3.0),
  ``separate_axis_order`` (0), and for 2D configurations ``keep_slice_axis_spacing`` (False) with ``slice_axis``
  (0): the slice axis keeps each case's own spacing.
* ``"crop_to_nonzero"``: False keeps whole volumes (default True: nnU-Net's crop to the nonzero box).
* ``"transpose_forward"``: the plan's axis order (`decathlete.planning.plans.Plans.transpose_forward`; default
  identity). Image, label and spacing are transposed right after reading, so ``"spacing"``, ``"slice_axis"`` and
  every shape, box and spacing in the properties are in that order, while ``geometry`` stays the file's own;
  `decathlete.infer.inversion.invert_preprocessing` undoes the crop there and then the transposition.

Parallelism: `decathlete.preprocess.workers` (at most ``workers`` child processes, a fresh one per case or per chunk
of tiny cases).
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from decathlete import registry
from decathlete.io.datasets import Case
from decathlete.io.images import Geometry, read_geometry, read_image, read_label
from decathlete.planning.plans import IDENTITY, check_transpose
from decathlete.preprocess import cache
from decathlete.preprocess.cropping import crop_to_nonzero
from decathlete.preprocess.normalization import normalize, uses_nonzero_mask
from decathlete.preprocess.resampling import compute_new_shape, resample_data, resample_seg, separate_axis_for
from decathlete.preprocess.workers import CHUNK_VOXELS, run_tasks

RESAMPLING_DEFAULTS: dict[str, Any] = {
    "image_order": 3,
    "label_order": 1,
    "anisotropy_threshold": 3.0,
    "separate_axis_order": 0,
    "keep_slice_axis_spacing": False,
    "slice_axis": 0,
}
MAX_LOCATIONS_PER_CLASS = 10_000


@dataclass
class PreprocessedCase:
    """One preprocessed case.

    Attributes:
        data: image ``(C, z, y, x)`` float32 at the target spacing.
        seg: label map ``(z, y, x)`` int8 (int16 when labels exceed 127), -1 = outside the nonzero mask when a
            channel is normalised inside it; None for unlabelled cases.
        properties: JSON-safe record: ``case_id``, ``image_files``, ``label_file``, ``geometry`` (the original
            ``Geometry.to_dict()``), ``shape_before_crop``, ``crop_bbox`` (half-open, z/y/x), ``shape_after_crop``,
            ``spacing_after_crop`` (= original), ``target_spacing``, ``separate_axis``, ``shape_after_resampling``
            (all in the ``transpose_forward`` order), ``transpose_forward``,
            ``labels_present``, ``label_voxels`` (voxels per label), ``class_locations`` (sampled count per
            label), ``outside_marked`` (-1 used), ``normalization`` (specs used) and ``preprocessing`` (settings).
        class_locations: label -> ``(N, 3)`` int32 voxel coordinates (z, y, x) of that foreground label, at most
            ``MAX_LOCATIONS_PER_CLASS`` sampled without replacement (seeded by the case id).
    """

    data: np.ndarray
    seg: np.ndarray | None
    properties: dict[str, Any]
    class_locations: dict[int, np.ndarray] = field(default_factory=dict)


def resolve_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The preprocessing settings of ``config`` with resampling defaults filled in (JSON-safe).

    Stored in every case's properties; a cached case whose settings differ is preprocessed again. Only
    ``spacing``, ``normalization`` (None = z-score per channel), ``resampling``, ``crop_to_nonzero`` and
    ``transpose_forward`` count.
    """
    spacing = config.get("spacing")
    resampling = {**RESAMPLING_DEFAULTS, **(config.get("resampling") or {})}
    settings = {
        "spacing": None if spacing is None else [float(s) for s in spacing],
        "normalization": config.get("normalization"),
        "resampling": {k: resampling[k] for k in RESAMPLING_DEFAULTS},  # planner extras do not count
    }
    if config.get("crop_to_nonzero", True) is False:  # only when off: caches made before the option stay valid
        settings["crop_to_nonzero"] = False
    order = check_transpose(config.get("transpose_forward") or IDENTITY)
    if order != list(IDENTITY):  # only when transposed: caches made before transposition existed stay valid
        settings["transpose_forward"] = order
    return json.loads(json.dumps(settings))  # tuples -> lists, numpy scalars fail here rather than later


def _target_spacing(spacing: Sequence[float], settings: Mapping[str, Any]) -> tuple[float, ...]:
    """Target spacing (z, y, x) mm for a case of ``spacing``, honouring 2D configurations."""
    target = settings["spacing"]
    if target is None:
        return tuple(spacing)
    target = list(target)
    axis = int(settings["resampling"]["slice_axis"])
    if len(target) == 2:
        target.insert(axis, spacing[axis])
    elif settings["resampling"]["keep_slice_axis_spacing"]:
        target[axis] = spacing[axis]
    if len(target) != 3:
        raise ValueError(f"target spacing needs 2 or 3 values (z, y, x), got {settings['spacing']}")
    return tuple(float(t) for t in target)


def _label_array(seg: np.ndarray) -> np.ndarray:
    """Labels as int8, or int16 when they do not fit: small, signed (room for -1) and the same on every case."""
    if seg.size and (int(seg.min()) < -1 or int(seg.max()) > np.iinfo(np.int16).max):
        raise ValueError(f"label values must lie in [-1, 32767], got [{seg.min()}, {seg.max()}]")
    return seg.astype(np.int8 if seg.size == 0 or int(seg.max()) <= np.iinfo(np.int8).max else np.int16)


def case_seed(case_id: str) -> int:
    """Deterministic seed for a case (``hash()`` of a str differs between processes)."""
    return zlib.crc32(case_id.encode())


def sample_class_locations(
    seg: np.ndarray, seed: int, max_per_class: int = MAX_LOCATIONS_PER_CLASS
) -> dict[int, np.ndarray]:
    """Up to ``max_per_class`` random voxel coordinates of every foreground label (> 0) in ``seg``.

    Args:
        seg: label map ``(z, y, x)``.
        seed: random seed (use `case_seed`).
        max_per_class: sample size cap per label.

    Returns:
        Label -> ``(N, 3)`` int32 coordinates (z, y, x), sorted in memory order for cache-friendly reads.
    """
    flat = seg.reshape(-1)
    foreground = np.flatnonzero(flat > 0)
    values = flat[foreground]
    # One sort groups every label's voxels: a seg == label pass per label would cost O(labels x voxels).
    order = np.argsort(values, kind="stable")
    labels, starts = np.unique(values[order], return_index=True)
    bounds = [*starts[1:], order.size]
    rng = np.random.default_rng(seed)
    result = {}
    for label, start, stop in zip(labels, starts, bounds):
        members = foreground[order[start:stop]]
        if members.size > max_per_class:
            members = np.sort(rng.choice(members, max_per_class, replace=False))
        result[int(label)] = np.stack(np.unravel_index(members, seg.shape), axis=1).astype(np.int32)
    return result


def _read_case(
    paths: list[Path], label_path: str | Path | None, case_id: str
) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """Image (stored dtype: int16 CT costs half of float32), signed small-int labels or None, geometry."""
    data, geometry = read_image(paths, dtype=None)
    if label_path is None:
        return data, None, geometry
    seg, label_geometry = read_label(label_path)
    if label_geometry.shape != geometry.shape:
        raise ValueError(f"{case_id}: label shape {label_geometry.shape} != image shape {geometry.shape}")
    return data, _label_array(seg), geometry


def _transpose_case(data: np.ndarray, seg: np.ndarray | None, spacing: Sequence[float], order: Sequence[int]
                    ) -> tuple[np.ndarray, np.ndarray | None, tuple[float, ...]]:  # fmt: skip
    """Image ``(C, z, y, x)``, labels and spacing in the plan's axis ``order`` (contiguous: the crop, the resampling
    and the cache then read memory in order, and the file's array is freed)."""
    spacing = tuple(float(spacing[a]) for a in order)
    if list(order) == list(IDENTITY):
        return data, seg, spacing
    data = np.ascontiguousarray(data.transpose(0, *(a + 1 for a in order)))
    return data, None if seg is None else np.ascontiguousarray(seg.transpose(order)), spacing


def _resample_labels(
    seg: np.ndarray | None, new_shape: tuple[int, ...], rs: Mapping[str, Any], axis: int | None, case_id: str
) -> tuple[np.ndarray | None, dict[int, np.ndarray], dict[str, int]]:
    """Resampled labels, their class locations and voxel counts per label (all empty without labels)."""
    if seg is None:
        return None, {}, {}
    seg = resample_seg(seg, new_shape, rs["label_order"], axis, rs["separate_axis_order"])
    values, voxels = np.unique(seg, return_counts=True)
    counts = {str(int(v)): int(n) for v, n in zip(values, voxels)}
    return seg, sample_class_locations(seg, case_seed(case_id), MAX_LOCATIONS_PER_CLASS), counts


def preprocess_case(
    image_paths: Sequence[str | Path] | str | Path,
    label_path: str | Path | None,
    config: Mapping[str, Any],
    case_id: str | None = None,
) -> PreprocessedCase:
    """Read, crop, normalise and resample one case.

    Args:
        image_paths: one multi-channel file or one file per channel.
        label_path: label map file, or None (inference / unlabelled case).
        config: configuration dict (see the module docstring).
        case_id: identifier recorded in the properties and used to seed the location sampling; default: the
            first image's file name without suffix.

    Returns:
        The `PreprocessedCase` (see its docstring for the properties).
    """
    paths = [Path(image_paths)] if isinstance(image_paths, (str, Path)) else [Path(p) for p in image_paths]
    case_id = case_id or paths[0].name.split(".")[0]
    data, seg, geometry = _read_case(paths, label_path, case_id)
    settings = resolve_config(config)
    order = settings.get("transpose_forward", list(IDENTITY))
    data, seg, spacing = _transpose_case(data, seg, geometry.spacing, order)
    specs = settings["normalization"] or [{"scheme": "zscore", "use_nonzero_mask": False}] * data.shape[0]
    mark = uses_nonzero_mask(specs)
    cropped, seg, bbox, mask = crop_to_nonzero(data, seg, mark_outside=mark,
                                               crop=settings.get("crop_to_nonzero", True))
    normalized = normalize(cropped, specs, mask)
    del data, cropped, mask  # the uncropped volume is no longer needed: free it before resampling allocates
    target = _target_spacing(spacing, settings)
    new_shape = compute_new_shape(normalized.shape[1:], spacing, target)
    rs = settings["resampling"]
    axis = separate_axis_for(spacing, target, rs["anisotropy_threshold"])
    shape_after_crop = list(normalized.shape[1:])
    out = resample_data(normalized, new_shape, rs["image_order"], axis, rs["separate_axis_order"])
    del normalized
    seg, locations, counts = _resample_labels(seg, new_shape, rs, axis, case_id)
    properties = {
        "case_id": case_id,
        "image_files": [str(p) for p in paths],
        "label_file": None if label_path is None else str(label_path),
        "geometry": geometry.to_dict(),
        "transpose_forward": list(order),
        "shape_before_crop": [geometry.shape[a] for a in order],
        "crop_bbox": [list(b) for b in bbox],
        "shape_after_crop": shape_after_crop,
        "spacing_after_crop": list(spacing),
        "target_spacing": list(target),
        "separate_axis": axis,
        "shape_after_resampling": list(new_shape),
        "labels_present": sorted(int(v) for v in counts),
        "label_voxels": counts,
        "class_locations": {str(k): int(v.shape[0]) for k, v in locations.items()},
        "outside_marked": bool(mark and seg is not None),
        "normalization": specs,
        "preprocessing": settings,
    }
    return PreprocessedCase(out, seg, properties, locations)


def labels_on_preprocessed_grid(seg: np.ndarray, properties: Mapping[str, Any]) -> np.ndarray:
    """A label map on a raw case's grid (the file's axis order), brought onto that case's preprocessed grid the way
    `preprocess_case` brings its labels: transposed, cropped to the case's box, resampled to its preprocessed shape.
    A cascade stage takes its previous stage's prediction this way, in training and in prediction alike.

    Raises:
        ValueError: ``seg`` is not on the grid the properties were made from.
    """
    order = properties.get("transpose_forward", list(IDENTITY))
    seg = _label_array(np.asarray(seg)).transpose(order)
    if list(seg.shape) != list(properties["shape_before_crop"]):
        raise ValueError(f"{properties['case_id']}: a label map of shape {list(seg.shape)} (in the plan's axis order) "
                         f"is not on the case's grid {properties['shape_before_crop']}")
    rs = properties["preprocessing"]["resampling"]
    cropped = seg[tuple(slice(lo, hi) for lo, hi in properties["crop_bbox"])]
    return resample_seg(np.ascontiguousarray(cropped), tuple(properties["shape_after_resampling"]), rs["label_order"],
                        properties["separate_axis"], rs["separate_axis_order"])


_Task = tuple[str, list[str], "str | None", dict[str, Any], str, str, list[str]]


def _guarded(task: _Task) -> tuple[str, float, str | None]:
    """Preprocess and write one case: ``(case id, seconds, None)``, or the exception as text instead of raising."""
    case_id, images, label, config, out_dir, fmt, plugins = task
    start = time.perf_counter()
    try:
        for package in plugins:  # a worker process imports the plugins whose normalisers the plan may name
            registry.load_plugin(package)
        cache.write_case(Path(out_dir), case_id, preprocess_case(images, label, config, case_id=case_id), fmt)
    except Exception as exc:  # every failure is collected and re-raised once the other cases are done
        return case_id, 0.0, f"{type(exc).__name__}: {exc}"
    return case_id, time.perf_counter() - start, None


def preprocess_dataset(
    cases: Sequence[Case],
    config: Mapping[str, Any],
    out_dir: Path,
    workers: int = 1,
    progress: bool = True,
    cache_format: str = cache.DEFAULT_FORMAT,
) -> dict[str, Any]:
    """Preprocess every case into ``out_dir``, skipping cases already complete with the same settings.

    Args:
        cases: the dataset's cases (images + label).
        config: configuration dict (see the module docstring).
        out_dir: the configuration's cache folder.
        workers: parallel processes; 1 runs in this process.
        progress: show a tqdm progress bar.
        cache_format: "b2nd" (compressed, default) or "npy"; see `decathlete.preprocess.cache`.

    Returns:
        ``{"n_cases", "n_done", "n_skipped", "seconds", "case_seconds"}``.

    Raises:
        RuntimeError: after all other cases are written, listing the cases that failed.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache.clean_stale_temporaries(out_dir)
    expected = {"preprocessing": resolve_config(config), "cache_format": cache_format}
    tasks = [
        (c.id, [str(p) for p in c.images], c.label and str(c.label), dict(config), str(out_dir), cache_format,
         registry.loaded_plugins())
        for c in cases
        if not cache.case_is_complete(out_dir, c.id, expected)
    ]
    results = run_tasks(_guarded, tasks, workers, progress, _task_voxels)
    failed = {cid: err for cid, _, err in results if err is not None}
    if failed:
        details = "; ".join(f"{cid}: {err}" for cid, err in sorted(failed.items()))
        raise RuntimeError(f"{len(failed)} of {len(tasks)} cases failed: {details}")
    return {
        "n_cases": len(cases),
        "n_done": len(tasks),
        "n_skipped": len(cases) - len(tasks),
        "seconds": time.perf_counter() - start,
        "case_seconds": {cid: seconds for cid, seconds, _ in results},
    }


def _task_voxels(task: _Task) -> int:
    """Voxels x channels of a task's images from their headers; unknown = a full chunk (own process)."""
    try:
        return sum(int(np.prod(geo.shape)) * channels for geo, channels in map(read_geometry, task[1]))
    except Exception:  # unreadable here: the worker reports the real error for this case
        return CHUNK_VOXELS
