"""Patch sampling: padded reads, nnU-Net's foreground oversampling, border coverage, 2D slices, determinism."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from decathlete.data.sampling import PatchSampler, crop_with_padding
from decathlete.preprocess import cache
from decathlete.preprocess.pipeline import PreprocessedCase, sample_class_locations


def write_case(folder: Path, case_id: str, seg: np.ndarray, channels: int = 1, fmt: str = "b2nd") -> np.ndarray:
    """Cache a case whose image encodes each voxel's position (so crops can be checked); returns the image."""
    grid = np.indices(seg.shape).astype(np.float32)
    image = np.stack([1 + grid[0] * 1e4 + grid[1] * 100 + grid[2] + 1e6 * c for c in range(channels)])
    locations = sample_class_locations(seg, seed=0)
    cache.write_case(folder, case_id, PreprocessedCase(image, seg.astype(np.int8), {}, locations), fmt=fmt)
    return image


def sparse_seg(shape: tuple[int, int, int]) -> np.ndarray:
    """Labels 1 (a 2^3 blob near the upper corner) and 2 (a single voxel) in a volume of background / outside."""
    seg = np.zeros(shape, dtype=np.int8)
    seg[0, 0, :3] = -1  # outside the nonzero mask
    seg[-2:, -2:, -2:] = 1
    seg[shape[0] // 2, 1, shape[2] // 3] = 2
    return seg


def expected_crop(array: np.ndarray, start: list[int], size: list[int], pad: float) -> np.ndarray:
    """Reference crop of the trailing axes by padding the whole array (what `crop_with_padding` avoids)."""
    lead = array.ndim - len(start)
    widths = [(0, 0)] * lead + [(max(-s, 0), max(s + w - n, 0)) for s, w, n in zip(start, size, array.shape[lead:])]
    padded = np.pad(array, widths, constant_values=pad)
    return padded[(Ellipsis, *(slice(max(s, 0), max(s, 0) + w) for s, w in zip(start, size)))]


@pytest.mark.parametrize("fmt", ["b2nd", "npy"])
def test_crop_with_padding_reads_lazy_arrays(tmp_path: Path, fmt: str) -> None:
    seg = np.random.default_rng(0).integers(0, 3, size=(6, 8, 8)).astype(np.int8)
    image = write_case(tmp_path, "c", seg, channels=2, fmt=fmt)
    data, lazy_seg, _, _ = cache.open_case(tmp_path, "c")
    windows = [([1, 2, 3], [3, 4, 5]), ([-3, 5, -1], [8, 12, 12]), ([-1, -2, -2], [8, 12, 12]), ([7, 0, 0], [2, 2, 2])]
    for start, size in windows:  # inside, across borders, around the whole case, wholly outside
        np.testing.assert_array_equal(crop_with_padding(data, start, size, 0.0), expected_crop(image, start, size, 0))
        np.testing.assert_array_equal(crop_with_padding(lazy_seg, start, size, -1), expected_crop(seg, start, size, -1))
    out = np.full((2, 3, 3, 3), 7.0, dtype=np.float32)
    assert crop_with_padding(data, [5, 7, 7], [3, 3, 3], 0.0, out=out) is out and out[:, 0, 0, 0].all()
    assert (out[:, 1:] == 0).all() and (out[:, :, 1:] == 0).all()
    with pytest.raises(ValueError):
        crop_with_padding(data, [0, 0, 0], [2, 2, 2], 0.0, out=out)


def test_small_case_is_centred_and_padded(tmp_path: Path) -> None:
    seg = sparse_seg((6, 8, 8))
    image = write_case(tmp_path, "small", seg)
    sampler = PatchSampler(tmp_path, ["small"], (8, 12, 12), patch_size=(6, 8, 8))
    img, lab, meta = sampler.sample_batch(4, np.random.default_rng(0))
    assert img.shape == (4, 1, 8, 12, 12) and img.dtype == np.float32
    assert lab.shape == (4, 1, 8, 12, 12) and lab.dtype == np.int16
    assert [m["forced"] for m in meta] == [False, False, False, True]  # round(4 * 0.67) = 3 random, then forced
    for i, m in enumerate(meta):
        assert m["start"] == [-1, -2, -2]  # the only position: the case centred in the window
        np.testing.assert_array_equal(lab[i, 0, 1:7, 2:10, 2:10], seg)
        np.testing.assert_array_equal(img[i, :, 1:7, 2:10, 2:10], image)
        assert (img[i] == 0).sum() == img[i].size - image.size  # image padding is 0 ...
        assert (lab[i] == -1).sum() == lab[i].size - seg.size + (seg == -1).sum()  # ... label padding -1


def test_forced_samples_contain_the_chosen_class(tmp_path: Path) -> None:
    shape = (20, 24, 22)
    images = {
        "fg": write_case(tmp_path, "fg", sparse_seg(shape)),
        "empty": write_case(tmp_path, "empty", np.zeros(shape)),
    }
    segs = {"fg": sparse_seg(shape), "empty": np.zeros(shape)}
    patch, size = (6, 6, 6), (10, 12, 10)
    sampler = PatchSampler(tmp_path, ["fg", "empty"], size, patch_size=patch)
    rng, batch, forced, classes = np.random.default_rng(1), 5, 0, set()
    for _ in range(100):
        img, lab, meta = sampler.sample_batch(batch, rng)
        assert [m["forced"] for m in meta] == [False, False, False, True, True]  # round(5 * 0.67) = 3
        for i, m in enumerate(meta):
            forced += m["forced"]
            np.testing.assert_array_equal(lab[i, 0], expected_crop(segs[m["case_id"]], m["start"], size, -1))
            np.testing.assert_array_equal(img[i], expected_crop(images[m["case_id"]], m["start"], size, 0))
            if m["case_id"] == "empty" or not m["forced"]:
                assert m["class"] is None
                continue
            classes.add(m["class"])
            centre = lab[i, 0, 2:8, 3:9, 2:8]  # the final patch after augmentation's centre crop
            assert (centre == m["class"]).any()
    assert forced == 100 * round(batch * 0.33) and classes == {1, 2}
    only_2 = PatchSampler(tmp_path, ["fg"], size, foreground_classes=[2], oversample_foreground=1.0)
    _, lab, meta = only_2.sample_batch(6, rng)
    assert all(m["class"] == 2 for m in meta) and all((lab[i] == 2).any() for i in range(6))


def test_random_windows_reach_every_voxel_and_stay_in_bounds(tmp_path: Path) -> None:
    shape, size, patch = (7, 6, 5), (8, 8, 8), (4, 4, 4)  # y and x smaller than the window, larger than the patch
    write_case(tmp_path, "c", np.zeros(shape))
    sampler = PatchSampler(tmp_path, ["c"], size, patch_size=patch, oversample_foreground=0.0)
    covered = np.zeros(shape, dtype=bool)
    rng = np.random.default_rng(2)
    for _ in range(60):
        for m in sampler.sample_batch(8, rng)[2]:
            lo = [s + 2 for s in m["start"]]  # final patch: margin // 2 = 2 inside the window
            covered[tuple(slice(max(a, 0), a + p) for a, p in zip(lo, patch))] = True
            assert all(a >= 0 and a + p <= n for a, p, n in zip(lo, patch, shape))  # the final patch is inside
    assert covered.all()  # corners included


@pytest.mark.parametrize("axis", [0, 2])
def test_2d_sampling(tmp_path: Path, axis: int) -> None:
    shape = (12, 14, 16)
    seg = sparse_seg(shape)
    image = write_case(tmp_path, "c", seg, channels=2)
    plane = [n for a, n in enumerate(shape) if a != axis]
    size = (plane[0] - 2, plane[1] + 4)
    sampler = PatchSampler(tmp_path, ["c"], size, spatial_dims=2, slice_axis=axis, oversample_foreground=0.5)
    rng = np.random.default_rng(3)
    for _ in range(20):
        img, lab, meta = sampler.sample_batch(4, rng)
        assert img.shape == (4, 2, *size) and lab.shape == (4, 1, *size)
        for i, m in enumerate(meta):
            assert m["start"][axis] == m["slice"]
            window = list(size)
            window.insert(axis, 1)
            np.testing.assert_array_equal(lab[i, 0], expected_crop(seg, m["start"], window, -1).squeeze(axis))
            np.testing.assert_array_equal(img[i], expected_crop(image, m["start"], window, 0).squeeze(axis + 1))
            if m["forced"]:
                assert (lab[i] == m["class"]).any()
    with pytest.raises(ValueError):
        PatchSampler(tmp_path, ["c"], (8, 8, 8), spatial_dims=2)


def test_deterministic_and_picklable(tmp_path: Path) -> None:
    for i in range(3):
        write_case(tmp_path, f"c{i}", sparse_seg((10, 12, 14)))
    sampler = PatchSampler(tmp_path, ["c0", "c1", "c2"], (8, 8, 8), probabilistic_oversampling=True)
    first = sampler.sample_batch(6, np.random.default_rng(5))
    clone = pickle.loads(pickle.dumps(sampler))  # handles are open now: they must not travel
    for again in (sampler.sample_batch(6, np.random.default_rng(5)), clone.sample_batch(6, np.random.default_rng(5))):
        np.testing.assert_array_equal(first[0], again[0])
        np.testing.assert_array_equal(first[1], again[1])
        assert first[2] == again[2]
    other = sampler.sample_batch(6, np.random.default_rng(6))
    assert first[2] != other[2]
    forced = [m["forced"] for _ in range(50) for m in sampler.sample_batch(6, np.random.default_rng(_))[2]]
    assert 0.2 < np.mean(forced) < 0.5  # probabilistic: about 33% of samples, anywhere in the batch


def test_case_weights_set_how_often_each_case_is_drawn(tmp_path: Path) -> None:
    for i in range(3):
        write_case(tmp_path, f"c{i}", sparse_seg((10, 12, 14)))
    sampler = PatchSampler(tmp_path, ["c0", "c1", "c2"], (8, 8, 8), case_weights={"c0": 3.0, "c2": 0.0})
    np.testing.assert_allclose(sampler.case_probabilities, [0.75, 0.25, 0.0])
    drawn = [m["case_id"] for s in range(400) for m in sampler.sample_batch(2, np.random.default_rng(s))[2]]
    assert drawn.count("c2") == 0 and abs(drawn.count("c0") / len(drawn) - 0.75) < 0.05  # 800 draws: sd 0.015
    with pytest.raises(ValueError, match="non-negative"):
        PatchSampler(tmp_path, ["c0"], (8, 8, 8), case_weights={"c0": -1.0})
    uniform = PatchSampler(tmp_path, ["c0", "c1", "c2"], (8, 8, 8))
    assert uniform.case_probabilities is None and uniform.case_properties("c1")["cache_format"] == "b2nd"


def test_learning_rate_schedules_by_hand() -> None:
    from decathlete import registry

    poly = registry.build("schedules", "poly", power=0.9)
    assert poly(0, 100) == 1.0 and poly(50, 100) == pytest.approx(0.5**0.9) and poly(100, 100) == 0.0
    step = registry.build("schedules", "exponential", gamma=0.5, every=10)
    assert [step(s, 1000) for s in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    with pytest.raises(ValueError, match="every"):
        registry.build("schedules", "exponential", every=0)
