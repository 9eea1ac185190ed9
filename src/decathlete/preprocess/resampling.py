"""Resample images and label maps to a target spacing.

Arrays are ``(C, z, y, x)`` images or ``(z, y, x)`` label maps; shapes and spacings are ``(z, y, x)`` (mm).

Semantics: the output grid covers the same field of view as the input (voxel edges aligned, "grid mode"):
output voxel ``o`` of an axis resized from ``n`` to ``m`` samples the input at ``(o + 0.5) * n / m - 0.5``, and
values beyond the edge repeat the edge voxel. That is ``skimage.transform.resize(mode="edge",
anti_aliasing=False)``, which nnU-Net uses, and ``scipy.ndimage.zoom(order=k, mode="nearest", grid_mode=True)``.
There is no anti-aliasing filter when downsampling, as in nnU-Net.

Implementation: B-spline interpolation on a regular grid is separable, so each axis is resampled in turn. For
order >= 2 the B-spline coefficients come from ``scipy.ndimage.spline_filter1d`` (the exact recursive prefilter
that ``ndimage.zoom`` runs, on an input edge-padded by 12 voxels as ``ndimage.zoom`` pads it); then each output
voxel is an (order + 1)-tap weighted sum of coefficients, applied as a sparse matrix (``scipy.sparse`` CSR @
dense). The result matches ``scipy.ndimage.zoom`` to ~1e-6 (float32 rounding) for orders 0-5, up- and
downsampling, but costs (order + 1) taps per axis instead of (order + 1)^3 per voxel. Measured on this 2-core
VM, (1, 60, 200, 200) float32 -> x1.5 per axis (90, 300, 300): order 3 0.23 s, order 1 0.09 s, order 0
0.04 s, against 3.2 s, 0.63 s and 0.13 s for ``ndimage.zoom`` (torch trilinear: 0.05 s; not used, one code path
for every order is simpler and cubic must exist anyway). Cubic interpolation can overshoot the input range near
edges (ringing); that is expected and kept.

Anisotropy: when one axis is much coarser than the others (`anisotropy_axis`), nnU-Net resamples in-plane
with the requested order slice by slice and then along the coarse axis with order 0 (nearest), so no ringing
or blurring crosses thick slices. With separable per-axis resampling that is simply a per-axis order.

Labels: order 0 picks the nearest voxel. Order >= 1 interpolates the one-hot indicator of every label and keeps
the label with the largest value (argmax), so no label is ever invented and -1 ("outside") survives. Ties go to
the higher label, and the most frequent label (normally background, computed as 1 - sum of the others because
interpolation preserves sums) loses every tie. For order <= 1 each label is interpolated only inside its
bounding box, so many small organs cost little.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from scipy import ndimage, sparse

_PAD = 12  # edge padding before the spline prefilter; the value scipy.ndimage.zoom uses for mode="nearest"


def compute_new_shape(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[int, ...]:
    """Shape after resampling: ``round(shape * spacing / target_spacing)`` per axis, at least 1 (nnU-Net's rule).

    Args:
        shape: spatial shape ``(z, y, x)`` in voxels.
        spacing: current voxel size ``(z, y, x)`` in mm.
        target_spacing: wanted voxel size ``(z, y, x)`` in mm.
    """
    if not len(shape) == len(spacing) == len(target_spacing):
        raise ValueError(f"shape {shape}, spacing {spacing} and target {target_spacing} differ in length")
    # Same operation order as nnU-Net (spacing / target * shape) so float rounding agrees at .5 boundaries.
    return tuple(max(1, int(round(float(s) / float(t) * int(n)))) for n, s, t in zip(shape, spacing, target_spacing))


def anisotropy_axis(spacing: Sequence[float], threshold: float = 3.0) -> int | None:
    """The axis to resample separately: the coarsest one, when it is > ``threshold`` x the finest spacing.

    Args:
        spacing: voxel size ``(z, y, x)`` in mm.
        threshold: anisotropy ratio (nnU-Net: 3).

    Returns:
        The axis index, or None for isotropic-enough grids and when two axes share the largest spacing (e.g.
        ``(0.25, 1.25, 1.25)``), where nnU-Net does not resample separately either.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.max() <= threshold * spacing.min():
        return None
    coarse = np.flatnonzero(np.isclose(spacing, spacing.max()))
    return int(coarse[0]) if coarse.size == 1 else None


def separate_axis_for(spacing: Sequence[float], target_spacing: Sequence[float], threshold: float = 3.0) -> int | None:
    """nnU-Net's choice: the anisotropic axis of the original spacing, else that of the target spacing."""
    axis = anisotropy_axis(spacing, threshold)
    return axis if axis is not None else anisotropy_axis(target_spacing, threshold)


def _bspline(t: np.ndarray, order: int) -> np.ndarray:
    """Centred cardinal B-spline of degree ``order`` evaluated at ``t`` (truncated-power formula)."""
    if order == 0:
        return (np.abs(t) < 0.5).astype(np.float64)
    t = np.abs(t)
    out = np.zeros_like(t, dtype=np.float64)
    for j in range(order + 2):
        out += (-1) ** j * math.comb(order + 1, j) * np.maximum(t + (order + 1) / 2 - j, 0.0) ** order
    return out / math.factorial(order)


@lru_cache(maxsize=128)
def _axis_taps(n_in: int, n_out: int, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Input indices and weights ``(n_out, order + 1)`` for one axis (indices into the padded input if order >= 2)."""
    centre = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    # First tap: floor(c - (k - 1) / 2) gives the k + 1 nearest knots for odd and even degrees alike.
    index = np.floor(centre - (order - 1) / 2).astype(np.int64)[:, None] + np.arange(order + 1)
    weight = _bspline(centre[:, None] - index, order).astype(np.float32)
    pad = _PAD if order >= 2 else 0
    # Clipping the index repeats the edge coefficient: the "nearest" boundary of scipy / "edge" of skimage.
    index = np.clip(index + pad, 0, n_in + 2 * pad - 1)
    index.flags.writeable = False
    weight.flags.writeable = False
    return index, weight


def _apply_taps(x: np.ndarray, axis: int, index: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """float32 weighted sum of ``x`` gathered along ``axis`` at ``index`` (n_out, taps) with ``weight``.

    The taps form a sparse (n_out, n_in) matrix applied with ``scipy.sparse`` (CSR @ dense): 2-4x faster than
    gathering with ``numpy.take``, most of all along the contiguous last axis. Clipped edge indices repeat a
    column, and CSR construction sums such duplicates, which is what edge extension means.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_out, taps = index.shape
    rows = np.repeat(np.arange(n_out), taps)
    matrix = sparse.csr_matrix((weight.ravel(), (rows, index.ravel())), shape=(n_out, x.shape[axis]))
    lead, trail = int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis + 1 :]))
    x3 = x.reshape(lead, x.shape[axis], trail)
    out = np.empty((lead, n_out, trail), dtype=np.float32)
    if trail == 1:  # last axis: one product with the transposed (F-ordered) view, no copy
        out[:, :, 0] = (matrix @ x3[:, :, 0].T).T
    else:
        for i in range(lead):
            out[i] = matrix @ x3[i]
    return out.reshape(*x.shape[:axis], n_out, *x.shape[axis + 1 :])


