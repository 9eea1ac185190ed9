"""Patch set (HDF5, `decathlete.data.patchset`) vs the blosc2 cache: bytes on disk and patches read per second.

Usage: ``python benchmarks/patchset_vs_cache.py WORKDIR [-c 3d_fullres] [-f 0] [-k 200] [--compression]``, on a work
folder whose fold already has a patch set (``decathlete patches WORKDIR --train N --val N``). Prints JSON.

Both sides produce what training consumes, one patch of the training crop size at a time: the patch set reads
``K`` stored patches at random indices (`PatchSetSampler.sample_batch(1, rng)`), the cache crops ``K`` random windows
with the recipe's sampler (`PatchSampler.sample_batch(1, rng)`: case choice, foreground forcing, blosc2 decoding and
padding). Bytes on disk: ``train.h5`` against the cache files (data, seg, locations) of the fold's training cases.
The page cache is warm on both sides (each side reads once before timing), so this compares decoding, not the disk.

``--compression`` also rewrites the first patches of ``train.h5`` with LZF and with gzip level 1 into temporary
files and times random single-patch reads of each (the measurement behind `decathlete.data.patchset.COMPRESSION`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np


def _rate(sampler: Any, k: int, seed: int) -> float:
    """Patches per second of ``k`` single-patch draws (after one untimed draw that opens the files)."""
    sampler.sample_batch(1, np.random.default_rng([seed, k]))  # outside the timed draws 0..k-1
    start = time.perf_counter()
    for i in range(k):
        sampler.sample_batch(1, np.random.default_rng([seed, i]))
    return k / (time.perf_counter() - start)


def compare(workdir: str | Path, configuration: str = "3d_fullres", fold: int = 0, k: int = 200,
            seed: int = 0) -> dict[str, Any]:
    """Bytes on disk and patches/s of the fold's training patch set and of the cache it was drawn from."""
    from decathlete.data.patchset import PatchSetSampler, patch_folder
    from decathlete.data.splits import fold_split
    from decathlete.labels import LabelScheme
    from decathlete.planning.plans import Plans
    from decathlete.recipes import build
    from decathlete.recipes.base import Recipe

    workdir = Path(workdir)
    plans = Plans.load(workdir / "plans.json")
    config = plans.configuration(configuration)
    recipe = Recipe.from_dict(plans.recipe_settings)
    cases = workdir / "preprocessed" / config.data_identifier
    train_ids = fold_split(workdir, plans, fold)["train"]
    size = build.build_augmentation(recipe, config)[1]
    ignore = LabelScheme.from_dataset(plans.dataset).ignore_label
    cache_sampler = build.build_sampler(recipe, config, cases, train_ids, size, ignore_label=ignore)
    set_sampler = PatchSetSampler(cases, train_ids, size, config.patch_size)
    cache_bytes = sum(p.stat().st_size for c in train_ids for p in cases.glob(f"{c}_*"))
    path = patch_folder(workdir, config.data_identifier, fold) / "train.h5"
    return {"crop": list(size), "k": k, "cases": len(train_ids), "patches_in_set": set_sampler.n,
            "patch_set": {"bytes": path.stat().st_size, "patches_per_s": round(_rate(set_sampler, k, seed), 1)},
            "cache": {"bytes": cache_bytes, "patches_per_s": round(_rate(cache_sampler, k, seed), 1)}}


def compression(image: np.ndarray, label: np.ndarray, k: int = 200, repeats: int = 5) -> dict[str, Any]:
    """Size and median read time of one random patch (image and label) for LZF and gzip 1, alternating the two
    ``repeats`` times so that machine load hits both; ``image`` (N, C, ...) float16, ``label`` (N, 1, ...) int8."""
    codecs = {"lzf": {"compression": "lzf"}, "gzip1": {"compression": "gzip", "compression_opts": 1}}
    times: dict[str, list[float]] = {name: [] for name in codecs}
    raw = image.nbytes + label.nbytes
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in codecs.items():
            path = Path(tmp) / f"{name}.h5"
            with h5py.File(path, "w") as f:
                f.create_dataset("image", data=image, chunks=(1, *image.shape[1:]), **options)
                f.create_dataset("label", data=label, chunks=(1, *label.shape[1:]), **options)
            results[name] = {"bytes": path.stat().st_size, "fraction_of_raw": round(path.stat().st_size / raw, 3)}
        for r in range(repeats):
            order = np.random.default_rng(r).integers(len(image), size=k)
            for name in codecs:
                with h5py.File(Path(tmp) / f"{name}.h5", "r") as f:
                    images, labels = f["image"], f["label"]
                    _ = images[0], labels[0]  # warm the page cache
                    start = time.perf_counter()
                    for i in order:
                        _ = images[i], labels[i]
                    times[name].append((time.perf_counter() - start) / k)
    for name in codecs:
        results[name]["ms_per_patch"] = round(float(np.median(times[name])) * 1e3, 2)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workdir")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("-f", "--fold", type=int, default=0)
    parser.add_argument("-k", type=int, default=200, help="patches read per side")
    parser.add_argument("--compression", action="store_true", help="also compare LZF with gzip 1 on the patch set")
    args = parser.parse_args(argv)
    result = compare(args.workdir, args.configuration, args.fold, args.k)
    if args.compression:
        from decathlete.data.patchset import patch_folder
        from decathlete.planning.plans import Plans

        config = Plans.load(Path(args.workdir) / "plans.json").configuration(args.configuration)
        with h5py.File(patch_folder(args.workdir, config.data_identifier, args.fold) / "train.h5", "r") as f:
            n = min(100, int(f.attrs["n_written"]))
            result["compression"] = compression(f["image"][:n], f["label"][:n], args.k)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
