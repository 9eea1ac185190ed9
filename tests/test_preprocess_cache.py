"""The on-disk cache: round trip, patch reads, completion marker and atomicity."""

from __future__ import annotations

from pathlib import Path

import blosc2
import numpy as np
import pytest

from decathlete.preprocess import cache
from decathlete.preprocess.pipeline import PreprocessedCase, preprocess_dataset
from test_preprocess_pipeline import CONFIG, make_synthetic_case


def _case(seed: int = 0) -> PreprocessedCase:
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(2, 10, 12, 14)).astype(np.float32)
    seg = rng.integers(-1, 3, size=(10, 12, 14)).astype(np.int8)
    locations = {k: np.argwhere(seg == k).astype(np.int32) for k in (1, 2)}
    props = {"case_id": "x", "shape_after_resampling": [10, 12, 14], "spacing": (1.0, 2.0, 3.0)}
    return PreprocessedCase(data, seg, props, locations)


@pytest.mark.parametrize("fmt", ["b2nd", "npy"])
def test_round_trip_and_patch_reads(tmp_path: Path, fmt: str) -> None:
    pre = _case()
    cache.write_case(tmp_path, "x", pre, fmt=fmt)
    assert cache.case_is_complete(tmp_path, "x") and cache.list_cases(tmp_path) == ["x"]
    data, seg, props, locations = cache.open_case(tmp_path, "x")
    lazy = blosc2.NDArray if fmt == "b2nd" else np.memmap
    assert isinstance(data, lazy) and isinstance(seg, lazy)
    assert data.shape == pre.data.shape and seg.dtype == np.int8 and props["cache_format"] == fmt
    for patch in [(slice(None), slice(2, 7), slice(3, 11), slice(0, 5)), (slice(1, 2), slice(0, 10), 4, slice(13, 14))]:
        np.testing.assert_array_equal(data[patch], pre.data[patch])
        np.testing.assert_array_equal(seg[patch[1:]], pre.seg[patch[1:]])
    assert props["spacing"] == [1.0, 2.0, 3.0] and props["has_seg"] is True
    assert set(locations) == {1, 2}
    for k in locations:
        np.testing.assert_array_equal(locations[k], pre.class_locations[k])
    loaded, loaded_seg, _, _ = cache.open_case(tmp_path, "x", mmap=False)
    assert type(loaded) is np.ndarray and type(loaded_seg) is np.ndarray
    np.testing.assert_array_equal(loaded, pre.data)


def test_rewrite_in_other_format_replaces_files(tmp_path: Path) -> None:
    cache.write_case(tmp_path, "x", _case(), fmt="npy")
    cache.write_case(tmp_path, "x", _case(), fmt="b2nd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "x_data.b2nd", "x_locations.npz", "x_seg.b2nd"]
    assert cache.case_is_complete(tmp_path, "x", {"cache_format": "b2nd"})
    assert not cache.case_is_complete(tmp_path, "x", {"cache_format": "npy"})


def test_unlabelled_case_and_missing_case(tmp_path: Path) -> None:
    pre = _case()
    cache.write_case(tmp_path, "u", PreprocessedCase(pre.data, None, {}, {}))
    data, seg, props, locations = cache.open_case(tmp_path, "u")
    assert seg is None and locations == {} and props["has_seg"] is False
    with pytest.raises(FileNotFoundError):
        cache.open_case(tmp_path, "nope")


def test_interrupted_write_never_looks_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache.write_case(tmp_path, "x", _case(0))  # a complete older version, rewritten below

    def crash(path: Path, obj: object) -> None:
        raise KeyboardInterrupt("killed while writing the marker")

    monkeypatch.setattr(cache, "_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.write_case(tmp_path, "x", _case(1))
    assert cache.data_path(tmp_path, "x").exists()  # the arrays were written ...
    assert not cache.case_is_complete(tmp_path, "x")  # ... but without the marker the case is incomplete
    assert cache.list_cases(tmp_path) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left behind


def test_rerun_completes_interrupted_case_and_cleans_temporaries(tmp_path: Path, monkeypatch) -> None:
    cases = [make_synthetic_case(tmp_path / "raw", f"c{i}", seed=i) for i in range(2)]
    out = tmp_path / "pre"
    real = cache._write_json
    calls = []

    def crash_second(path: Path, obj: object) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real(path, obj)

    monkeypatch.setattr(cache, "_write_json", crash_second)
    with pytest.raises(RuntimeError, match="disk full"):
        preprocess_dataset(cases, CONFIG, out, progress=False)
    monkeypatch.setattr(cache, "_write_json", real)
    assert len(cache.list_cases(out)) == 1
    stale = out / ".tmp-999-dead-c1_data.b2nd"  # what a killed write of c1's image leaves behind
    stale.write_bytes(b"partial")
    summary = preprocess_dataset(cases, CONFIG, out, progress=False)
    assert summary["n_done"] == 1 and summary["n_skipped"] == 1
    assert cache.list_cases(out) == ["c0", "c1"] and not stale.exists()


def test_clean_temporaries_of_one_case_spares_similar_ids(tmp_path: Path) -> None:
    mine = tmp_path / ".tmp-1-aa-c1_data.npy"
    other = tmp_path / ".tmp-1-bb-c10_data.npy"
    mine.write_bytes(b"")
    other.write_bytes(b"")
    assert cache.clean_stale_temporaries(tmp_path, "c1") == 1
    assert other.exists() and not mine.exists()
