"""Crop to the nonzero bounding box."""

from __future__ import annotations

import numpy as np
import pytest

from decathlete.preprocess.cropping import (
    OUTSIDE_LABEL,
    bounding_box,
    crop_to_bbox,
    crop_to_nonzero,
    nonzero_mask,
    paste_into_bbox,
)


def _box_volume() -> tuple[np.ndarray, np.ndarray]:
    data = np.zeros((2, 10, 12, 14), dtype=np.float32)
    data[0, 2:7, 3:9, 4:12] = 5.0
    data[1, 3:8, 3:5, 4:6] = -1.0  # channel 1 extends the box along z only
    seg = np.zeros((10, 12, 14), dtype=np.uint8)
    seg[3:5, 4:6, 5:7] = 2
    return data, seg


def test_nonzero_mask_any_channel_and_fills_holes() -> None:
    data, _ = _box_volume()
    data[0, 4, 5, 6] = 0.0  # an enclosed zero voxel (a dark ventricle) stays inside
    mask = nonzero_mask(data)
    assert mask.dtype == bool and mask.shape == (10, 12, 14)
    assert mask[4, 5, 6] and mask[7, 3, 4] and not mask[0, 0, 0]


def test_bounding_box_exact_half_open() -> None:
    data, _ = _box_volume()
    assert bounding_box(nonzero_mask(data)) == ((2, 8), (3, 9), (4, 12))


def test_all_zero_keeps_full_box() -> None:
    data = np.zeros((1, 4, 5, 6), dtype=np.uint8)
    cropped, seg, bbox, mask = crop_to_nonzero(data, np.zeros((4, 5, 6), np.uint8))
    assert bbox == ((0, 4), (0, 5), (0, 6))
    assert cropped.shape == data.shape and seg.shape == (4, 5, 6) and not mask.any()


def test_seg_cropped_alongside_and_outside_marking() -> None:
    data, seg = _box_volume()
    cropped, cseg, bbox, mask = crop_to_nonzero(data, seg)
    assert cropped.shape == (2, 6, 6, 8) and cseg.shape == mask.shape == (6, 6, 8)
    np.testing.assert_array_equal(cseg, seg[2:8, 3:9, 4:12])
    assert OUTSIDE_LABEL not in cseg  # not marked unless asked
    _, marked, _, mask = crop_to_nonzero(data, seg, mark_outside=True)
    assert marked.dtype.kind == "i" and seg.min() == 0  # signed copy, caller's array untouched
    np.testing.assert_array_equal(marked == OUTSIDE_LABEL, ~mask & (cseg == 0))
    assert (marked == 2).sum() == (seg == 2).sum()


def test_paste_inverts_crop_and_shape_mismatch_fails() -> None:
    data, seg = _box_volume()
    bbox = bounding_box(nonzero_mask(data))
    restored = paste_into_bbox(crop_to_bbox(data, bbox), bbox, data.shape[1:])
    np.testing.assert_array_equal(restored, data)
    with pytest.raises(ValueError, match="label shape"):
        crop_to_nonzero(data, seg[:-1])
