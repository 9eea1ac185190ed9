"""Pre-extracted patch sets in HDF5 (van den Hork et al. 2019, section 3.2 "Patch dataset"), next to the blosc2 cache.

van den Hork et al. draw their training and validation patches once, from disjoint scans, store them in separate
HDF5 files "in small data types" and read them lazily during training, so a data set larger than memory still
trains. Here `write_patch_set` draws them with the recipe's own sampler (`decathlete.recipes.build.build_sampler`,
the nnU-Net crop rules of `decathlete.data.sampling.PatchSampler`) and the ``patch_set`` sampler replays them through
the ordinary sampler protocol, so the trainer needs no change: ``decathlete patches WORKDIR --train N --val N``, then
``decathlete train WORKDIR --set sampler=patch_set``.

Where: ``WORKDIR/patches/<data_identifier>/fold_<k>/{train,val}.h5``. The folder is named by the configuration's
``data_identifier`` (the name of its preprocessed folder, ``WORKDIR/preprocessed/<data_identifier>``), not by the
configuration name, because a sampler is handed only that folder (``case_dir``): ``case_dir.parent.parent /
"patches" / case_dir.name`` is its patch folder. For the built-in planners the two names coincide; configurations of
a plugin that share a ``data_identifier`` also share this folder (the file's ``configuration`` attribute says whose
it is, and the sampler refuses a file whose crop size is not its own).

Which cases: the fold's split as training reads it (`decathlete.data.splits.fold_split`): ``train.h5`` from the
training cases, cropped at the training crop size (the augmentation's input size, ``build_augmentation(recipe,
config)[1]``, so that rotation and scaling still have their margin), ``val.h5`` from the validation cases at the
patch size. No case is in both, as in the paper (71 validation scans, 210 training scans), except for fold ``all``
(``fold_all``), which trains and validates on every case as nnU-Net's fold ``all`` does.

Drawing: in blocks of ``block`` patches, each with the sampler's ``sample_batch(block, rng)`` and its own generator
``np.random.default_rng([seed, KIND_CODES[kind], block_index])``. A block is thus a pure function of (seed, file,
block index), whatever happened before, which is what makes a resumed file identical to one written in one go. The
sampler forces foreground at the last ``round(block * oversample_foreground)`` positions of a batch; with the default
block of 10 and the recipe's 0.33 that is exactly 3 of every 10 patches: the paper's "at least 30 %" of patches with
foreground, and nnU-Net's 33 % up to rounding. (A block of 16 would force 5, 31 %; the rule's rounding is per batch.)
Every patch records whether it was forced (``forced``) and the summary reports the fraction.

Layout of one file:

* ``image`` ``(N, C, *size)`` float16: the cache's normalised intensities (z-scores, a few units) keep a relative
  precision of 2^-11, far below the images' noise, and fit float16's range, which is checked (a value beyond
  +-65504 or not finite is an error, not an infinity); half the bytes of float32. ``label`` ``(N, 1, *size)`` int8
  (-1 outside the scan, as the sampler gives), range checked too; ``case_id`` ``(N,)`` variable-length UTF-8;
  ``forced`` ``(N,)`` bool.
* Chunks of one patch (``(1, C, *size)``): a training read takes one whole patch, so a chunk is exactly one read
  and nothing else is decoded.
* Compression: gzip level 1 (`COMPRESSION`). Against LZF, neither read faster on every kind of data (gzip decodes
  constant runs such as air, padding and background faster, LZF textured tissue), gzip's files were 20-30 % smaller,
  which is what matters for a patch set made to outgrow memory, and deflate is built into every HDF5 library (LZF is
  h5py's own filter). Byte shuffling slowed reads for a few percent of size: off.
  ``benchmarks/patchset_vs_cache.py --compression`` repeats the comparison on a work folder's own patches.
* Attributes: ``case_ids`` (JSON list: the cases the file draws from), ``size``, ``n_written``, ``n_total``,
  ``seed``, ``block``, ``recipe``, ``sampler`` (JSON spec), ``configuration``, ``data_identifier``, ``fold``,
  ``kind``, ``plan`` (a hash of what the patches depend on in the plan, `PLAN_KEYS`: patches of a re-planned
  cache are not reused),
  ``format_version``.

What it costs: a stored training crop holds the augmentation's whole margin, padding included, and is decoded
whole, whereas the blosc2 cache decodes only a crop's overlap with its case; so a patch set is larger on disk and
slower to read than the cache (``benchmarks/patchset_vs_cache.py``; results in ``benchmarks/results/``). It buys a
fixed, inspectable, portable set of patches drawn once (the paper's reason: drawing was costly in their pipeline),
with reads whose cost does not depend on the size of the scans.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from decathlete.registry import register_sampler

FORMAT_VERSION = 1
KINDS = ("train", "val")
KIND_CODES = {"train": 0, "val": 1}  # second entry of a block's seed: the two files draw independent streams
DEFAULT_BLOCK = 10
COMPRESSION = {"compression": "gzip", "compression_opts": 1, "shuffle": False}  # see the module docstring
PARTIAL_SUFFIX = ".partial"
FLOAT16_MAX = float(np.finfo(np.float16).max)
# Attributes that must agree for a file to be reused or resumed (n_written is progress, not identity).
IDENTITY = ("case_ids", "size", "n_total", "seed", "block", "recipe", "sampler", "configuration", "data_identifier",
            "fold", "kind", "plan", "format_version")
# What the patches depend on besides the recorded sizes, sampler and cases: the cache's content (spacing,
# normalisation, resampling, cropping, axis order) and the sampler's margin and ignore label. Batch size, network
# and budget are left out: re-fitting them must not throw a written patch set away.
PLAN_KEYS = ("spacing", "normalization", "resampling", "crop_to_nonzero", "transpose_forward", "spatial_dims",
             "patch_size", "data_identifier")


def patch_folder(workdir: str | Path, data_identifier: str, fold: int | str) -> Path:
    """``WORKDIR/patches/<data_identifier>/fold_<k>`` (``fold_all`` for fold ``"all"``): where a fold's ``train.h5``
    and ``val.h5`` live."""
    return Path(workdir) / "patches" / data_identifier / f"fold_{fold}"


def block_rng(seed: int, kind: str, block_index: int) -> np.random.Generator:
    """The generator of block ``block_index`` of file ``kind`` (``"train"`` / ``"val"``)."""
    return np.random.default_rng([int(seed), KIND_CODES[kind], int(block_index)])


def write_patch_set(workdir: str | Path, configuration: str, fold: int | str, n_train: int, n_val: int, *,
                    seed: int = 0, block: int = DEFAULT_BLOCK, progress: bool = True) -> dict[str, Any]:
    """Draw and store a fold's training and validation patches (module docstring); resumes an interrupted run.

    Args:
        workdir: planned and preprocessed work folder.
        configuration: configuration of its plans.json (``3d_fullres`` ...).
        fold: cross-validation fold, or ``"all"`` (every case in both files, as training on fold ``all`` reads
            them); its split is the one training uses (``WORKDIR/splits.json``, created if absent).
        n_train, n_val: patches in ``train.h5`` and ``val.h5``.
        seed: seed of the draws (with the file and block index).
        block: patches drawn per ``sample_batch`` call; sets the forced share through the sampler's rounding.
        progress: show a progress bar per file.

    Returns:
        ``{"folder": str, "train": summary, "val": summary}``, a summary being ``{"path", "status"`` (written,
        resumed, skipped), ``"n", "bytes", "seconds", "forced", "forced_fraction", "n_cases", "cases_drawn"}``.

    Raises:
        ValueError: a count below 1, a block below 1, or intensities or labels outside float16 / int8.
    """
    from decathlete.data.splits import fold_split
    from decathlete.labels import LabelScheme
    from decathlete.planning.plans import Plans
    from decathlete.recipes import build
    from decathlete.recipes.base import Recipe

    if min(n_train, n_val) < 1 or block < 1:
        raise ValueError(f"need at least one patch per file and per block, got train {n_train}, val {n_val}, "
                         f"block {block}")
    workdir = Path(workdir)
    plans = Plans.load(workdir / "plans.json")
    config = plans.configuration(configuration)
    recipe = Recipe.from_dict(plans.recipe_settings) if plans.recipe_settings else None
    if recipe is None:
        raise ValueError(f"{workdir / 'plans.json'} records no recipe settings; plan again with this version")
    split = fold_split(workdir, plans, fold)
    cases = workdir / "preprocessed" / config.data_identifier
    ignore = LabelScheme.from_dataset(plans.dataset).ignore_label
    plan_hash = _plan_hash(plans.preprocessing_config(configuration), ignore)
    folder = patch_folder(workdir, config.data_identifier, fold)
    sizes = {"train": tuple(build.build_augmentation(recipe, config)[1]), "val": tuple(config.patch_size)}
    counts, channels = {"train": n_train, "val": n_val}, len(plans.dataset["channel_names"])
    summary: dict[str, Any] = {"folder": str(folder)}
    for kind in KINDS:
        sampler = build.build_sampler(recipe, config, cases, split[kind], sizes[kind], ignore_label=ignore)
        attrs = {"case_ids": json.dumps(list(split[kind])), "size": list(sizes[kind]), "n_total": counts[kind],
                 "seed": seed, "block": block, "recipe": recipe.name, "sampler": json.dumps(asdict(recipe.sampler)),
                 "configuration": configuration, "data_identifier": config.data_identifier, "fold": fold,
                 "kind": kind, "plan": plan_hash, "format_version": FORMAT_VERSION}
        summary[kind] = _write_file(folder / f"{kind}.h5", sampler, attrs, channels, progress)
    return summary


def _plan_hash(preprocessing: dict[str, Any], ignore_label: int | None) -> str:
    relevant = {key: preprocessing.get(key) for key in PLAN_KEYS} | {"ignore_label": ignore_label}
    return hashlib.sha1(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _attr(value: Any) -> Any:
    """An HDF5 attribute as plain Python (arrays to lists, numpy scalars to numbers), for comparison."""
    if isinstance(value, bytes):
        return value.decode()
    return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value


def _matches(path: Path, attrs: dict[str, Any]) -> bool | None:
    """Whether the file's identity attributes equal ``attrs``; None when HDF5 cannot read it (killed mid-flush)."""
    try:
        with h5py.File(path, "r") as f:
            return all(k in f.attrs and _attr(f.attrs[k]) == attrs[k] for k in IDENTITY)
    except OSError:
        return None


