"""Training augmentation: batches per second, ``decathlete.augment`` vs nnU-Net v2's default transforms (CPU).

The reference is exactly what ``nnUNetTrainer.get_training_transforms`` builds for a 3d_fullres configuration in
nnunetv2 (batchgeneratorsv2), applied per sample and written into a batch tensor like
``nnUNetDataLoader.generate_train_batch`` (see ``_augment_reference.py``, which runs in ``.venv-bench``). decathlete
augments the whole (B, C, *input_size) batch with one ``augment`` call. Both sides:

* get the same data: random smooth volumes (Gaussian-filtered noise) with a label of two foreground blobs (labels 1
  and 2), generated once here from a seed at the larger of the two input sizes and centre-cropped by each side to its
  own input size (nnU-Net's ``get_patch_size`` crop; decathlete's ``AugmentConfig.input_size``, which is larger);
* run in their own subprocess (``.venv-bench/bin/python`` and ``.venv/bin/python``), so process start, imports and
  data loading are excluded; one warm-up batch, then N timed batches, and only the augmentation of each batch is
  timed (the reference's per-sample loop plus writing into the batch; decathlete's ``augment`` call);
* run single-process with ``torch.set_num_threads(1)`` for the headline (a batchgenerators worker runs its
  transforms single-threaded); decathlete with 2 threads, and both sides with ``--workers`` processes side by side,
  are reported as details;
* exclude deep supervision: ``deep_supervision_scales=None`` drops nnU-Net's ``DownsampleSegForDSTransform``, and
  decathlete's ``augment`` has no counterpart.

Run as a script (``--worker``) it is decathlete's side of one measurement.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import BENCH_VENV, OUR_PYTHON, Record, alternate, median_of, our_env, ref_env, run_json

REFERENCE_NAME = "batchgeneratorsv2 (nnU-Net v2 default transforms)"
REFERENCE_SCRIPT = Path(__file__).resolve().parent / "_augment_reference.py"
DATA_SEED = 20240
# name: (patch size, batch size, timed batches, timed batches with --quick or None to skip it then)
CONFIGS: dict[str, tuple[tuple[int, ...], int, int, int | None]] = {
    "hippocampus": ((40, 56, 40), 7, 40, 6),  # nnU-Net v2's 3d_fullres plan for Task04_Hippocampus
    "ct": ((128, 128, 128), 2, 16, None),  # a typical CT 3d_fullres plan
}


# --- data (generated once by the orchestrator; both sides load the same files) --------------------------------------

def make_sample(seed: int, shape: tuple[int, ...], patch: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(1, *shape) float32 smooth random image and (1, *shape) int16 label with blobs 1 and 2 near the centre."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    image = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=2.0)
    image = (image - image.mean()) / image.std()
    wobble = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma=3.0)
    wobble /= np.abs(wobble).max()
    grid = np.meshgrid(*(np.arange(s, dtype=np.float32) - (s - 1) / 2 for s in shape), indexing="ij")
    label = np.zeros(shape, dtype=np.int16)
    radii = [p / 5 for p in patch]
    for value, sign in ((1, -1), (2, 1)):
        centre = [0.0, sign * patch[1] / 8, sign * patch[2] / 5]
        dist = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))
        label[dist + 0.5 * wobble < 1] = value
    image += np.where(label == 1, 1.5, np.where(label == 2, 2.5, 0.0)).astype(np.float32)
    return image[None], label[None]


def write_data(folder: Path, shape: tuple[int, ...], patch: tuple[int, ...], batch: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for j in range(batch):
        image, label = make_sample(DATA_SEED + j, shape, patch)
        np.save(folder / f"image_{j}.npy", image)
        np.save(folder / f"label_{j}.npy", label)


def centre_crop(array: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    starts = [(s - t) // 2 for s, t in zip(array.shape[1:], size)]
    return array[(slice(None), *(slice(a, a + t) for a, t in zip(starts, size)))]


# --- decathlete's side (runs in .venv as a subprocess) --------------------------------------------------------------

def _our_config(patch: tuple[int, ...]):
    from decathlete.augment.pipeline import default_config

    return default_config(len(patch), anisotropic=max(patch) / patch[0] > 3, patch_size=patch)


def _our_loop(data: Path, patch: tuple[int, ...], batch: int, batches: int, seed: int, threads: int,
              start=None) -> dict[str, Any]:
    import torch

    from decathlete.augment.pipeline import augment

    torch.set_num_threads(threads)
    config = _our_config(patch)
    size = config.input_size(patch)
    image = torch.from_numpy(np.stack([centre_crop(np.load(data / f"image_{j}.npy"), size) for j in range(batch)]))
    label = torch.from_numpy(np.stack([centre_crop(np.load(data / f"label_{j}.npy"), size) for j in range(batch)]))
    image, label = image.float().contiguous(), label.to(torch.int16).contiguous()
    generator = torch.Generator().manual_seed(seed)

    def one_batch() -> float:  # augment never modifies its inputs, so the same batch can be fed again
        t0 = time.perf_counter()
        out_image, _ = augment(image, label, patch, config, generator)
        elapsed = time.perf_counter() - t0
        assert tuple(out_image.shape[2:]) == tuple(patch), out_image.shape
        return elapsed

    one_batch()  # warm-up
    if start is not None:
        start.wait()
    t_begin = time.perf_counter()
    times = [one_batch() for _ in range(batches)]
    return {"per_batch_s": times, "begin": t_begin, "end": time.perf_counter(), "input_size": list(size),
            "torch_threads": torch.get_num_threads()}


def _our_child(queue, *a) -> None:
    queue.put(_our_loop(*a))


def _our_measure(data: Path, patch: tuple[int, ...], batch: int, batches: int, seed: int, threads: int,
                 procs: int) -> dict[str, Any]:
    """Same protocol as ``_augment_reference.measure``."""
    if procs == 1:
        r = _our_loop(data, patch, batch, batches, seed, threads)
        return {"batches_per_second": batches / sum(r["per_batch_s"]),
                "median_batch_s": float(np.median(r["per_batch_s"])), "input_size": r["input_size"],
                "torch_threads": r["torch_threads"], "procs": 1}
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue, start = ctx.Queue(), ctx.Barrier(procs)
    children = [ctx.Process(target=_our_child, args=(queue, data, patch, batch, batches, seed + 7919 * k, threads,
                                                      start)) for k in range(procs)]
    for c in children:
        c.start()
    results = [queue.get() for _ in children]
    for c in children:
        c.join()
    wall = max(r["end"] for r in results) - min(r["begin"] for r in results)
    return {"batches_per_second": sum(batches / sum(r["per_batch_s"]) for r in results),
            "wall_batches_per_second": procs * batches / wall, "input_size": results[0]["input_size"],
            "torch_threads": results[0]["torch_threads"], "procs": procs}


def worker_main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--input-size", action="store_true")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--patch", type=int, nargs="+", required=True)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--procs", type=int, default=1)
    args = parser.parse_args()
    patch = tuple(args.patch)
    if args.input_size:
        out: dict[str, Any] = {"input_size": list(_our_config(patch).input_size(patch))}
    else:
        out = _our_measure(args.data, patch, args.batch, args.batches, args.seed, args.threads, args.procs)
    print(json.dumps(out))


# --- orchestration ---------------------------------------------------------------------------------------------------

def _ours_cmd(*extra: str) -> list[str]:
    return [str(OUR_PYTHON), str(Path(__file__).resolve()), "--worker", "--json", *extra]


def _ref_cmd(*extra: str) -> list[str]:
    return [str(BENCH_VENV / "bin" / "python"), str(REFERENCE_SCRIPT), "--json", *extra]


def _record_name(name: str) -> str:
    return f"augment_batches_per_second_{name}"


def run(args: Any) -> list[Record]:
    records = []
    for name, (patch, batch, batches, quick_batches) in CONFIGS.items():
        if args.quick and quick_batches is None:
            continue
        n = quick_batches if args.quick else batches
        tmp = Path(tempfile.mkdtemp(prefix=f"decathlete-bench-augment-{name}-"))
        try:
            records.append(_run_config(args, name, patch, batch, n, tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return records


def _run_config(args: Any, name: str, patch: tuple[int, ...], batch: int, n: int, tmp: Path) -> Record:
    spatial = [str(p) for p in patch]
    ours_size = run_json(_ours_cmd("--input-size", "--patch", *spatial), our_env())["input_size"]
    ref_settings: dict[str, Any] | None = None
    ref_problem = ""
    if not (BENCH_VENV / "bin" / "python").exists():
        ref_problem = f"reference environment {BENCH_VENV} is absent (make bench creates it)"
    else:
        try:
            ref_settings = run_json(_ref_cmd("--input-size", "--patch", *spatial), ref_env())
        except (RuntimeError, ValueError) as exc:
            ref_problem = f"reference could not run: {str(exc)[-500:]}"
    ref_size = ref_settings["initial_patch_size"] if ref_settings else ours_size
    data = tmp / "data"
    write_data(data, tuple(max(a, b) for a, b in zip(ours_size, ref_size)), patch, batch)

    common = ["--data", str(data), "--patch", *spatial, "--batch", str(batch), "--batches", str(n)]

    def ours(threads: int = 1, procs: int = 1):
        seeds = iter(range(10_000))  # a new augmentation seed per run: 0, 1, 2... on every side
        return lambda: run_json(_ours_cmd(*common, "--seed", str(next(seeds)), "--threads", str(threads),
                                           "--procs", str(procs)), our_env())

    def theirs(procs: int = 1):
        seeds = iter(range(10_000))
        return lambda: run_json(_ref_cmd(*common, "--seed", str(next(seeds)), "--procs", str(procs)), ref_env())

    sides = {"decathlete": ours(), **({"reference": theirs()} if ref_settings else {}),
             "decathlete_2_threads": ours(threads=2)}
    if args.workers > 1:
        sides[f"decathlete_{args.workers}_procs"] = ours(procs=args.workers)
        if ref_settings:
            sides[f"reference_{args.workers}_procs"] = theirs(procs=args.workers)
    runs = alternate(sides, args.repeats)
    for side_runs in runs.values():
        for r in side_runs:
            r.pop("settings", None)
    rate = {side: round(median_of(r, "batches_per_second"), 4) for side, r in runs.items()}
    details = {"patch_size": list(patch), "batch_size": batch, "timed_batches_per_run": n,
               "warmup_batches": 1, "repeats": args.repeats, "channels": 1,
               "input_size": {"decathlete": ours_size,
                              "reference": ref_settings["initial_patch_size"] if ref_settings else None},
               "torch_threads": {"decathlete": 1, "reference": 1}, "processes": 1,
               "nnunet_settings": ref_settings, "median_batches_per_second": rate,
               "per_run_batches_per_second": {side: [round(r["batches_per_second"], 4) for r in side_runs]
                                              for side, side_runs in runs.items()},
               "runs": runs}
    ref_in = "x".join(map(str, ref_settings["initial_patch_size"])) if ref_settings else "?"
    extra = f"decathlete with 2 threads: {rate['decathlete_2_threads']:.3g} batches/s"
    if args.workers > 1:
        extra += f"; {args.workers} processes side by side: decathlete {rate[f'decathlete_{args.workers}_procs']:.3g}"
        if ref_settings:
            extra += f", reference {rate[f'reference_{args.workers}_procs']:.3g}"
    note = (f"patch {'x'.join(spatial)}, batch {batch}, {n} timed batches after 1 warm-up, 1 process and 1 torch "
            f"thread per side ({extra}). Reference: nnUNetTrainer.get_training_transforms (3d_fullres, "
            "deep_supervision_scales=None, so no DownsampleSegForDS; includes RemoveLabel -1->0) per sample on a "
            f"{ref_in} crop (get_patch_size), written into the batch as nnUNetDataLoader does; decathlete: one "
            f"augment() call on the (B, 1, {'x'.join(map(str, ours_size))}) batch (its input_size, larger than "
            "nnU-Net's). Not timed on either side: data loading/cropping, process start; the label is resampled by "
            "nnU-Net per label with linear interpolation + argmax, by decathlete with nearest neighbour.")
    if ref_problem:
        note = f"{ref_problem}; {note}"
    return Record(_record_name(name), "batches/s", rate["decathlete"], rate.get("reference"), REFERENCE_NAME,
                  "higher", details, note)


if __name__ == "__main__":
    worker_main()
