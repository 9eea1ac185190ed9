"""Per-channel intensity normalisation schemes (registry kind ``normalizers``), a JSON spec per channel in plans.json.

Specs (one per channel, the config's ``"normalization"`` list):

* ``{"scheme": "ct", "clip": [lo, hi], "mean": m, "std": s}``: clip to the dataset-wide foreground percentiles,
  then ``(x - m) / max(s, 1e-8)`` with the dataset-wide foreground mean / std from the fingerprint (nnU-Net's
  CTNormalization), or with ``statistics="clipped"`` those of the clipped foreground voxels, measured once at
  planning (Witanto 2021's global normalisation).
* ``{"scheme": "zscore", "use_nonzero_mask": bool}``: per-image z-score; with ``use_nonzero_mask`` the statistics
  come from the nonzero mask only and voxels outside it are set to 0 (nnU-Net's ZScoreNormalization with
  ``use_mask_for_norm``, as in nnU-Net v1).
* ``{"scheme": "ct_window", "clip": [lo, hi], "mean": m, "std": s}``: a fixed window (e.g. HU [-100, 200]), then a
  z-score with the clipped training images' mean / std measured at planning (van den Hork 2019).
* ``{"scheme": "none"}``: cast to float32 only.

Precision: images reach 1.7e6 (and float32 has a 24-bit mantissa), so means and variances use float64
accumulators and the arithmetic runs in float64 on slabs of z-slices before the float32 result is stored.
Working slab by slab keeps the float64 temporaries small (``_SLAB_VOXELS``) whatever the volume size.

A scheme is a class registered with ``register_normalizer(name)`` with two static methods: ``plan(stats,
fingerprint, **kwargs) -> spec`` writes the channel's spec at planning time from its fingerprint statistics (and the
recipe's kwargs, ``planning.normalization``), and ``apply(channel (z, y, x), spec, mask) -> float32 (z, y, x)`` runs it
on a case, in training preprocessing and at inference alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from decathlete.registry import get, register_normalizer

_EPS = 1e-8
_SLAB_VOXELS = 1 << 22  # ~4 M voxels = 32 MB of float64 per temporary
MASK_CROP_FRACTION = 0.75  # z-score inside the nonzero mask when cropping keeps less than this of the median image


def _slabs(channel: np.ndarray) -> Iterator[slice]:
    """Slices along z covering ``channel`` (z, y, x) in slabs of about ``_SLAB_VOXELS`` voxels."""
    per_slice = max(1, int(np.prod(channel.shape[1:])))
    step = max(1, _SLAB_VOXELS // per_slice)
    for start in range(0, channel.shape[0], step):
        yield slice(start, min(start + step, channel.shape[0]))


def _values(channel: np.ndarray, mask: np.ndarray | None, sl: slice) -> np.ndarray:
    """float64 voxel values of one slab, restricted to the mask when given (1-D then)."""
    slab = channel[sl]
    return (slab if mask is None else slab[mask[sl]]).astype(np.float64)


def masked_mean_std(channel: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float, int]:
    """Mean and (population) standard deviation of ``channel``, inside ``mask`` when given.

    Two passes with float64 accumulators: the textbook one-pass ``E[x^2] - E[x]^2`` cancels catastrophically
    when the mean (1e6) dwarfs the spread.

    Args:
        channel: one image channel ``(z, y, x)``, any numeric dtype.
        mask: boolean ``(z, y, x)`` or None for all voxels.

    Returns:
        ``(mean, std, count)``; ``(0.0, 1.0, 0)`` when the mask is empty.
    """
    total, count = 0.0, 0
    for sl in _slabs(channel):
        values = _values(channel, mask, sl)
        total += float(values.sum())
        count += values.size
    if count == 0:
        return 0.0, 1.0, 0
    mean = total / count
    squares = 0.0
    for sl in _slabs(channel):
        values = _values(channel, mask, sl)
        values -= mean
        squares += float(np.dot(values.ravel(), values.ravel()))
    return mean, float(np.sqrt(squares / count)), count


def _affine(
    channel: np.ndarray, mean: float, std: float, clip: tuple[float, float] | None, mask: np.ndarray | None
) -> np.ndarray:
    """float32 ``(clip(x) - mean) / max(std, eps)``, slab by slab in float64; 0 outside ``mask`` when given."""
    out = np.empty(channel.shape, dtype=np.float32)
    scale = 1.0 / max(std, _EPS)
    for sl in _slabs(channel):
        slab = channel[sl].astype(np.float64)
        if clip is not None:
            np.clip(slab, clip[0], clip[1], out=slab)
        slab -= mean
        slab *= scale
        if mask is not None:
            slab[~mask[sl]] = 0.0
        out[sl] = slab
    return out


def ct_normalize(channel: np.ndarray, spec: Mapping[str, Any], mask: np.ndarray | None = None) -> np.ndarray:
    """Clip to ``spec["clip"]`` then z-score with the dataset-wide ``spec["mean"]`` / ``spec["std"]``.

    The mask is not used: CT intensities are absolute, so dataset statistics apply everywhere.
    """
    missing = [k for k in ("clip", "mean", "std") if k not in spec]
    if missing:
        raise ValueError(f"ct normalisation spec lacks {missing}: {dict(spec)}")
    lo, hi = (float(v) for v in spec["clip"])
    if lo > hi:
        raise ValueError(f"ct clip range is inverted: {spec['clip']}")
    return _affine(channel, float(spec["mean"]), float(spec["std"]), (lo, hi), None)


def zscore_normalize(channel: np.ndarray, spec: Mapping[str, Any], mask: np.ndarray | None = None) -> np.ndarray:
    """Per-image z-score; with ``spec["use_nonzero_mask"]`` the statistics come from the mask and outside is 0."""
    if spec.get("use_nonzero_mask", False):
        if mask is None:
            raise ValueError("zscore with use_nonzero_mask needs the nonzero mask")
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != channel.shape:
            raise ValueError(f"mask shape {mask.shape} differs from channel shape {channel.shape}")
    else:
        mask = None
    mean, std, _ = masked_mean_std(channel, mask)
    return _affine(channel, mean, std, None, mask)


def no_normalize(channel: np.ndarray, spec: Mapping[str, Any], mask: np.ndarray | None = None) -> np.ndarray:
    """Only cast to float32 (for inputs that are already normalised)."""
    return np.asarray(channel, dtype=np.float32)


def _training_cases(dataset: Mapping[str, Any] | None, what: str) -> list[Any]:
    """The dataset's training cases, for a scheme that measures its statistics on the images at planning."""
    from decathlete.io.datasets import load_dataset  # the planner's seam; preprocessing never needs it

    if dataset is None or "root" not in dataset:
        raise ValueError(f"{what} measures its statistics on the dataset's images: plan it from a dataset")
    cases = load_dataset(dataset["root"]).training
    if not cases:
        raise ValueError(f"no training images in {dataset.get('root')} to measure the {what} statistics on")
    return cases