def _create(path: Path, attrs: dict[str, Any], channels: int) -> h5py.File:
    """A new (partial) file with every dataset allocated at full length: chunks are stored only once written."""
    n, size = attrs["n_total"], tuple(attrs["size"])
    f = h5py.File(path, "w")
    f.create_dataset("image", (n, channels, *size), dtype=np.float16, chunks=(1, channels, *size), **COMPRESSION)
    f.create_dataset("label", (n, 1, *size), dtype=np.int8, chunks=(1, 1, *size), **COMPRESSION)
    f.create_dataset("case_id", (n,), dtype=h5py.string_dtype())
    f.create_dataset("forced", (n,), dtype=bool)
    for key, value in attrs.items():
        f.attrs[key] = value
    f.attrs["n_written"] = 0
    f.flush()
    return f


def _open_partial(partial: Path, attrs: dict[str, Any], channels: int) -> tuple[h5py.File, str]:
    """The partial file to continue (``"resumed"``) or a fresh one (``"written"``), saying why it starts over."""
    if partial.exists():
        state = _matches(partial, attrs)
        if state:
            return h5py.File(partial, "r+"), "resumed"
        why = "HDF5 cannot read it" if state is None else "it was written with other settings"
        print(f"starting {partial} over: {why}")
        partial.unlink()
    return _create(partial, attrs, channels), "written"


