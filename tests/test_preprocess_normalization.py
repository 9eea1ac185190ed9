"""Per-channel normalisation schemes."""

from __future__ import annotations

import numpy as np
import pytest

from decathlete import registry
from decathlete.preprocess import normalization as norm


def test_ct_clip_then_zscore_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 600, size=(1, 6, 7, 8)).astype(np.float32)
    spec = {"scheme": "ct", "clip": [-200.0, 300.0], "mean": 40.0, "std": 90.0}
    out = norm.normalize(x, [spec])
    expected = (np.clip(x.astype(np.float64), -200, 300) - 40.0) / 90.0
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_zscore_with_mask_sets_outside_to_zero() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(50, 7, size=(1, 8, 9, 10)).astype(np.float32)
    mask = np.zeros((8, 9, 10), dtype=bool)
    mask[2:6, 1:8, 3:9] = True
    out = norm.normalize(x, [{"scheme": "zscore", "use_nonzero_mask": True}], mask)[0]
    assert np.all(out[~mask] == 0)
    assert abs(out[mask].mean()) < 1e-6 and abs(out[mask].std() - 1) < 1e-5


def test_zscore_without_mask_uses_whole_image_and_none_casts() -> None:
    x = np.arange(2 * 3 * 4 * 5, dtype=np.uint8).reshape(2, 3, 4, 5)
    out = norm.normalize(x, [{"scheme": "zscore"}, {"scheme": "none"}])
    assert abs(out[0].mean()) < 1e-6 and abs(out[0].std() - 1) < 1e-5
    np.testing.assert_array_equal(out[1], x[1].astype(np.float32))


def test_huge_intensities_keep_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(norm, "_SLAB_VOXELS", 500)  # several slabs: exercise the slab-wise accumulation
    rng = np.random.default_rng(2)
    x = (1.7e6 + rng.normal(0, 3.0, size=(1, 12, 20, 20))).astype(np.float32)
    mask = np.ones((12, 20, 20), dtype=bool)
    mask[:, :2] = False
    out = norm.normalize(x, [{"scheme": "zscore", "use_nonzero_mask": True}], mask)[0]
    inside = out[mask].astype(np.float64)
    assert abs(inside.mean()) < 1e-4 and abs(inside.std() - 1) < 1e-4


def test_bad_specs_fail_clearly() -> None:
    x = np.ones((1, 2, 2, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="unknown normalisation scheme"):
        norm.normalize(x, [{"scheme": "minmax"}])
    with pytest.raises(ValueError, match="the image has 1 channel\\(s\\), the plan normalises 0"):
        norm.normalize(x, [])
    with pytest.raises(ValueError, match="needs the nonzero mask"):
        norm.normalize(x, [{"scheme": "zscore", "use_nonzero_mask": True}])
    with pytest.raises(ValueError, match="lacks"):
        norm.normalize(x, [{"scheme": "ct", "clip": [0, 1]}])


def test_empty_mask_and_constant_image_give_zeros() -> None:
    x = np.full((1, 3, 3, 3), 7.0, dtype=np.float32)
    empty = np.zeros((3, 3, 3), dtype=bool)
    assert not norm.normalize(x, [{"scheme": "zscore", "use_nonzero_mask": True}], empty).any()
    assert not norm.normalize(x, [{"scheme": "zscore"}]).any()


def test_a_registered_normalizer_plans_and_applies() -> None:
    @registry.register_normalizer("test_double")
    class Double:
        @staticmethod
        def plan(stats, fingerprint, factor=2.0):  # noqa: ANN001, ANN205 - the protocol's signature
            return {"scheme": "test_double", "factor": factor}

        @staticmethod
        def apply(channel, spec, mask=None):  # noqa: ANN001, ANN205
            return (channel * spec["factor"]).astype(np.float32)

    try:
        spec = registry.get("normalizers", "test_double").plan({}, {}, factor=3.0)
        out = norm.normalize(np.ones((1, 2, 2, 2)), [spec])
        assert np.all(out == 3)
        with pytest.raises(ValueError, match="unknown normalisation scheme 'nope'"):
            norm.normalize(np.ones((1, 2, 2, 2)), [{"scheme": "nope"}])
    finally:
        registry.unregister("normalizers", "test_double")
