"""Reference side of ``bench_augment``: nnU-Net v2's default training transforms (batchgeneratorsv2), timed.

Runs inside the reference environment (``.venv-bench``: nnunetv2 + batchgeneratorsv2), never in decathlete's:

    .venv-bench/bin/python benchmarks/_augment_reference.py --json --input-size --patch 40 56 40
    .venv-bench/bin/python benchmarks/_augment_reference.py --json --data DIR --patch 40 56 40 --batch 7 --batches 40

The transforms are exactly what ``nnUNetTrainer.get_training_transforms`` returns for a 3d_fullres configuration
(rotation range and dummy-2D switch from ``nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size``,
called on a stub that only carries the patch size), with ``deep_supervision_scales=None`` so that
``DownsampleSegForDSTransform`` is left out (augmentation only). Each batch is built like
``nnUNetDataLoader.generate_train_batch``: per sample, ``transforms(image=(C, *initial_patch_size) float32,
segmentation=(1, *initial_patch_size) int16)``, written into a preallocated (B, ...) tensor, under ``torch.no_grad()``
and ``threadpool_limits(1)``, with ``torch.set_num_threads(1)`` as in batchgenerators' augmenter workers. The samples
are the ``.npy`` volumes written by ``bench_augment`` (centre-cropped to the initial patch size); copying them into
fresh tensors, which stands in for nnU-Net's case loading and cropping, is not timed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np


def nnunet_settings(patch: list[int]) -> dict[str, Any]:
    """Rotation range, dummy-2D switch, initial (enlarged) patch size and mirror axes, from nnU-Net's own code."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    stub = SimpleNamespace(configuration_manager=SimpleNamespace(patch_size=list(patch)),
                           print_to_log_file=lambda *a, **k: None)
    rotation, dummy_2d, initial, mirror_axes = \
        nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size(stub)
    return {"rotation_for_DA": [float(r) for r in rotation], "do_dummy_2d_data_aug": bool(dummy_2d),
            "initial_patch_size": [int(s) for s in initial], "mirror_axes": list(mirror_axes)}


def centre_crop(array: np.ndarray, size: list[int]) -> np.ndarray:
    starts = [(s - t) // 2 for s, t in zip(array.shape[1:], size)]
    return array[(slice(None), *(slice(a, a + t) for a, t in zip(starts, size)))]


def _loop(data: Path, patch: list[int], batch: int, batches: int, seed: int, start=None) -> dict[str, Any]:
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)  # as batchgenerators' (NonDet)MultiThreadedAugmenter does in each worker
    settings = nnunet_settings(patch)
    transforms = nnUNetTrainer.get_training_transforms(
        patch, settings["rotation_for_DA"], None, tuple(settings["mirror_axes"]), settings["do_dummy_2d_data_aug"],
        use_mask_for_norm=[False], is_cascaded=False, foreground_labels=[1, 2], regions=None, ignore_label=None)
    size = settings["initial_patch_size"]
    samples = []
    for j in range(batch):
        image = centre_crop(np.load(data / f"image_{j}.npy"), size)
        label = centre_crop(np.load(data / f"label_{j}.npy"), size)
        samples.append((torch.from_numpy(np.ascontiguousarray(image)).float(),
                        torch.from_numpy(np.ascontiguousarray(label)).to(torch.int16)))
    np.random.seed(seed)
    torch.manual_seed(seed)

    def one_batch() -> float:
        fresh = [(img.clone(), seg.clone()) for img, seg in samples]  # the loader hands over new tensors: untimed
        t0 = time.perf_counter()
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            data_all = seg_all = None
            for j, (img, seg) in enumerate(fresh):
                out = transforms(image=img, segmentation=seg)
                if data_all is None:
                    data_all = torch.empty((batch, *out["image"].shape), dtype=torch.float32)
                    seg_all = torch.empty((batch, *out["segmentation"].shape), dtype=out["segmentation"].dtype)
                data_all[j] = out["image"]
                seg_all[j] = out["segmentation"]
        elapsed = time.perf_counter() - t0
        assert tuple(data_all.shape[2:]) == tuple(patch), data_all.shape
        return elapsed

    one_batch()  # warm-up
    if start is not None:
        start.wait()
    t_begin = time.perf_counter()
    times = [one_batch() for _ in range(batches)]
    t_end = time.perf_counter()
    return {"per_batch_s": times, "begin": t_begin, "end": t_end, "input_size": size, "settings": settings,
            "torch_threads": torch.get_num_threads()}


def _child(queue, *a) -> None:
    queue.put(_loop(*a))


def measure(data: Path, patch: list[int], batch: int, batches: int, seed: int, procs: int) -> dict[str, Any]:
    """``procs`` == 1: one loop in this process; otherwise that many forked processes, started together."""
    if procs == 1:
        r = _loop(data, patch, batch, batches, seed)
        return {"batches_per_second": batches / sum(r["per_batch_s"]),
                "median_batch_s": float(np.median(r["per_batch_s"])), "input_size": r["input_size"],
                "torch_threads": r["torch_threads"], "settings": r["settings"], "procs": 1}
    ctx = mp.get_context("fork")
    queue, start = ctx.Queue(), ctx.Barrier(procs)
    children = [ctx.Process(target=_child, args=(queue, data, patch, batch, batches, seed + 7919 * k, start))
                for k in range(procs)]
    for c in children:
        c.start()
    results = [queue.get() for _ in children]
    for c in children:
        c.join()
    # Throughput: the processes' timed batch loops run side by side; each one's rate counts only its timed batches
    # (not the untimed copy of the inputs), and the rates add up. The wall-clock rate is reported too.
    wall = max(r["end"] for r in results) - min(r["begin"] for r in results)
    return {"batches_per_second": sum(batches / sum(r["per_batch_s"]) for r in results),
            "wall_batches_per_second": procs * batches / wall, "input_size": results[0]["input_size"],
            "torch_threads": results[0]["torch_threads"], "settings": results[0]["settings"], "procs": procs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object (the only mode)")
    parser.add_argument("--input-size", action="store_true", help="only print nnU-Net's settings for --patch")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--patch", type=int, nargs="+", required=True)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--procs", type=int, default=1)
    args = parser.parse_args()
    if args.input_size:
        out = nnunet_settings(args.patch)
    else:
        out = measure(args.data, args.patch, args.batch, args.batches, args.seed, args.procs)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