def _clipped_moments(dataset: Mapping[str, Any] | None, what: str, clip: Sequence[float],
                     values_of: Callable[[Any], np.ndarray]) -> tuple[float, float]:
    """Mean and (population) std of ``values_of(case)`` clipped to ``clip``, pooled over the training cases.

    The sums run in float64 about the clip range's centre, so large intensities cause no cancellation.
    """
    lo, hi = (float(v) for v in clip)
    centre = (lo + hi) / 2
    total = total_sq = count = 0.0
    for case in _training_cases(dataset, what):
        values = np.clip(values_of(case).astype(np.float64).ravel(), lo, hi) - centre
        total, total_sq, count = total + values.sum(), total_sq + np.dot(values, values), count + values.size
    if count == 0:
        raise ValueError(f"no voxels to measure the {what} statistics on in {dataset and dataset.get('root')}")
    mean = total / count
    return centre + mean, float(np.sqrt(max(total_sq / count - mean**2, 0.0)))


def clipped_foreground_statistics(dataset: Mapping[str, Any] | None, channel: int,
                                  clip: Sequence[float]) -> tuple[float, float]:
    """Mean and std of one channel's foreground voxels (label > 0, as the fingerprint's) after clipping to ``clip``,
    pooled over every foreground voxel of every training case (a global statistic: a large organ weighs more)."""
    from decathlete.io.images import read_image, read_label

    def foreground(case: Any) -> np.ndarray:
        return read_image(case.images, dtype=None)[0][channel][read_label(case.label)[0] > 0]

    return _clipped_moments(dataset, "ct (clipped statistics)", clip, foreground)


@register_normalizer("ct")
class CTNormalization:
    """nnU-Net's CTNormalization: clip to the dataset's foreground 0.5-99.5 percentiles (or ``clip``), then z-score
    with the dataset's foreground mean and std: ``statistics="fingerprint"`` (nnU-Net) takes the fingerprint's, over
    the unclipped foreground; ``"clipped"`` (Witanto 2021: "Following the clipping, the global mean and standard
    deviation was calculated") measures those of the clipped foreground voxels on the training images at planning."""

    @staticmethod
    def plan(stats: Mapping[str, Any], fingerprint: Mapping[str, Any], clip: Sequence[float] | None = None,
             statistics: str = "fingerprint", dataset: Mapping[str, Any] | None = None) -> dict[str, Any]:
        lo, hi = clip if clip is not None else (stats["percentile_00_5"], stats["percentile_99_5"])
        if statistics == "fingerprint":
            mean, std = stats["mean"], stats["std"]
        elif statistics == "clipped":
            mean, std = clipped_foreground_statistics(dataset, int(stats.get("channel", 0)), (lo, hi))
        else:
            raise ValueError(f"ct normalisation: statistics must be 'fingerprint' or 'clipped', got '{statistics}'")
        return {"scheme": "ct", "clip": [lo, hi], "mean": mean, "std": std}

    apply = staticmethod(ct_normalize)


