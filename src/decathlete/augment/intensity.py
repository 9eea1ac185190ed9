"""Batched intensity augmentations on (B, C, *spatial) tensors, nnU-Net v2's list and ranges.

Every transform draws its random parameters for the whole batch from one CPU ``torch.Generator`` (a fixed number of
draws per call, whatever the outcome, so a seed reproduces a run), then changes only the rows (sample, channel) it
selected, in one vectorised op per batch. Large random fields (noise) come from a generator on the image's device
seeded from the CPU generator, so a CUDA batch never waits on CPU random numbers.

Granularity follows nnU-Net v2 (``nnUNetTrainer.get_training_transforms`` with batchgeneratorsv2):

* the probability ``p`` decides per *sample*;
* the parameters are drawn per *channel* (``synchronize_channels=False``), except Gaussian noise, where nnU-Net uses
  one standard deviation and one noise field for all channels of a sample (``synchronize_channels=True``);
* blur and simulated low resolution additionally pick each channel with ``p_per_channel`` (0.5 in nnU-Net).

All functions change ``image`` in place and return it: the pipeline calls them on a tensor it owns.
Spatial axes are (z, y, x) for 3D and (y, x) for 2D.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

RowFn = Callable[[Tensor, Tensor], Tensor]


def uniform(
    generator: torch.Generator, shape: Sequence[int], lo: float, hi: float, dtype: torch.dtype = torch.float32
) -> Tensor:
    """U(lo, hi) samples of ``shape`` on the CPU."""
    return lo + (hi - lo) * torch.rand(tuple(shape), generator=generator, dtype=dtype)


def bg_uniform(generator: torch.Generator, shape: Sequence[int], lo: float, hi: float) -> Tensor:
    """nnU-Net's ``BGContrast`` draw: with probability 0.5 U(lo, 1), otherwise U(max(lo, 1), hi).

    Half of the factors shrink and half enlarge, whatever the asymmetry of (lo, hi) around 1.
    """
    below = (torch.rand(tuple(shape), generator=generator) < 0.5) & (lo < 1)
    u = torch.rand(tuple(shape), generator=generator)
    lo_up = max(lo, 1.0)
    return torch.where(below, lo + u * (1.0 - lo), lo_up + u * (hi - lo_up))


def select_rows(generator: torch.Generator, batch: int, channels: int, p: float, p_per_channel: float = 1.0) -> Tensor:
    """Which (sample, channel) rows a transform touches: sample chosen with ``p``, then channel with ``p_per_channel``.

    Returns:
        Bool tensor (B * C,) on the CPU, row ``b * C + c``.
    """
    sample = torch.rand(batch, generator=generator) < p
    channel = torch.rand(batch, channels, generator=generator) < p_per_channel
    return (sample[:, None] & channel).reshape(-1)


def device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from ``generator``: deterministic, and no CPU-to-GPU copy of random fields."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def _per_row(values: Tensor, x: Tensor) -> Tensor:
    """Reshape per-row values (R,) to broadcast against rows (R, *spatial) on x's device and dtype."""
    return values.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.ndim - 1)))


def apply_to_rows(image: Tensor, rows: Tensor, fn: RowFn) -> Tensor:
    """Replace the selected rows of ``image`` (B, C, *spatial) by ``fn(rows_data, row_ids)``.

    Args:
        image: contiguous (B, C, *spatial) tensor, changed in place.
        rows: bool (B * C,) CPU mask from :func:`select_rows`.
        fn: gets the selected rows (R, *spatial) and their CPU indices (R,) to pick per-row parameters.
    """
    ids = rows.nonzero().squeeze(1)
    if ids.numel() == 0:
        return image
    flat = image.view(-1, *image.shape[2:])
    dev_ids = ids.to(image.device)
    flat[dev_ids] = fn(flat[dev_ids], ids)
    return image


def _kernel_size(sigma: float) -> int:
    # +-3 sigma, as batchgeneratorsv2 (truncate=6 is the full width there).
    return 2 * math.ceil(3.0 * sigma) + 1