def _resample_axis(x: np.ndarray, axis: int, n_out: int, order: int) -> np.ndarray:
    """Resample ``x`` along one axis to ``n_out`` samples; order 0 keeps the dtype, others give float32."""
    n_in = x.shape[axis]
    index, weight = _axis_taps(n_in, n_out, order)
    if order == 0:
        return np.take(x, index[:, 0], axis=axis)
    if order >= 2:
        width = [(0, 0)] * x.ndim
        width[axis] = (_PAD, _PAD)
        x = np.pad(x.astype(np.float32, copy=False), width, mode="edge")
        x = ndimage.spline_filter1d(x, order, axis=axis, output=np.float32, mode="nearest")
    return _apply_taps(x, axis, index, weight)


def _axis_orders(
    new_shape: Sequence[int], order: int, separate_axis: int | None, separate_axis_order: int
) -> list[int]:
    if not 0 <= order <= 5 or not 0 <= separate_axis_order <= 5:
        raise ValueError(f"interpolation orders must be 0..5, got {order} and {separate_axis_order}")
    orders = [order] * len(new_shape)
    if separate_axis is not None:
        orders[separate_axis] = separate_axis_order
    return orders


def _axis_sequence(shape: Sequence[int], new_shape: Sequence[int]) -> list[int]:
    """Axes that change size, shrinking ones first so later passes touch fewer voxels."""
    return sorted((a for a in range(len(shape)) if shape[a] != new_shape[a]), key=lambda a: new_shape[a] / shape[a])


