"""Training batches from background worker processes, as a pure function of (seed, rank, batch index).

Batch ``i`` (counted from 0 over the whole run) is drawn by `decathlete.data.sampling.PatchSampler` with its own
generator ``np.random.default_rng([seed, rank, i])``. Nothing else feeds it: not the worker that made it, not how
many workers there are, not the batches before it. Resuming at batch ``k`` is therefore exact: a stream started
with ``start_batch=k`` yields the very batches ``k, k+1, ...`` of an uninterrupted run, and distributed ranks draw
independent streams.

With ``W`` workers, worker ``w`` makes batches ``start_batch + w, start_batch + w + W, ...``. torch's DataLoader
asks the workers of an iterable dataset for items round-robin and returns them in request order, so the consumer
sees ``start_batch, start_batch + 1, ...`` in order (tests/test_loader.py checks W = 2 against W = 0).

Workers start with "forkserver" by default ("spawn" where missing): "fork" of a trainer that runs CUDA, OpenMP
or tqdm threads can deadlock the child. The dataset is picklable (the sampler opens cases lazily, per process);
as with any non-fork start, a script needs ``if __name__ == "__main__":``. Workers persist for the stream's life
and are shut down by `BatchStream.close` (or when the stream is garbage-collected).
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from decathlete.data.sampling import PatchSampler


class Batch(NamedTuple):
    """One training batch.

    Attributes:
        image: float32 ``(B, C, z, y, x)`` or ``(B, C, h, w)``, the sampler's ``input_size``.
        label: int16 ``(B, 1, ...)``, same spatial shape; -1 outside the volume.
        meta: per sample ``{"case_id", "start", "forced", "class", "slice"}`` (see `PatchSampler.sample_batch`).
        index: global batch index ``i``; the batch is a pure function of ``(seed, rank, i)``.
    """

    image: torch.Tensor
    label: torch.Tensor
    meta: list[dict[str, Any]]
    index: int


def make_batch(sampler: PatchSampler, batch_size: int, seed: int, rank: int, index: int) -> Batch:
    """Batch ``index`` of the stream ``(seed, rank)``: what `BatchStream` yields at that position."""
    rng = np.random.default_rng([seed, rank, index])
    image, label, meta = sampler.sample_batch(batch_size, rng)
    return Batch(torch.from_numpy(image), torch.from_numpy(label), meta, index)


class _BatchDataset(IterableDataset):
    """Whole batches ``start, start + 1, ...`` (``stop`` excluded), split round-robin over the DataLoader workers."""

    def __init__(
        self, sampler: PatchSampler, batch_size: int, seed: int, rank: int, start: int, stop: int | None
    ) -> None:
        super().__init__()
        self.sampler, self.batch_size, self.seed, self.rank = sampler, batch_size, seed, rank
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        index = self.start + worker
        while self.stop is None or index < self.stop:
            yield make_batch(self.sampler, self.batch_size, self.seed, self.rank, index)
            index += workers


def _identity(batch: Batch) -> Batch:
    # Module level so it pickles for non-fork workers; default_convert would turn meta's numpy ints into tensors.
    return batch


def _worker_context(name: str | None) -> Any:
    if name is None:
        return None
    if name == "forkserver" and "forkserver" not in mp.get_all_start_methods():
        name = "spawn"
    return mp.get_context(name)


class BatchStream:
    """Iterator over training batches ``start_batch, start_batch + 1, ...`` made by background workers.

    Save `next_index` with a checkpoint and pass it back as ``start_batch`` to resume exactly.

    Args:
        sampler: draws one batch from a generator (picklable; see `PatchSampler`).
        batch_size: samples per batch ``B``.
        seed: run seed.
        rank: distributed rank; each rank draws its own stream.
        start_batch: global index of the first batch (0 for a new run).
        num_workers: worker processes; 0 makes batches in this process, on demand.
        pin_memory: page-locked batches for faster host-to-GPU copies (ignored without CUDA).
        prefetch_factor: batches each worker keeps ready ahead of the consumer.
        num_batches: stop after this many batches; None = endless (the trainer counts its own steps).
        multiprocessing_context: worker start method, "forkserver" (default; "spawn" where missing), "spawn",
            "fork", or None for torch's platform default.

    Raises:
        ValueError: a negative count or index.
    """

    def __init__(
        self,
        sampler: PatchSampler,
        batch_size: int,
        seed: int,
        rank: int = 0,
        start_batch: int = 0,
        num_workers: int = 2,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        num_batches: int | None = None,
        multiprocessing_context: str | None = "forkserver",
    ) -> None:
        if batch_size < 1 or start_batch < 0 or num_workers < 0 or (num_batches is not None and num_batches < 0):
            raise ValueError(
                f"invalid stream: batch_size={batch_size}, start_batch={start_batch}, num_workers={num_workers}, "
                f"num_batches={num_batches}"
            )
        self.next_index = start_batch
        stop = None if num_batches is None else start_batch + num_batches
        dataset = _BatchDataset(sampler, batch_size, seed, rank, start_batch, stop)
        workers = {}
        if num_workers > 0:
            workers = {
                "persistent_workers": True,
                "prefetch_factor": prefetch_factor,
                "multiprocessing_context": _worker_context(multiprocessing_context),
            }
        # batch_size=None: the dataset yields whole batches (one RNG per batch), DataLoader must not collate them.
        self._loader = DataLoader(
            dataset, batch_size=None, num_workers=num_workers, collate_fn=_identity,
            pin_memory=pin_memory and torch.cuda.is_available(), **workers,
        )  # fmt: skip
        self._iterator: Iterator[Batch] | None = None
        self._closed = False

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise RuntimeError("the batch stream was closed")
        if self._iterator is None:
            # One DataLoader iterator for the stream's life: a second iter() would restart the workers at start.
            self._iterator = iter(self._loader)
        batch = next(self._iterator)
        if batch.index != self.next_index:  # guards the ordering argument of the module docstring
            raise RuntimeError(f"batch {batch.index} arrived where {self.next_index} was expected")
        self.next_index += 1
        return batch

    def close(self) -> None:
        """Stop the worker processes (the stream cannot be used afterwards)."""
        iterator, self._iterator, self._closed = self._iterator, None, True
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
