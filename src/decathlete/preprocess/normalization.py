"""Per-channel intensity normalisation schemes, chosen by a JSON spec per channel (as stored in plans.json).

Specs (one per channel, the config's ``"normalization"`` list):

* ``{"scheme": "ct", "clip": [lo, hi], "mean": m, "std": s}``: clip to the dataset-wide foreground percentiles,
  then ``(x - m) / max(s, 1e-8)`` with the dataset-wide foreground mean / std from the fingerprint (nnU-Net's
  CTNormalization).
* ``{"scheme": "zscore", "use_nonzero_mask": bool}``: per-image z-score; with ``use_nonzero_mask`` the statistics
  come from the nonzero mask only and voxels outside it are set to 0 (nnU-Net's ZScoreNormalization with
  ``use_mask_for_norm``, as in nnU-Net v1).
* ``{"scheme": "none"}``: cast to float32 only.

Precision: images reach 1.7e6 (and float32 has a 24-bit mantissa), so means and variances use float64
accumulators and the arithmetic runs in float64 on slabs of z-slices before the float32 result is stored.
Working slab by slab keeps the float64 temporaries small (``_SLAB_VOXELS``) whatever the volume size.

New schemes register with `register_scheme`; a scheme is ``fn(channel (z, y, x), spec, mask) -> float32 (z, y, x)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

Scheme = Callable[[np.ndarray, Mapping[str, Any], "np.ndarray | None"], np.ndarray]

SCHEMES: dict[str, Scheme] = {}

_EPS = 1e-8
_SLAB_VOXELS = 1 << 22  # ~4 M voxels = 32 MB of float64 per temporary


def register_scheme(name: str) -> Callable[[Scheme], Scheme]:
    """Decorator registering a normalisation function under ``name`` (the spec's ``"scheme"``)."""

    def decorator(fn: Scheme) -> Scheme:
        SCHEMES[name] = fn
        return fn

    return decorator


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


@register_scheme("ct")
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


@register_scheme("zscore")
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


@register_scheme("none")
def no_normalize(channel: np.ndarray, spec: Mapping[str, Any], mask: np.ndarray | None = None) -> np.ndarray:
    """Only cast to float32 (for inputs that are already normalised)."""
    return np.asarray(channel, dtype=np.float32)


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
        raise ValueError(f"{len(specs)} normalisation specs for {data.shape[0]} channels")
    out = np.empty(data.shape, dtype=np.float32)
    for c, spec in enumerate(specs):
        name = spec.get("scheme")
        if name not in SCHEMES:
            raise ValueError(f"channel {c}: unknown normalisation scheme {name!r}; known: {sorted(SCHEMES)}")
        out[c] = SCHEMES[name](data[c], spec, mask)
    return out
