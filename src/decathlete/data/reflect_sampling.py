"""Sampler ``reflect_patch``: random windows whose parts outside the scan are filled by mirroring it (Rippel 2018:
"in case of patch-size being larger than the whole scan, padding with reflecting border mode was performed").

The image and the label are mirrored alike, so the padding holds anatomy with its annotation rather than a constant
and the "outside" label. Mirroring is numpy's ``reflect`` mode (the edge voxel is not repeated) and repeats as often
as needed, so a window may exceed the scan several times over (a 40-voxel axis in a 128-voxel patch). Everything
else (case choice, window position, forced foreground) is `PatchSampler`'s; Rippel's recipe forces none
(``oversample_foreground=0``: "patches were always randomly sampled from the whole scan").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from decathlete.data.sampling import OpenCase, PatchSampler
from decathlete.registry import register_sampler


def reflected_indices(start: int, size: int, n: int) -> np.ndarray:
    """Indices into an axis of ``n`` voxels for positions ``start .. start + size - 1``, mirrored at both ends
    (``reflect``: ... 2 1 | 0 1 2 ... n-1 | n-2 ...), periodic with period ``2 (n - 1)``."""
    positions = np.arange(int(start), int(start) + int(size))
    if n == 1:
        return np.zeros_like(positions)
    period = 2 * (n - 1)
    folded = np.mod(positions, period)
    return np.where(folded >= n, period - folded, folded)


def read_reflected(array: object, start: Sequence[int], size: Sequence[int], out: np.ndarray) -> np.ndarray:
    """``out[...] =`` the window ``start``/``size`` of the trailing axes of ``array``, mirrored where it leaves it.

    Only the bounding box of the voxels used is read from ``array`` (a lazy blosc2 or memmap array decodes no more).
    """
    spatial = len(start)
    shape = array.shape[array.ndim - spatial:]
    indices = [reflected_indices(s, w, n) for s, w, n in zip(start, size, shape)]
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in indices)
    block = np.asarray(array[(Ellipsis, *box)])
    local = np.ix_(*[i - b.start for i, b in zip(indices, box)])
    out[...] = block[(Ellipsis, *local)]
    return out


@register_sampler("reflect_patch")
class ReflectPatchSampler(PatchSampler):
    """`PatchSampler` whose windows are mirrored at the scan's borders instead of padded (module docstring)."""

    def read_window(self, case: OpenCase, start: Sequence[int], size: Sequence[int], image_out: np.ndarray,
                    label_out: np.ndarray) -> None:
        read_reflected(case.data, start, size, image_out)
        read_reflected(case.seg, start, size, label_out)
