"""Resampling of images and label maps."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from decathlete.preprocess.resampling import (
    anisotropy_axis,
    compute_new_shape,
    resample_data,
    resample_seg,
    separate_axis_for,
)


def _zoom_reference(volume: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    # skimage.transform.resize(mode="edge", anti_aliasing=False) == ndimage.zoom(mode="nearest", grid_mode=True).
    factors = np.array(shape) / np.array(volume.shape)
    return ndimage.zoom(volume.astype(np.float64), factors, order=order, mode="nearest", grid_mode=True)


def _sphere(shape: tuple[int, int, int], radius: float) -> np.ndarray:
    grid = np.indices(shape).astype(np.float64)
    centre = (np.array(shape) - 1) / 2
    return (((grid - centre[:, None, None, None]) ** 2).sum(0) <= radius**2).astype(np.int8)


def test_compute_new_shape_rounds_like_nnunet() -> None:
    assert compute_new_shape((10, 20, 30), (5, 0.8, 0.8), (2.5, 1.6, 0.8)) == (20, 10, 30)
    assert compute_new_shape((7, 5, 1), (1, 1, 1), (2, 2, 4)) == (4, 2, 1)  # round(3.5)=4, round(2.5)=2, >= 1


def test_anisotropy_axis() -> None:
    assert anisotropy_axis((5.0, 0.8, 0.8)) == 0
    assert anisotropy_axis((1.0, 1.0, 3.5)) == 2
    assert anisotropy_axis((1.0, 1.0, 1.0)) is None
    assert anisotropy_axis((3.0, 1.0, 1.0)) is None  # not strictly above the threshold
    assert anisotropy_axis((0.25, 1.25, 1.25)) is None  # two coarse axes: no separate axis (as nnU-Net)
    assert separate_axis_for((1.0, 1.0, 1.0), (4.0, 1.0, 1.0)) == 0  # falls back to the target spacing


@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("shape", [(17, 30, 21), (7, 9, 16)])  # up- and downsampling, odd ratios
def test_data_matches_scipy_zoom(order: int, shape: tuple[int, int, int]) -> None:
    x = np.random.default_rng(0).normal(size=(2, 11, 15, 13)).astype(np.float32)
    out = resample_data(x, shape, order)
    assert out.shape == (2, *shape) and out.dtype == np.float32
    for c in range(2):
        np.testing.assert_allclose(out[c], _zoom_reference(x[c], shape, order), atol=2e-5)


def test_constant_stays_constant_and_no_change_is_fast_path() -> None:
    x = np.full((1, 6, 10, 12), 3.25, dtype=np.float32)
    for order in (1, 3):
        np.testing.assert_allclose(resample_data(x, (13, 7, 25), order), 3.25, rtol=1e-6)
    np.testing.assert_allclose(resample_data(x, (13, 7, 25), 3, separate_axis=0), 3.25, rtol=1e-6)
    assert resample_data(x, (6, 10, 12)) is x
    seg = np.zeros((6, 10, 12), dtype=np.int8)
    assert resample_seg(seg, (6, 10, 12)) is seg


def test_downsampling_linear_ramp_is_exact_inside() -> None:
    z, y, x = np.indices((20, 24, 28), dtype=np.float32)
    ramp = (z + 2 * y + 3 * x)[None]
    for order in (1, 3):
        out = resample_data(ramp, (10, 12, 14), order)[0]
        c = np.indices((10, 12, 14)) * 2 + 0.5  # input coordinate of each output voxel (half-pixel aligned)
        expected = c[0] + 2 * c[1] + 3 * c[2]
        inner = (slice(4, -4),) * 3  # the edge-extended boundary bends the cubic spline within a few voxels
        np.testing.assert_allclose(out[inner], expected[inner], atol=1e-3)
    assert ramp.min() <= resample_data(ramp, (10, 12, 14), 1).min()  # linear never leaves the input range


def test_nearest_label_resampling_preserves_label_set() -> None:
    seg = np.random.default_rng(1).integers(-1, 4, size=(9, 11, 13)).astype(np.int8)
    for shape in [(18, 5, 13), (4, 22, 30)]:
        out = resample_seg(seg, shape, order=0)
        assert out.dtype == np.int8 and set(np.unique(out)) <= set(np.unique(seg))
        np.testing.assert_array_equal(out, _zoom_reference(seg, shape, 0).astype(np.int8))


def test_linear_onehot_sphere_volume_and_labels() -> None:
    sphere = _sphere((24, 24, 24), 8.0)
    up = resample_seg(sphere, (48, 48, 48), order=1)
    assert abs(up.sum() / (8 * sphere.sum()) - 1) < 0.05
    down = resample_seg(_sphere((48, 48, 48), 16.0), (24, 24, 24), order=1)
    assert abs(down.sum() / (_sphere((48, 48, 48), 16.0).sum() / 8) - 1) < 0.05


def test_onehot_argmax_matches_brute_force_and_keeps_outside() -> None:
    rng = np.random.default_rng(2)
    coarse = rng.integers(-1, 4, size=(4, 5, 5))
    seg = np.kron(coarse, np.ones((3, 3, 3), dtype=np.int64)).astype(np.int8)  # blocks, with -1 "outside"
    shape = (17, 23, 9)
    out = resample_seg(seg, shape, order=1)
    labels = np.unique(seg)
    values = np.stack([_zoom_reference((seg == v).astype(np.float64), shape, 1) for v in labels])
    top2 = np.sort(values, axis=0)[-2:]
    clear = top2[1] - top2[0] > 1e-4  # tie-breaking is a documented convention; compare decided voxels only
    np.testing.assert_array_equal(out[clear], labels[np.argmax(values, axis=0)][clear])
    assert set(np.unique(out)) == set(labels) and out.dtype == np.int8


def test_anisotropic_uses_separate_axis_path() -> None:
    # Spacing (5, 0.8, 0.8) -> (2.5, 0.8, 0.8): in-plane unchanged, z by nearest: every slice is an original one.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 6, 16, 16)).astype(np.float32)
    spacing, target = (5.0, 0.8, 0.8), (2.5, 0.8, 0.8)
    axis = separate_axis_for(spacing, target)
    shape = compute_new_shape(x.shape[1:], spacing, target)
    assert axis == 0 and shape == (12, 16, 16)
    out = resample_data(x, shape, 3, separate_axis=axis)
    np.testing.assert_array_equal(out[0, 0::2], x[0])
    np.testing.assert_array_equal(out[0, 1::2], x[0])
    # With an in-plane change too: per-slice 2-D cubic, then nearest along z (nnU-Net's separate-z scheme).
    out = resample_data(x, (12, 24, 10), 3, separate_axis=0)
    planes = np.stack([_zoom_reference(s, (24, 10), 3) for s in x[0]])
    np.testing.assert_allclose(out[0], np.repeat(planes, 2, axis=0), atol=2e-5)
    seg = (x[0] > 0.5).astype(np.int8)
    seg_out = resample_seg(seg, (12, 16, 16), 1, separate_axis=0)
    np.testing.assert_array_equal(seg_out[1::2], seg)


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError):
        resample_data(np.zeros((4, 4, 4)), (2, 2, 2))
    with pytest.raises(ValueError):
        resample_data(np.zeros((1, 4, 4, 4)), (2, 2, 2), order=7)