def resample_volume(
    volume: np.ndarray,
    new_shape: Sequence[int],
    order: int = 3,
    separate_axis: int | None = None,
    separate_axis_order: int = 0,
) -> np.ndarray:
    """Resample one ``(z, y, x)`` intensity volume to ``new_shape``; float32 result (see the module docstring)."""
    if volume.ndim != len(new_shape):
        raise ValueError(f"volume of shape {volume.shape} cannot be resampled to {tuple(new_shape)}")
    orders = _axis_orders(new_shape, order, separate_axis, separate_axis_order)
    out = volume
    for axis in _axis_sequence(volume.shape, new_shape):
        out = _resample_axis(out, axis, int(new_shape[axis]), orders[axis])
    return np.ascontiguousarray(out, dtype=np.float32)


def resample_data(
    data: np.ndarray,
    new_shape: Sequence[int],
    order: int = 3,
    separate_axis: int | None = None,
    separate_axis_order: int = 0,
) -> np.ndarray:
    """Resample an image ``(C, z, y, x)`` to spatial shape ``new_shape`` ``(z, y, x)``.

    Args:
        data: image, any real dtype.
        new_shape: target spatial shape (see `compute_new_shape`).
        order: B-spline order in-plane / on all axes (nnU-Net: 3 for images).
        separate_axis: axis resampled with ``separate_axis_order`` instead (see `anisotropy_axis`), or None.
        separate_axis_order: order along ``separate_axis`` (nnU-Net: 0, nearest).

    Returns:
        float32 ``(C, *new_shape)``. When the shape does not change, ``data`` itself (cast to float32 if needed).
    """
    if data.ndim != 4 or len(new_shape) != 3:
        raise ValueError(f"resample_data expects (C, z, y, x) and a 3-D shape, got {data.shape} -> {new_shape}")
    new_shape = tuple(int(n) for n in new_shape)
    if data.shape[1:] == new_shape:
        return data.astype(np.float32, copy=False)
    out = np.empty((data.shape[0], *new_shape), dtype=np.float32)
    for c in range(data.shape[0]):
        out[c] = resample_volume(data[c], new_shape, order, separate_axis, separate_axis_order)
    return out


def _label_window(index: np.ndarray, lo: int, hi: int) -> tuple[slice, slice, np.ndarray]:
    """Output rows whose taps touch input ``[lo, hi)``, the input slice they read, and their re-based indices."""
    rows = np.flatnonzero(((index >= lo) & (index < hi)).any(axis=1))
    out_sl = slice(int(rows[0]), int(rows[-1]) + 1)
    sub = index[out_sl]
    start = int(sub.min())
    return out_sl, slice(start, int(sub.max()) + 1), sub - start


def _label_boxes(seg: np.ndarray, labels: np.ndarray) -> dict[int, tuple[slice, ...]]:
    """Bounding box (slices) of every label, in one pass (``ndimage.find_objects`` needs labels >= 1)."""
    shift = 1 - int(labels[0])
    boxes = ndimage.find_objects(seg.astype(np.int32) + shift)
    return {int(label): boxes[int(label) + shift - 1] for label in labels}


def _local_indicator(
    seg: np.ndarray, label: int, box: tuple[slice, ...], new_shape: Sequence[int], axes: Sequence[int]
) -> tuple[tuple[slice, ...], np.ndarray]:
    """Linearly interpolated indicator of ``label`` on the output window its bounding box can reach.

    Exact for order <= 1: the indicator is 0 outside the box and linear taps only reach adjacent voxels.
    """
    in_sl, out_sl, taps = [], [], {}
    for a, sl in enumerate(box):
        if a in axes:
            index, weight = _axis_taps(seg.shape[a], int(new_shape[a]), 1)
            o_sl, i_sl, sub = _label_window(index, sl.start, sl.stop)
            taps[a] = (sub, weight[o_sl])
        else:
            o_sl = i_sl = sl
        in_sl.append(i_sl)
        out_sl.append(o_sl)
    value = (seg[tuple(in_sl)] == label).astype(np.float32)
    for a in axes:
        value = _apply_taps(value, a, *taps[a])
    return tuple(out_sl), value