def _checked(image: np.ndarray, label: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The block cast to the stored dtypes, refusing values the casts would change beyond rounding."""
    peak = float(np.abs(image).max()) if image.size else 0.0
    if not np.isfinite(peak) or peak > FLOAT16_MAX:
        raise ValueError(f"{path}: intensities reach {peak}, beyond float16's +-{FLOAT16_MAX:.0f}; normalise the "
                         "data (the plan's normalisation should) before writing a patch set")
    if label.size and (label.min() < -128 or label.max() > 127):
        raise ValueError(f"{path}: label values {label.min()}..{label.max()} do not fit int8")
    return image.astype(np.float16), label.astype(np.int8)


def _write_file(path: Path, sampler: Any, attrs: dict[str, Any], channels: int, progress: bool) -> dict[str, Any]:
    """Write (or resume, or skip) one file; returns its summary."""
    start_time = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and _matches(path, attrs):
        return _summary(path, "skipped", time.perf_counter() - start_time)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    f, status = _open_partial(partial, attrs, channels)
    with f:
        n, block = attrs["n_total"], attrs["block"]
        done = int(f.attrs["n_written"])
        blocks = range(done // block, -(-n // block))
        for b in tqdm(blocks, desc=path.name, unit="block", disable=not progress, initial=done // block,
                      total=-(-n // block)):
            rows = slice(b * block, min(n, (b + 1) * block))
            rng = block_rng(attrs["seed"], attrs["kind"], b)
            image, label, meta = sampler.sample_batch(rows.stop - rows.start, rng)
            image, label = _checked(image, label, path)
            f["image"][rows], f["label"][rows] = image, label
            f["case_id"][rows] = [m["case_id"] for m in meta]
            f["forced"][rows] = [bool(m["forced"]) for m in meta]
            f.attrs["n_written"] = rows.stop  # after the rows: a flushed file never claims rows it lacks
            f.flush()
    os.replace(partial, path)
    return _summary(path, status, time.perf_counter() - start_time)


def _summary(path: Path, status: str, seconds: float) -> dict[str, Any]:
    with h5py.File(path, "r") as f:
        forced = f["forced"][:]
        drawn = len(set(f["case_id"].asstr()[:]))
        cases = len(json.loads(f.attrs["case_ids"]))
    return {"path": str(path), "status": status, "n": len(forced), "bytes": path.stat().st_size,
            "seconds": round(seconds, 3), "forced": int(forced.sum()), "forced_fraction": float(forced.mean()),
            "n_cases": cases, "cases_drawn": drawn}


@register_sampler("patch_set")
class PatchSetSampler:
    """The sampler protocol over a written patch set (module docstring): uniform draws of stored patches.

    Built by the framework as any sampler (`decathlete.recipes.build.build_sampler`), it takes no recipe settings:
    switch a run to it with ``--set sampler=patch_set`` (a bare name replaces the recipe's sampler and its kwargs).
    Which file it reads follows from what it is handed: ``case_dir``'s patch folder, the fold file whose
    ``case_ids`` are (as a set) ``case_ids``; training gets ``train.h5``, validation ``val.h5``. When both match
    (a one-case data set), the one with this crop size wins, then the validation file if ``input_size`` is the
    patch size (how the trainer builds its validation sampler), else the training file.

    Args:
        case_dir: the preprocessed folder ``WORKDIR/preprocessed/<data_identifier>``.
        case_ids: the cases of this split.
        input_size: crop size the caller needs; the file must hold exactly this size.
        patch_size: the configuration's patch (tells a validation sampler from a training one).
        spatial_dims, slice_axis, ignore_label: passed to every sampler; the patches already embody them.

    Raises:
        FileNotFoundError: no patch set for these cases, naming the command that writes it.
        ValueError: the patch set holds another crop size (written for other augmentation settings).
    """

    def __init__(self, case_dir: str | Path, case_ids: Sequence[str], input_size: Sequence[int],
                 patch_size: Sequence[int] | None = None, spatial_dims: int = 3, slice_axis: int = 0,
                 ignore_label: int | None = None) -> None:
        del spatial_dims, slice_axis, ignore_label  # decided when the patches were drawn
        self.case_dir = Path(case_dir)
        self.case_ids = list(case_ids)
        self.input_size = tuple(int(s) for s in input_size)
        kind = "val" if patch_size is not None and tuple(int(p) for p in patch_size) == self.input_size else "train"
        self.path = find_patch_file(self.case_dir, self.case_ids, self.input_size, kind)
        with h5py.File(self.path, "r") as f:
            self.n = int(f.attrs["n_written"])
            self.image_shape = tuple(f["image"].shape[1:])
            # Kept in memory (a few bytes per patch, and they pickle): the batch's meta costs no HDF5 reads.
            names, codes = np.unique(f["case_id"].asstr()[: self.n], return_inverse=True)
            self.patch_cases, self.patch_case_names = codes.astype(np.int32), [str(n) for n in names]
            self.patch_forced = f["forced"][: self.n].astype(bool)
        self._file: h5py.File | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        # An h5py handle does not pickle, and a forked copy must not share it: each process opens its own.
        return {**self.__dict__, "_file": None, "_pid": None}

    def _handle(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file

    def sample_batch(self, batch_size: int, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """``batch_size`` stored patches drawn uniformly (with replacement) by ``rng``.

        Returns:
            image float32 ``(B, C, *input_size)``, label int16 ``(B, 1, *input_size)``, and per patch ``{"case_id",
            "start": None, "forced", "class": None, "slice": None, "patch_index"}`` (where a patch came from in its
            case is not stored).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        f = self._handle()
        indices = rng.integers(self.n, size=batch_size)
        image = np.empty((batch_size, *self.image_shape), dtype=np.float32)
        label = np.empty((batch_size, 1, *self.input_size), dtype=np.int16)
        meta = []
        for k, i in enumerate(indices):
            image[k] = f["image"][i]  # one chunk each; float16 -> float32 on assignment
            label[k] = f["label"][i]
            meta.append({"case_id": self.patch_case_names[self.patch_cases[i]], "start": None,
                         "forced": bool(self.patch_forced[i]), "class": None, "slice": None, "patch_index": int(i)})
        return image, label, meta


def find_patch_file(case_dir: str | Path, case_ids: Sequence[str], input_size: Sequence[int],
                    prefer: str = "train") -> Path:
    """The complete patch file under ``case_dir``'s patch folder drawn from exactly ``case_ids`` at ``input_size``.

    Raises:
        FileNotFoundError: none drawn from these cases (the message names the command that writes one).
        ValueError: only files of another crop size.
    """
    case_dir = Path(case_dir)
    root = case_dir.parent.parent / "patches" / case_dir.name
    wanted, size = set(case_ids), [int(s) for s in input_size]
    found = []
    for path in sorted(root.glob("fold_*/*.h5")):  # "*.h5" leaves out the ".h5.partial" files
        try:
            with h5py.File(path, "r") as f:
                if set(json.loads(f.attrs["case_ids"])) == wanted:
                    found.append((path, _attr(f.attrs["size"]), str(f.attrs.get("kind", path.stem))))
        except (OSError, KeyError):
            continue  # not one of ours, or unreadable: it cannot be the match
    fitting = [entry for entry in found if entry[1] == size]
    if fitting:
        return min(fitting, key=lambda entry: entry[2] != prefer)[0]
    command = _write_command(case_dir, wanted)
    if found:
        raise ValueError(f"the patch set {found[0][0]} holds patches of {tuple(found[0][1])}, this run crops "
                         f"{tuple(size)}: it was written for other augmentation settings; rewrite it: {command}")
    raise FileNotFoundError(f"no patch set under {root} is drawn from these {len(wanted)} cases; write it first: "
                            f"{command}")


def _write_command(case_dir: Path, case_ids: set[str]) -> str:
    """``decathlete patches ...`` for these cases, naming the configuration and fold when the work folder says."""
    workdir = case_dir.parent.parent
    config, fold = "CONFIG", "FOLD"
    try:
        plans = json.loads((workdir / "plans.json").read_text())
        names = [n for n, c in plans.get("configurations", {}).items() if c.get("data_identifier") == case_dir.name]
        config = names[0] if len(names) == 1 else config
        splits = json.loads((workdir / "splits.json").read_text())
        folds = [k for k, s in enumerate(splits) if case_ids in (set(s["train"]), set(s["val"]))]
        every = {case for s in splits for case in s["train"] + s["val"]}
        fold = str(folds[0]) if len(folds) == 1 else "all" if case_ids == every else fold
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # a generic command is still a usable hint
    return f"decathlete patches {workdir} -c {config} -f {fold} --train N --val N"