def _smooth_axis(x: Tensor, sigma: Tensor, axis: int, pad_mode: str) -> Tensor:
    """1D Gaussian along spatial ``axis`` of rows (R, *spatial), one sigma per row, as a sum of shifted slices.

    A depthwise convolution with a per-row kernel; k shifted multiply-adds beat grouped conv3d on CPU and are
    memory-bound on GPU either way.
    """
    sigma = sigma.clamp_min(1e-3)
    k = _kernel_size(float(sigma.max()))
    if k == 1:
        return x
    offsets = torch.arange(k, dtype=torch.float32) - k // 2
    weights = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    weights = (weights / weights.sum(1, keepdim=True)).to(device=x.device, dtype=x.dtype)
    dim = 1 + axis
    length = x.shape[dim]
    pad = [0] * (2 * (x.ndim - 1))
    pad[2 * (x.ndim - 1 - dim)] = pad[2 * (x.ndim - 1 - dim) + 1] = k // 2
    mode = pad_mode if (pad_mode != "reflect" or k // 2 < length) else "replicate"
    padded = F.pad(x[None], pad, mode=mode)[0]
    shape = (-1,) + (1,) * (x.ndim - 1)
    out = padded.narrow(dim, 0, length) * weights[:, 0].view(shape)
    for t in range(1, k):
        out.addcmul_(padded.narrow(dim, t, length), weights[:, t].view(shape))  # fused: no full-size temporary
    return out


def gaussian_smooth(rows: Tensor, sigmas: Tensor, pad_mode: str = "reflect") -> Tensor:
    """Separable Gaussian smoothing of rows (R, *spatial) with per-row, per-axis sigmas.

    Args:
        rows: (R, *spatial) float tensor, spatial (z, y, x) or (y, x).
        sigmas: (R, n_spatial) CPU tensor, in voxels, in the same axis order.
        pad_mode: border handling, ``"reflect"`` (nnU-Net's blur; falls back to replicate on tiny axes) or
            ``"replicate"``.

    Returns:
        Smoothed tensor of the same shape.
    """
    for axis in range(rows.ndim - 1):
        rows = _smooth_axis(rows, sigmas[:, axis], axis, pad_mode)
    return rows


def gaussian_noise(image: Tensor, generator: torch.Generator, *, p: float, std_range: tuple[float, float]) -> Tensor:
    """Additive Gaussian noise, per sample, one std and one noise field shared by all channels (as nnU-Net).

    nnU-Net calls the range ``noise_variance`` but passes the draw to ``np.random.normal`` as the *standard
    deviation*; we do the same and name it for what it is.
    """
    batch = image.shape[0]
    apply = torch.rand(batch, generator=generator) < p
    std = uniform(generator, (batch,), *std_range)
    dev_gen = device_generator(generator, image.device)
    ids = apply.nonzero().squeeze(1)
    if ids.numel() == 0:
        return image
    noise = torch.randn((ids.numel(), 1, *image.shape[2:]), generator=dev_gen, device=image.device, dtype=image.dtype)
    dev_ids = ids.to(image.device)
    image[dev_ids] += noise * _per_row(std[ids], noise)
    return image


def gaussian_blur(
    image: Tensor, generator: torch.Generator, *, p: float, sigma_range: tuple[float, float], p_per_channel: float
) -> Tensor:
    """Gaussian blur, sigma drawn per channel *and per axis* (nnU-Net: ``synchronize_axes=False``), reflect border."""
    batch, channels = image.shape[:2]
    rows = select_rows(generator, batch, channels, p, p_per_channel)
    sigmas = uniform(generator, (batch * channels, image.ndim - 2), *sigma_range)
    return apply_to_rows(image, rows, lambda x, ids: gaussian_smooth(x, sigmas[ids]))


def brightness(image: Tensor, generator: torch.Generator, *, p: float, factor_range: tuple[float, float]) -> Tensor:
    """Multiplicative brightness, one factor per channel (nnU-Net's BGContrast draw)."""
    batch, channels = image.shape[:2]
    rows = select_rows(generator, batch, channels, p)
    factors = bg_uniform(generator, (batch * channels,), *factor_range)
    return apply_to_rows(image, rows, lambda x, ids: x * _per_row(factors[ids], x))


def contrast(
    image: Tensor,
    generator: torch.Generator,
    *,
    p: float,
    factor_range: tuple[float, float],
    preserve_range: bool = True,
) -> Tensor:
    """Contrast about the channel mean, one factor per channel; ``preserve_range`` clips to the original min/max."""
    batch, channels = image.shape[:2]
    rows = select_rows(generator, batch, channels, p)
    factors = bg_uniform(generator, (batch * channels,), *factor_range)

    def fn(x: Tensor, ids: Tensor) -> Tensor:
        shape = (-1,) + (1,) * (x.ndim - 1)
        mean = x.flatten(1).mean(1).view(shape)
        low, high = (v.view(shape) for v in torch.aminmax(x.flatten(1), dim=1))
        x = x.sub_(mean).mul_(_per_row(factors[ids], x)).add_(mean)  # x is a copy of the selected rows
        return torch.maximum(torch.minimum(x, high), low) if preserve_range else x

    return apply_to_rows(image, rows, fn)


def simulate_low_resolution(
    image: Tensor,
    generator: torch.Generator,
    *,
    p: float,
    zoom_range: tuple[float, float],
    p_per_channel: float,
    ignore_axes: Sequence[int] = (),
) -> Tensor:
    """Simulated low resolution: one zoom per channel for all axes (nnU-Net: ``synchronize_axes=True``).

    Args:
        ignore_axes: spatial axes left at full resolution (z in the dummy-2D mode, as nnU-Net).
    """
    batch, channels = image.shape[:2]
    rows = select_rows(generator, batch, channels, p, p_per_channel)
    zooms = uniform(generator, (batch * channels,), *zoom_range)

    def fn(x: Tensor, ids: Tensor) -> Tensor:
        # One interpolate pair per selected row: the low-res shape differs per row (batchgeneratorsv2 loops too).
        # A vectorised two-tap gather along each axis gave the same result but ran 5x slower on the CPU.
        size = x.shape[1:]
        mode = ("linear", "bilinear", "trilinear")[x.ndim - 2]
        out = torch.empty_like(x)
        for r in range(x.shape[0]):
            zoom = float(zooms[ids[r]])
            low = [n if a in ignore_axes else max(1, round(n * zoom)) for a, n in enumerate(size)]
            small = F.interpolate(x[r][None, None], size=low, mode="nearest-exact")
            out[r] = F.interpolate(small, size=size, mode=mode)[0, 0]
        return out

    return apply_to_rows(image, rows, fn)


def gamma(
    image: Tensor,
    generator: torch.Generator,
    *,
    p: float,
    gamma_range: tuple[float, float],
    invert: bool = False,
    retain_stats: bool = True,
) -> Tensor:
    """Gamma per channel: rescale to [0, 1], power, rescale back, then restore the mean and std (nnU-Net).

    With ``invert`` the channel is negated before and after, which applies the gamma curve to the other tail.
    """
    batch, channels = image.shape[:2]
    rows = select_rows(generator, batch, channels, p)
    gammas = bg_uniform(generator, (batch * channels,), *gamma_range)

    def fn(x: Tensor, ids: Tensor) -> Tensor:
        # x is a copy of the selected rows, so in-place ops are safe and spare full-size temporaries.
        shape = (-1,) + (1,) * (x.ndim - 1)
        if invert:
            x.neg_()
        std, mean = torch.std_mean(x.flatten(1), dim=1)
        low, high = torch.aminmax(x.flatten(1), dim=1)
        low, spread = low.view(shape), (high - low).view(shape)
        x.sub_(low).div_(spread.clamp_min(1e-7)).pow_(_per_row(gammas[ids], x)).mul_(spread).add_(low)
        if retain_stats:
            std_now, mean_now = torch.std_mean(x.flatten(1), dim=1)
            x.sub_(mean_now.view(shape)).mul_((std / std_now.clamp_min(1e-7)).view(shape)).add_(mean.view(shape))
        return x.neg_() if invert else x

    return apply_to_rows(image, rows, fn)