def _onehot_argmax(seg: np.ndarray, new_shape: Sequence[int], orders: Sequence[int], axes: Sequence[int]) -> np.ndarray:
    """Interpolate every label's indicator along ``axes`` (per-axis ``orders``, >= 1) and keep the argmax label."""
    new_shape = tuple(int(n) for n in new_shape)
    labels, counts = np.unique(seg, return_counts=True)
    implicit = labels[np.argmax(counts)]
    if labels.size == 1:
        return np.full(new_shape, implicit, dtype=seg.dtype)
    best = np.zeros(new_shape, dtype=np.float32)
    total = np.zeros(new_shape, dtype=np.float32)
    result = np.full(new_shape, implicit, dtype=seg.dtype)
    local = all(orders[a] == 1 for a in axes)
    boxes = _label_boxes(seg, labels) if local else {}
    for label in labels[::-1]:  # descending with a strict ">" below: the higher label wins ties
        if label == implicit:
            continue
        if local:
            out_sl, value = _local_indicator(seg, label, boxes[int(label)], new_shape, axes)
        else:
            # Spline prefilters are global (IIR), so a label box is not enough: resample the whole indicator.
            out_sl, value = (slice(None),) * seg.ndim, (seg == label).astype(np.float32)
            for a in axes:
                value = _resample_axis(value, a, new_shape[a], orders[a])
        total[out_sl] += value
        wins = value > best[out_sl]
        best[out_sl][wins] = value[wins]
        result[out_sl][wins] = label
    # The implicit label's value is 1 - sum(others) (interpolation preserves sums); it loses ties.
    result[(1.0 - total) > best] = implicit
    return result


def resample_seg(
    seg: np.ndarray,
    new_shape: Sequence[int],
    order: int = 1,
    separate_axis: int | None = None,
    separate_axis_order: int = 0,
) -> np.ndarray:
    """Resample a label map ``(z, y, x)`` to ``new_shape`` without inventing labels.

    Args:
        seg: integer label map (may contain -1 "outside").
        new_shape: target shape ``(z, y, x)``.
        order: 0 = nearest; >= 1 = interpolate each label's one-hot indicator, keep the argmax (nnU-Net: 1).
        separate_axis: axis resampled with ``separate_axis_order`` instead, or None.
        separate_axis_order: order along ``separate_axis``; 0 (nearest) as in nnU-Net.

    Returns:
        Label map of ``seg``'s dtype; ``seg`` itself when the shape does not change.
    """
    new_shape = tuple(int(n) for n in new_shape)
    if seg.ndim != len(new_shape):
        raise ValueError(f"label map of shape {seg.shape} cannot be resampled to {new_shape}")
    if seg.shape == new_shape:
        return seg
    orders = _axis_orders(new_shape, order, separate_axis, separate_axis_order)
    changing = _axis_sequence(seg.shape, new_shape)
    # Nearest-neighbour commutes with one-hot encoding, so order-0 axes act on the label map directly:
    # shrinking ones before the one-hot pass (fewer voxels to interpolate), growing ones after it.
    nearest = [a for a in changing if orders[a] == 0]
    smooth = [a for a in changing if orders[a] > 0]
    out = seg
    for a in (a for a in nearest if new_shape[a] < seg.shape[a]):
        out = _resample_axis(out, a, new_shape[a], 0)
    if smooth:
        target = tuple(new_shape[a] if a in smooth else out.shape[a] for a in range(out.ndim))
        out = _onehot_argmax(out, target, orders, smooth)
    for a in (a for a in nearest if new_shape[a] > seg.shape[a]):
        out = _resample_axis(out, a, new_shape[a], 0)
    return np.ascontiguousarray(out)
