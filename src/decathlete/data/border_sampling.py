"""Samplers whose windows are filled from the scan itself where they leave it, instead of padded with 0 / -1.

* ``reflect_patch`` (Rippel 2018: "in case of patch-size being larger than the whole scan, padding with reflecting
  border mode was performed"): the scan is mirrored at its borders (numpy's ``reflect``: the edge voxel is not
  repeated), as often as needed, so a window may exceed the scan several times over.
* ``size_weighted`` (van den Hork 2019): cases are drawn with probability proportional to their voxel count ("the
  volumes are given a sampling probability based on their size ... dividing the number of voxels in a scan by the
  total number of voxels in the training set"), and a scan thinner than the patch is padded with its edge values
  ("padded with the values of the edges"); ``pad_mode`` chooses ``edge``, ``reflect`` or ``constant`` (nnU-Net's 0 and
  -1 "outside").

The image and the label are filled alike, so the padding holds anatomy with its annotation rather than a constant
and the "outside" label. Everything else (window position, forced foreground) is `PatchSampler`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from decathlete.data.sampling import OpenCase, PatchSampler
from decathlete.preprocess import cache
from decathlete.registry import register_sampler

PAD_MODES = ("reflect", "edge", "constant")


def reflected_indices(start: int, size: int, n: int) -> np.ndarray:
    """Indices into an axis of ``n`` voxels for positions ``start .. start + size - 1``, mirrored at both ends
    (``reflect``: ... 2 1 | 0 1 2 ... n-1 | n-2 ...), periodic with period ``2 (n - 1)``."""
    positions = np.arange(int(start), int(start) + int(size))
    if n == 1:
        return np.zeros_like(positions)
    period = 2 * (n - 1)
    folded = np.mod(positions, period)
    return np.where(folded >= n, period - folded, folded)


def edge_indices(start: int, size: int, n: int) -> np.ndarray:
    """Indices for positions ``start .. start + size - 1`` clamped to the axis (``edge``: the border voxel repeats)."""
    return np.clip(np.arange(int(start), int(start) + int(size)), 0, n - 1)


def read_filled(array: Any, start: Sequence[int], size: Sequence[int], out: np.ndarray,
                mode: str = "reflect") -> np.ndarray:
    """``out[...] =`` the window ``start``/``size`` of the trailing axes of ``array``, filled by ``mode`` (``reflect``
    or ``edge``) where it leaves it. Only the bounding box of the voxels used is read from ``array`` (a lazy blosc2
    or memmap array decodes no more)."""
    spatial = len(start)
    shape = array.shape[array.ndim - spatial:]
    index = reflected_indices if mode == "reflect" else edge_indices
    indices = [index(s, w, n) for s, w, n in zip(start, size, shape)]
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in indices)
    block = np.asarray(array[(Ellipsis, *box)])
    out[...] = block[(Ellipsis, *np.ix_(*[i - b.start for i, b in zip(indices, box)]))]
    return out


def read_reflected(array: Any, start: Sequence[int], size: Sequence[int], out: np.ndarray) -> np.ndarray:
    """`read_filled` with ``reflect``."""
    return read_filled(array, start, size, out, "reflect")


@register_sampler("reflect_patch")
class ReflectPatchSampler(PatchSampler):
    """`PatchSampler` whose windows are mirrored at the scan's borders instead of padded (module docstring)."""

    def read_window(self, case: OpenCase, start: Sequence[int], size: Sequence[int], image_out: np.ndarray,
                    label_out: np.ndarray) -> None:
        read_filled(case.data, start, size, image_out, "reflect")
        read_filled(case.seg, start, size, label_out, "reflect")


def voxel_weights(case_dir: str | Path, case_ids: Sequence[str]) -> dict[str, float]:
    """Each cached case's voxel count (its preprocessed shape), the weights of a size-proportional draw."""
    weights = {}
    for case_id in case_ids:
        properties = cache.read_properties(Path(case_dir), case_id)
        if properties is None:
            raise ValueError(f"case {case_id!r} is not preprocessed in {case_dir}: run `decathlete preprocess` first")
        weights[case_id] = float(np.prod(properties["data_shape"][1:]))
    return weights


@register_sampler("size_weighted")
class SizeWeightedSampler(PatchSampler):
    """Cases drawn in proportion to their voxels, windows filled by ``pad_mode`` (module docstring).

    Args:
        pad_mode: ``edge`` (van den Hork), ``reflect`` or ``constant`` (0 and the -1 "outside" label, nnU-Net).
        **kwargs: `PatchSampler`'s arguments; ``case_weights`` is computed here and may not be given.
    """

    def __init__(self, case_dir: str | Path, case_ids: Sequence[str], input_size: Sequence[int],
                 spatial_dims: int = 3, slice_axis: int = 0, foreground_classes: Sequence[int] | None = None,
                 oversample_foreground: float = 0.33, probabilistic_oversampling: bool = False,
                 patch_size: Sequence[int] | None = None, max_open_cases: int = 256, ignore_label: int | None = None,
                 pad_mode: str = "edge") -> None:
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        super().__init__(case_dir, case_ids, input_size, spatial_dims, slice_axis, foreground_classes,
                         oversample_foreground, probabilistic_oversampling, patch_size, max_open_cases,
                         voxel_weights(case_dir, case_ids), ignore_label)
        self.pad_mode = pad_mode

    def read_window(self, case: OpenCase, start: Sequence[int], size: Sequence[int], image_out: np.ndarray,
                    label_out: np.ndarray) -> None:
        if self.pad_mode == "constant":
            super().read_window(case, start, size, image_out, label_out)
            return
        read_filled(case.data, start, size, image_out, self.pad_mode)
        read_filled(case.seg, start, size, label_out, self.pad_mode)
