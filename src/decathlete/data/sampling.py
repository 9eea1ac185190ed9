"""Foreground-aware patch sampling from the preprocessed cache (nnU-Net v2's ``nnUNetDataLoader`` semantics).

A batch of ``B`` crops of ``input_size`` (the final patch plus the augmentation margin, see
`decathlete.augment.AugmentConfig.input_size`) is read from cases chosen uniformly at random:

* the last ``round(B * oversample_foreground)`` samples (nnU-Net: ``not i < round(B * (1 - p))``), or each sample
  with probability ``p`` when ``probabilistic_oversampling``, are *forced*: a class present in the case is drawn
  uniformly, then one of its stored locations (`decathlete.preprocess.cache`), and the window is centred on it,
  shifted back into the range of random windows near a border (nnU-Net clips only the lower side; clipping both
  keeps the voxel inside the final patch while reading less padding); a case without foreground gets a random one;
* the others take a uniformly random window position. Windows may leave the volume by half the margin on each
  side (nnU-Net's ``need_to_pad``), so that after the augmentation's centre crop every voxel can land in the final
  patch; a case smaller than the window is centred in it.

Outside the volume images read 0 and labels -1 ("outside": ignored by losses and augmentation).

For a cascade stage (``previous_stage``: the folder of its previous stage's label maps on this cache's grid,
`decathlete.data.cascade`) the label gets a second channel, the previous stage's labels in the same window, so the
augmentation moves both together; `decathlete.data.cascade.previous_stage_channels` turns it into input channels.

2D configurations first draw a slice along ``slice_axis`` (for forced samples: a slice holding the drawn class,
uniformly among such slices, as nnU-Net's 2D loader), then a window in that slice.

All randomness comes from the ``numpy.random.Generator`` passed to `PatchSampler.sample_batch`, so a batch is a
pure function of the generator's state (`decathlete.data.loader` seeds one generator per batch for exact resume).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from decathlete.data.cascade import open_previous_stage
from decathlete.preprocess import cache
from decathlete.registry import register_sampler


def crop_with_padding(
    array: Any, start: Sequence[int], size: Sequence[int], pad_value: float, out: np.ndarray | None = None
) -> np.ndarray:
    """Read a window of ``size`` at ``start`` from the trailing axes of ``array``, padding what lies outside.

    Only the in-bounds part is sliced from ``array`` (a ``np.memmap`` or ``blosc2.NDArray`` decodes just that), so
    windows larger than the array or beyond its border cost no more than their overlap with it.

    Args:
        array: array-like ``(*lead, *spatial)`` that returns numpy arrays when sliced; leading axes (channels) are
            read whole.
        start: window start per spatial axis, in array axis order (e.g. z, y, x); may be negative or beyond the end.
        size: window size per spatial axis, same order.
        pad_value: value of voxels outside ``array`` (0 for images, -1 for labels).
        out: optional destination of shape ``(*lead, *size)``; filled and returned (saves a copy when batching).

    Returns:
        ``(*lead, *size)`` array with ``array``'s dtype (or ``out``'s).
    """
    spatial = len(start)
    if len(size) != spatial:
        raise ValueError(f"start {tuple(start)} and size {tuple(size)} must have the same length")
    lead = tuple(array.shape[: array.ndim - spatial])
    shape = array.shape[array.ndim - spatial :]
    if out is None:
        out = np.empty((*lead, *size), dtype=array.dtype)
    elif out.shape != (*lead, *size):
        raise ValueError(f"out has shape {out.shape}, expected {(*lead, *size)}")
    lo = [min(max(int(s), 0), n) for s, n in zip(start, shape)]
    hi = [min(max(int(s) + int(w), 0), n) for s, w, n in zip(start, size, shape)]
    if any(h <= lo_ for lo_, h in zip(lo, hi)):  # no overlap: nothing to read
        out[...] = pad_value
        return out
    dst = tuple(slice(a - int(s), b - int(s)) for a, b, s in zip(lo, hi, start))
    if any(d.start > 0 or d.stop < w for d, w in zip(dst, size)):  # only fill the margin when there is one
        out[...] = pad_value
    out[(Ellipsis, *dst)] = array[(Ellipsis, *(slice(a, b) for a, b in zip(lo, hi)))]
    return out


@dataclass
class OpenCase:
    """A case open for sampling: lazy image and label arrays, foreground locations, shape."""

    data: Any  # (C, z, y, x) lazy array
    seg: Any  # (z, y, x) lazy array
    locations: dict[int, np.ndarray]  # label -> (N, 3) int32 (z, y, x)
    shape: tuple[int, int, int]
    previous: Any = None  # (z, y, x) the previous stage's labels, for a cascade stage


def rank_oversample_fraction(fraction: float, global_batch: int, world_size: int, rank: int) -> float:
    """This rank's share of forced-foreground samples so that the *global* batch has nnU-Net's share.

    nnU-Net forces the last ``round(B * (1 - fraction))``-onward samples of a batch; under DDP it splits the global
    batch over ranks (the first ``B % world`` ranks take one more sample) and gives each rank the fraction of its
    own samples that lie in the forced tail of the global batch (``nnUNetTrainer._set_batch_size_and_oversample``):
    0 for a rank wholly before it, 1 for a rank wholly inside it. Per-rank fractions instead would force nothing in
    a global batch of 2 on 2 ranks (``round(1 * 0.67) = 1`` unforced sample each).
    """
    if world_size <= 1:
        return fraction
    sizes = [global_batch // world_size + (1 if r < global_batch % world_size else 0) for r in range(world_size)]
    low, high = sum(sizes[:rank]) / global_batch, sum(sizes[:rank + 1]) / global_batch
    if high < 1 - fraction:
        return 0.0
    if low > 1 - fraction:
        return 1.0
    return 1 - ((1 - fraction) - low) / (high - low)


@register_sampler("patch")
class PatchSampler:
    """Draws batches of training crops from preprocessed cases (see the module docstring for the rules).

    Picklable at any time: open case handles live in a per-process cache that is dropped when pickled or forked, so
    one sampler can be handed to DataLoader workers started with "fork", "forkserver" or "spawn".

    The sampler protocol (registry kind ``samplers``): built with the keyword arguments below (the trainer passes
    ``case_dir``, ``case_ids``, ``input_size``, ``patch_size``, ``spatial_dims`` and ``slice_axis``; a recipe's
    ``sampler`` kwargs add the rest), it answers ``sample_batch(batch_size, rng)``. A subclass changes one decision by
    overriding `choose_case` (which case a sample comes from) or `force_foreground`.

    Args:
        case_dir: configuration folder of the preprocessed cache.
        case_ids: training cases (labelled).
        input_size: crop size handed to augmentation, (z, y, x) for 3D, (h, w) for 2D (the axes left after removing
            ``slice_axis``, in order).
        spatial_dims: 3, or 2 for slice-wise configurations.
        slice_axis: 2D only: axis of the (z, y, x) volume that is sliced (plans' ``resampling["slice_axis"]``).
        foreground_classes: labels forced samples may target; None = every label with stored locations.
        oversample_foreground: fraction of forced samples (nnU-Net: 0.33).
        probabilistic_oversampling: force each sample with that probability instead of the last ones of a batch.
        patch_size: final patch, same axes as ``input_size``; the margin ``input_size - patch_size`` sets how far
            random windows may leave the volume. None = no margin (windows stay inside volumes larger than them).
        case_weights: relative probability of each case id being drawn (ids not named weigh 1); None = uniform.
        max_open_cases: open case handles kept per process (each blosc2 file holds a descriptor); least recently
            used ones are closed beyond that.
        ignore_label: the dataset's ignore label (unannotated voxels), never targeted; the framework passes it.
        previous_stage: a cascade stage's folder of previous-stage label maps (`decathlete.data.cascade`); the
            label then has a second channel holding them. The framework passes it for a cascade configuration.

    Raises:
        ValueError: inconsistent sizes or dimensions, or no cases.
    """

    def __init__(
        self,
        case_dir: str | Path,
        case_ids: Sequence[str],
        input_size: Sequence[int],
        spatial_dims: int = 3,
        slice_axis: int = 0,
        foreground_classes: Sequence[int] | None = None,
        oversample_foreground: float = 0.33,
        probabilistic_oversampling: bool = False,
        patch_size: Sequence[int] | None = None,
        max_open_cases: int = 256,
        case_weights: dict[str, float] | None = None,
        ignore_label: int | None = None,
        previous_stage: str | Path | None = None,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(input_size) != spatial_dims:
            raise ValueError(f"input_size {tuple(input_size)} must have {spatial_dims} axes")
        patch = tuple(input_size) if patch_size is None else tuple(int(p) for p in patch_size)
        if len(patch) != spatial_dims or any(p > s for p, s in zip(patch, input_size)):
            raise ValueError(f"patch_size {patch} must have {spatial_dims} axes, each <= input_size")
        if not case_ids:
            raise ValueError("no cases to sample from")
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis}")
        self.case_dir = Path(case_dir)
        self.case_ids = list(case_ids)
        self.input_size = tuple(int(s) for s in input_size)
        self.margin = tuple(s - p for s, p in zip(self.input_size, patch))
        self.spatial_dims = spatial_dims
        self.slice_axis = slice_axis
        self.foreground_classes = None if foreground_classes is None else [int(c) for c in foreground_classes]
        self.ignore_label = ignore_label
        self.previous_stage = None if previous_stage is None else Path(previous_stage)
        self.oversample_foreground = float(oversample_foreground)
        self.probabilistic_oversampling = probabilistic_oversampling
        self.max_open_cases = max(1, int(max_open_cases))
        self.case_probabilities = None
        if case_weights is not None:
            weights = np.array([float(case_weights.get(c, 1.0)) for c in self.case_ids])
            if (weights < 0).any() or weights.sum() <= 0:
                raise ValueError(f"case_weights must be non-negative and not all 0, got {case_weights}")
            self.case_probabilities = weights / weights.sum()
        self._open: OrderedDict[str, OpenCase] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        # blosc2 handles cannot be pickled, and a forked copy must not share them: reopen lazily.
        return {**self.__dict__, "_open": OrderedDict(), "_pid": None}

    def _case(self, case_id: str) -> OpenCase:
        if self._pid != os.getpid():  # forked (or unpickled) into another process
            self._open, self._pid = OrderedDict(), os.getpid()
        case = self._open.get(case_id)
        if case is not None:
            self._open.move_to_end(case_id)
            return case
        data, seg, _, locations = cache.open_case(self.case_dir, case_id, mmap=True)
        if seg is None:
            raise ValueError(f"case {case_id!r} in {self.case_dir} has no labels; training cases need them")
        previous = None if self.previous_stage is None else open_previous_stage(self.previous_stage, case_id)
        if previous is not None and previous.shape != seg.shape:
            raise ValueError(f"the previous stage's labels of {case_id!r} have shape {previous.shape}, its cached "
                             f"labels {seg.shape}: preprocess again, or run the previous stage's crossval again")
        case = OpenCase(data, seg, locations, tuple(int(n) for n in seg.shape), previous)
        self._open[case_id] = case
        if len(self._open) > self.max_open_cases:
            self._open.popitem(last=False)
        return case

    def choose_case(self, rng: np.random.Generator) -> str:
        """The case the next sample is cut from: uniformly random, as nnU-Net, or by ``case_weights``."""
        if self.case_probabilities is not None:
            return self.case_ids[int(rng.choice(len(self.case_ids), p=self.case_probabilities))]
        return self.case_ids[int(rng.integers(len(self.case_ids)))]

    def case_properties(self, case_id: str) -> dict[str, Any] | None:
        """The cached case's properties (shapes, voxels per label ...; `decathlete.preprocess.pipeline`), or None."""
        return cache.read_properties(self.case_dir, case_id)

    def force_foreground(self, sample_index: int, batch_size: int, rng: np.random.Generator) -> bool:
        """Whether sample ``sample_index`` of a batch must contain foreground (nnU-Net's ``get_do_oversample``)."""
        if self.probabilistic_oversampling:
            return bool(rng.uniform() < self.oversample_foreground)
        return not sample_index < round(batch_size * (1 - self.oversample_foreground))

    def _bounds(self, shape: Sequence[int]) -> tuple[list[int], list[int]]:
        """Lowest and highest window start per axis: the final (centre-cropped) patch reaches every voxel."""
        lbs, ubs = [], []
        for n, size, margin in zip(shape, self.input_size, self.margin):
            pad = max(margin, size - n)  # a small case is centred: both bounds meet
            lbs.append(-(pad // 2))  # augmentation crops at offset margin // 2
            ubs.append(n - size + pad - pad // 2)
        return lbs, ubs

    def _centred(self, voxel: Sequence[int], lbs: Sequence[int], ubs: Sequence[int]) -> list[int]:
        """Window start centring ``voxel`` (nnU-Net v2), kept within the bounds: the voxel stays in the final patch."""
        return [int(np.clip(v - s // 2, lo, hi)) for v, s, lo, hi in zip(voxel, self.input_size, lbs, ubs)]

    def _eligible(self, locations: dict[int, np.ndarray]) -> list[int]:
        wanted = sorted(locations) if self.foreground_classes is None else self.foreground_classes
        # The ignore label has stored locations like any value > 0, but it is no class (nnU-Net never targets it).
        return [c for c in wanted if c in locations and len(locations[c]) > 0 and c != self.ignore_label]

    def _window(
        self, case: OpenCase, forced: bool, rng: np.random.Generator
    ) -> tuple[list[int], int | None, int | None]:
        """Window start in the (z, y, x) volume (size 1 on the slice axis in 2D), drawn class, drawn slice."""
        classes = self._eligible(case.locations) if forced else []
        cls = int(classes[rng.integers(len(classes))]) if classes else None  # no foreground: random window
        if self.spatial_dims == 3:
            lbs, ubs = self._bounds(case.shape)
            if cls is None:
                return [int(rng.integers(lo, hi + 1)) for lo, hi in zip(lbs, ubs)], None, None
            voxel = case.locations[cls][rng.integers(len(case.locations[cls]))]
            return self._centred(voxel, lbs, ubs), cls, None
        axis = self.slice_axis
        plane = [n for a, n in enumerate(case.shape) if a != axis]
        lbs, ubs = self._bounds(plane)
        if cls is None:
            index = int(rng.integers(case.shape[axis]))
            start = [int(rng.integers(lo, hi + 1)) for lo, hi in zip(lbs, ubs)]
        else:
            locs = case.locations[cls]
            index = int(rng.choice(np.unique(locs[:, axis])))
            in_slice = locs[locs[:, axis] == index]
            voxel = np.delete(in_slice[rng.integers(len(in_slice))], axis)
            start = self._centred(voxel, lbs, ubs)
        start.insert(axis, index)
        return start, cls, index

    def read_window(self, case: OpenCase, start: Sequence[int], size: Sequence[int], image_out: np.ndarray,
                    label_out: np.ndarray) -> None:
        """Read the window ``start``/``size`` (z, y, x) of a case into the batch (no per-sample temporaries): the image
        reads 0 and the label -1 outside the volume. A subclass pads otherwise (``reflect_patch``)."""
        crop_with_padding(case.data, start, size, 0.0, out=image_out)
        crop_with_padding(case.seg, start, size, -1, out=label_out)

    def sample_batch(
        self, batch_size: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """Draw one batch.

        Args:
            batch_size: samples ``B``.
            rng: the only source of randomness; the same state gives the same batch.

        Returns:
            ``(image, label, meta)``: image float32 ``(B, C, *input_size)``, label int16 ``(B, 1, *input_size)`` with
            -1 outside the volume (``(B, 2, ...)`` for a cascade stage, the previous stage's labels second), and per
            sample ``{"case_id", "start", "forced", "class", "slice"}`` where ``start`` is the window's (z, y, x)
            corner in the case (may be negative), ``forced`` whether foreground was requested, ``class`` the
            targeted label (None when not forced or the case has no foreground) and ``slice`` the index along
            ``slice_axis`` (2D only, else None).
        """
        image = label = None
        meta: list[dict[str, Any]] = []
        size3 = list(self.input_size)
        if self.spatial_dims == 2:
            size3.insert(self.slice_axis, 1)
        for i in range(batch_size):
            case_id = self.choose_case(rng)
            case = self._case(case_id)
            forced = self.force_foreground(i, batch_size, rng)
            start, cls, index = self._window(case, forced, rng)
            if image is None:  # channel count known only once a case is open
                image = np.empty((batch_size, case.data.shape[0], *self.input_size), dtype=np.float32)
                label = np.empty((batch_size, 1 + (case.previous is not None), *self.input_size), dtype=np.int16)
            if case.data.shape[0] != image.shape[1]:
                raise ValueError(f"case {case_id!r} has {case.data.shape[0]} channels, expected {image.shape[1]}")
            img_out, seg_out = image[i], label[i, 0]
            if self.spatial_dims == 2:  # views with the singleton slice axis the 3D read produces
                img_out = np.expand_dims(img_out, 1 + self.slice_axis)
                seg_out = np.expand_dims(seg_out, self.slice_axis)
            self.read_window(case, start, size3, img_out, seg_out)
            if case.previous is not None:
                previous_out = label[i, 1] if self.spatial_dims == 3 else np.expand_dims(label[i, 1], self.slice_axis)
                crop_with_padding(case.previous, start, size3, -1, out=previous_out)
            meta.append({"case_id": case_id, "start": start, "forced": forced, "class": cls, "slice": index})
        if image is None:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        return image, label, meta