def window_statistics(dataset: Mapping[str, Any], channel: int, window: Sequence[float],
                      stride: int = 2) -> tuple[float, float]:
    """Mean and std of a channel's intensities clipped to ``window`` over the dataset's training images.

    Every ``stride``-th voxel along each axis is read (1/8 of them by default: the statistics of millions of voxels
    move in the fourth digit), accumulated in float64.
    """
    from decathlete.io.images import read_image

    def strided(case: Any) -> np.ndarray:
        return read_image(case.images, dtype=None)[0][channel, ::stride, ::stride, ::stride]

    return _clipped_moments(dataset, "ct_window", window, strided)


@register_normalizer("ct_window")
class CTWindowNormalization:
    """A fixed intensity window (van den Hork 2019: HU [-100, 200]), then a z-score with the mean and std of the
    clipped training images, measured once at planning and stored in the plan, so that inference applies exactly the
    training statistics. (The paper measured them on its training patches; the images' statistics are what the
    planner can measure before any patch exists.) The arithmetic is `ct_normalize`'s."""

    @staticmethod
    def plan(stats: Mapping[str, Any], fingerprint: Mapping[str, Any], window: Sequence[float] = (-100.0, 200.0),
             dataset: Mapping[str, Any] | None = None) -> dict[str, Any]:
        lo, hi = (float(v) for v in window)
        if lo >= hi:
            raise ValueError(f"ct_window needs a window (low, high) with low < high, got {list(window)}")
        mean, std = window_statistics(dataset, int(stats.get("channel", 0)), (lo, hi))
        return {"scheme": "ct_window", "clip": [lo, hi], "mean": mean, "std": std}

    apply = staticmethod(ct_normalize)


@register_normalizer("zscore")
class ZScoreNormalization:
    """Per-image z-score; inside the nonzero mask when cropping to it removed more than a quarter of the median image
    (nnU-Net's rule), unless ``use_nonzero_mask`` says otherwise."""

    @staticmethod
    def plan(stats: Mapping[str, Any], fingerprint: Mapping[str, Any],
             use_nonzero_mask: bool | None = None) -> dict[str, Any]:
        if use_nonzero_mask is None:
            use_nonzero_mask = fingerprint["median_crop_fraction"] < MASK_CROP_FRACTION
        return {"scheme": "zscore", "use_nonzero_mask": bool(use_nonzero_mask)}

    apply = staticmethod(zscore_normalize)


@register_normalizer("none")
class NoNormalization:
    """The intensities as they are (float32)."""

    @staticmethod
    def plan(stats: Mapping[str, Any], fingerprint: Mapping[str, Any]) -> dict[str, Any]:
        return {"scheme": "none"}

    apply = staticmethod(no_normalize)


def uses_nonzero_mask(specs: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any channel spec normalises inside the nonzero mask (then labels outside it are marked -1)."""
    return any(bool(spec.get("use_nonzero_mask", False)) for spec in specs)


def normalize(data: np.ndarray, specs: Sequence[Mapping[str, Any]], mask: np.ndarray | None = None) -> np.ndarray:
    """Normalise every channel of ``data`` with its spec.

    Args:
        data: image ``(C, z, y, x)``, any numeric dtype (uint8, int16, float32 ...).
        specs: one spec dict per channel (see the module docstring).
        mask: nonzero mask ``(z, y, x)``; needed only by specs with ``use_nonzero_mask``.

    Returns:
        A new float32 array ``(C, z, y, x)``.
    """
    if data.ndim != 4:
        raise ValueError(f"normalize expects (C, z, y, x), got shape {data.shape}")
    if len(specs) != data.shape[0]:
        raise ValueError(f"the image has {data.shape[0]} channel(s), the plan normalises {len(specs)}: give images "
                         f"with {len(specs)} channel(s), as in training")
    out = np.empty(data.shape, dtype=np.float32)
    for c, spec in enumerate(specs):
        name = spec.get("scheme")
        try:
            scheme = get("normalizers", str(name))
        except KeyError as err:
            raise ValueError(f"channel {c}: unknown normalisation scheme {name!r}: {err}") from None
        out[c] = scheme.apply(data[c], spec, mask)
    return out
