"""BatchStream: batches are a pure function of (seed, rank, index), in order, with or without workers."""

from __future__ import annotations

import pytest
import torch

from decathlete.data.loader import Batch, BatchStream, make_batch
from decathlete.data.sampling import PatchSampler
from test_sampling import sparse_seg, write_case


@pytest.fixture(scope="module")
def sampler(tmp_path_factory: pytest.TempPathFactory) -> PatchSampler:
    folder = tmp_path_factory.mktemp("cache")
    for i, shape in enumerate([(10, 12, 14), (6, 8, 8), (12, 9, 11)]):
        write_case(folder, f"c{i}", sparse_seg(shape), channels=2)
    return PatchSampler(folder, ["c0", "c1", "c2"], (8, 10, 10), patch_size=(6, 8, 8))


def take(stream: BatchStream, n: int) -> list[Batch]:
    with stream:
        return [next(stream) for _ in range(n)]


def assert_same(a: list[Batch], b: list[Batch]) -> None:
    assert [x.index for x in a] == [y.index for y in b]
    for x, y in zip(a, b):
        assert torch.equal(x.image, y.image) and torch.equal(x.label, y.label) and x.meta == y.meta


def test_stream_is_a_function_of_seed_rank_and_index(sampler: PatchSampler) -> None:
    run = take(BatchStream(sampler, 3, seed=7, num_workers=0), 6)
    assert [b.index for b in run] == list(range(6))
    assert run[0].image.shape == (3, 2, 8, 10, 10) and run[0].image.dtype == torch.float32
    assert run[0].label.shape == (3, 1, 8, 10, 10) and run[0].label.dtype == torch.int16
    assert_same(run, take(BatchStream(sampler, 3, seed=7, num_workers=0), 6))  # same seed: same batches
    resumed = BatchStream(sampler, 3, seed=7, start_batch=4, num_workers=0)
    assert_same(run[4:], take(resumed, 2))  # what resume relies on
    assert resumed.next_index == 6
    assert_same(run[2:3], [make_batch(sampler, 3, seed=7, rank=0, index=2)])
    other_rank = take(BatchStream(sampler, 3, seed=7, rank=1, num_workers=0), 6)
    other_seed = take(BatchStream(sampler, 3, seed=8, num_workers=0), 6)
    for other in (other_rank, other_seed):
        assert all(x.meta != y.meta or not torch.equal(x.image, y.image) for x, y in zip(run, other))
    assert sum(m["forced"] for b in run for m in b.meta) == 6  # round(3 * 0.33) = 1 per batch


def test_workers_give_the_in_process_sequence(sampler: PatchSampler) -> None:
    # 5 batches from index 3 with 2 workers: the workers stop unevenly (3 batches and 2), order must hold.
    stream = BatchStream(sampler, 2, seed=1, start_batch=3, num_workers=2, num_batches=5, prefetch_factor=2)
    with stream:
        parallel = list(stream)
    assert_same(parallel, list(BatchStream(sampler, 2, seed=1, start_batch=3, num_workers=0, num_batches=5)))
    assert [b.index for b in parallel] == [3, 4, 5, 6, 7]
    with pytest.raises(RuntimeError):
        next(stream)  # closed
    endless = take(BatchStream(sampler, 2, seed=1, num_workers=2), 7)
    assert_same(endless, take(BatchStream(sampler, 2, seed=1, num_workers=0), 7))
    with pytest.raises(ValueError):
        BatchStream(sampler, 0, seed=1)
