"""Crop a case to the bounding box of its nonzero region (nnU-Net's first preprocessing step).

All arrays are ``(C, z, y, x)`` images or ``(z, y, x)`` masks / label maps; a bounding box is a tuple of
half-open ``(start, stop)`` voxel index pairs in the same ``(z, y, x)`` order.

The "outside" label: nnU-Net v2 sets background label voxels that lie outside the nonzero mask to -1, so that a
normalisation restricted to the mask (per-image z-score of skull-stripped brains) can be repeated on the
training device, where the image outside the mask is set back to 0. The -1 only means something when a
channel is normalised inside the mask, so `crop_to_nonzero` marks it only when asked (``mark_outside=True``);
`decathlete.preprocess.pipeline` asks exactly when some channel's spec has ``use_nonzero_mask``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BBox = tuple[tuple[int, int], ...]

OUTSIDE_LABEL = -1


def nonzero_mask(data: np.ndarray) -> np.ndarray:
    """Voxels where any channel is nonzero, with enclosed holes filled.

    Args:
        data: image ``(C, z, y, x)`` of any numeric dtype.

    Returns:
        Boolean mask ``(z, y, x)``. Holes are filled (``scipy.ndimage.binary_fill_holes``) as nnU-Net does, so
        zero-valued tissue inside the body or brain (e.g. a dark ventricle or an air pocket) stays inside.
    """
    if data.ndim != 4:
        raise ValueError(f"nonzero_mask expects (C, z, y, x), got shape {data.shape}")
    mask = np.zeros(data.shape[1:], dtype=bool)
    # One channel at a time: `data != 0` on the whole array would allocate C boolean volumes at once.
    for channel in data:
        mask |= channel != 0
    return ndimage.binary_fill_holes(mask)


def bounding_box(mask: np.ndarray) -> BBox:
    """Half-open bounding box of the True voxels of ``mask``.

    Args:
        mask: boolean array of any dimensionality (normally ``(z, y, x)``).

    Returns:
        ``((start, stop), ...)`` per axis, in voxels. An empty mask gives the full extent, so an all-zero image
        is kept whole rather than cropped to nothing.
    """
    mask = np.asarray(mask, dtype=bool)
    box = []
    for axis in range(mask.ndim):
        # Project onto one axis: cheaper than np.nonzero, which materialises every coordinate.
        profile = np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis))
        hits = np.flatnonzero(profile)
        if hits.size == 0:
            return tuple((0, int(n)) for n in mask.shape)
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def bbox_slices(bbox: BBox) -> tuple[slice, ...]:
    """Slices selecting ``bbox`` from a spatial ``(z, y, x)`` array."""
    return tuple(slice(lo, hi) for lo, hi in bbox)


def crop_to_bbox(array: np.ndarray, bbox: BBox) -> np.ndarray:
    """Crop the trailing spatial axes of ``array`` (``(z, y, x)`` or ``(C, z, y, x)``) to ``bbox`` (a view)."""
    return array[(Ellipsis, *bbox_slices(bbox))]


def paste_into_bbox(cropped: np.ndarray, bbox: BBox, full_shape: tuple[int, ...], fill: float = 0) -> np.ndarray:
    """Inverse of `crop_to_bbox`: place ``cropped`` into a new array of ``full_shape`` filled with ``fill``.

    Args:
        cropped: ``(..., z, y, x)`` array whose spatial shape equals the box size.
        bbox: the box it was cropped with.
        full_shape: spatial shape ``(z, y, x)`` before cropping; leading axes of ``cropped`` are kept.
        fill: value outside the box (0 = background for label maps).
    """
    lead = cropped.shape[: cropped.ndim - len(full_shape)]
    out = np.full((*lead, *full_shape), fill, dtype=cropped.dtype)
    out[(Ellipsis, *bbox_slices(bbox))] = cropped
    return out


def crop_to_nonzero(
    data: np.ndarray, seg: np.ndarray | None = None, mark_outside: bool = False, crop: bool = True
) -> tuple[np.ndarray, np.ndarray | None, BBox, np.ndarray]:
    """Crop image (and label map) to the bounding box of the nonzero mask.

    Args:
        data: image ``(C, z, y, x)``.
        seg: label map ``(z, y, x)`` on the same grid, or None.
        mark_outside: set background (0) label voxels outside the nonzero mask to ``OUTSIDE_LABEL`` (-1).
            Use it only when a channel is normalised inside the mask (see the module docstring).
        crop: False keeps the whole volume (the box is the full grid; the mask and marking work as with a crop).

    Returns:
        ``(data, seg, bbox, mask)``: the cropped image (a view of ``data``), the cropped label map (a view, or a
        signed copy when ``mark_outside``; None without ``seg``), the half-open box and the cropped mask
        ``(z, y, x)``.
    """
    if seg is not None and seg.shape != data.shape[1:]:
        raise ValueError(f"label shape {seg.shape} differs from image shape {data.shape[1:]} (z, y, x)")
    mask = nonzero_mask(data)
    bbox = bounding_box(mask) if crop else tuple((0, int(n)) for n in mask.shape)
    mask = crop_to_bbox(mask, bbox)
    data = crop_to_bbox(data, bbox)
    if seg is not None:
        seg = crop_to_bbox(seg, bbox)
        if mark_outside:
            # Copy into a signed dtype that holds -1 (uint8 -> int16); never write into the caller's array.
            seg = seg.astype(np.result_type(seg.dtype, np.int8), copy=True)
            seg[(seg == 0) & ~mask] = OUTSIDE_LABEL
    return data, seg, bbox, mask
