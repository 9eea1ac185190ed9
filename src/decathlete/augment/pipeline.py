"""The training augmentation pipeline: nnU-Net v2's transforms, batched, on the training device.

Why this is written here instead of taken from a library:

* **batchgeneratorsv2** (nnU-Net v2's augmentation) transforms one sample at a time, on the CPU, in worker
  processes. That makes the CPU the bottleneck: with 8 workers nnU-Net's loop is CPU-bound at ~0.30 s/iteration,
  and batched GPU augmentation cut it to ~0.145 s (nnU-Net issue #3063); its docs ask for 6-16 cores per GPU.
  Here every transform works on the whole (B, C, *spatial) batch in one vectorised op (one ``grid_sample`` for the
  spatial transform, grouped per-row ops for the intensity ones), wherever the batch lives, CPU or GPU.
* **MONAI** and **TorchIO** are also per-sample and CPU-oriented (dict-keyed transforms in DataLoader workers), and
  carry metadata on every tensor (MONAI needed switches to turn its MetaTensor off for speed, MONAI #4720).
* **kornia** batches on the GPU, but its 3D augmentations do not cover nnU-Net's list: no simulated low resolution,
  no gamma with retained statistics, no nearest-neighbour label resampling that keeps ``-1`` "outside" voxels.

A benchmark against batchgeneratorsv2 lives in ``benchmarks/``.

Probabilities and ranges follow ``nnUNetTrainer.get_training_transforms``, and so does the order: spatial
(rotation, scaling, optional elastic, centre crop), Gaussian noise, Gaussian blur, brightness, contrast, simulated low
resolution, inverted gamma, gamma, mirroring, except that mirroring is folded into the spatial resampling (free there).
Flips commute with every intensity transform here (exactly for the pointwise ones and the symmetric blur, in
distribution for noise and the low-resolution grid), so the result has the same distribution as nnU-Net's order.

Every random number comes from the ``torch.Generator`` passed in (CPU), so a seed reproduces a batch bit for bit on
the CPU (and on a GPU the noise fields come from a device generator seeded from it).
Arrays are (B, C, z, y, x) or (B, C, y, x); the label is (B, 1, *spatial), integer, ``-1`` marks "outside" voxels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor

from decathlete.augment import intensity
from decathlete.augment.spatial import apply_spatial, draw_spatial, required_input_size


@dataclass(frozen=True)
class AugmentConfig:
    """Every probability and range of the pipeline; defaults are nnU-Net v2's 3D ones.

    JSON-serialisable through ``dataclasses.asdict``; :meth:`from_dict` reads it back (lists become tuples), so a
    recipe can override any field. Probabilities are per sample unless named ``*_per_channel``.

    Attributes:
        p_rotation: probability of rotating a sample (one decision for all axes, as batchgeneratorsv2).
        rotation_deg: (lo, hi) angle in degrees, drawn independently for each rotated axis.
        rotation_axes: 3D only, the axes rotated about (0 = z, 1 = y, 2 = x); ``None`` = all three.
        p_scaling, scale_range: isotropic scale in nnU-Net's meaning: ``> 1`` samples a larger region, so objects
            get smaller; (0.7, 1.4) makes objects 0.71-1.43 times their size.
        p_elastic, elastic_scale, elastic_magnitude: elastic deformation (off in nnU-Net v2); smoothness sigma and
            largest displacement, both as fractions of the patch size (displacement of the half patch).
        elastic_spacing: voxel spacing (mm, per patch axis) that makes the elastic field isotropic in millimetres
            (Rippel 2018): sigma and displacement become fractions of the patch's shortest physical extent, in voxels
            ``extent / spacing`` per axis; None = fractions of each axis's own patch size (nnU-Net).
        dummy_2d: rotate/scale/deform only in (y, x) and leave z untouched (nnU-Net's do_dummy_2D_aug for
            anisotropic 3D data); simulated low resolution then also leaves z alone.
        label_pad_value: label of voxels resampled from outside the input.
        p_noise, noise_std: Gaussian noise; nnU-Net names the range a variance but uses it as the std.
        p_blur, blur_sigma, p_blur_per_channel: Gaussian blur, sigma in voxels.
        p_brightness, brightness_range: multiplicative brightness.
        p_contrast, contrast_range: contrast about the mean, clipped to the original range.
        p_lowres, lowres_zoom, p_lowres_per_channel: simulated low resolution (zoom < 1 = coarser).
        p_gamma_inverted, p_gamma, gamma_range: gamma on the inverted image, then on the image; stats retained.
        p_mirror, mirror_axes: flip probability per axis; spatial axes (0 = z in 3D); ``None`` = all.
        mask_channels: channels set back to 0 wherever the augmented label is -1 ("outside" the nonzero mask, or
            padding), last (nnU-Net's MaskImageTransform). The framework sets it from the plan: the channels
            normalised inside the nonzero mask, which are exactly 0 outside it at inference.
    """

    p_rotation: float = 0.2
    rotation_deg: tuple[float, float] = (-30.0, 30.0)
    rotation_axes: tuple[int, ...] | None = None
    p_scaling: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)
    p_elastic: float = 0.0
    elastic_scale: tuple[float, float] = (0.0, 0.2)
    elastic_magnitude: tuple[float, float] = (0.0, 0.2)
    elastic_spacing: tuple[float, ...] | None = None
    dummy_2d: bool = False
    label_pad_value: int = -1
    p_noise: float = 0.1
    noise_std: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_blur_per_channel: float = 0.5
    p_brightness: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    p_lowres: float = 0.25
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    p_lowres_per_channel: float = 0.5
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_mirror: float = 0.5
    mirror_axes: tuple[int, ...] | None = None
    mask_channels: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples stay tuples; ``json.dumps`` writes them as lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AugmentConfig:
        """Inverse of :meth:`to_dict`, accepting JSON lists for tuple fields; unknown keys raise ``TypeError``."""
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise TypeError(f"unknown augmentation settings: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def input_size(self, patch_size: Sequence[int]) -> tuple[int, ...]:
        """Input crop the sampler should hand over for ``patch_size`` (see :func:`required_input_size`)."""
        rotation = self.rotation_deg if self.p_rotation > 0 else (0.0, 0.0)
        scale = self.scale_range if self.p_scaling > 0 else (1.0, 1.0)
        magnitude = max(self.elastic_magnitude) if self.p_elastic > 0 else 0.0
        return required_input_size(
            patch_size, rotation, scale, rotation_axes=self.rotation_axes, dummy_2d=self.dummy_2d,
            elastic_magnitude=magnitude,
        )  # fmt: skip


def default_config(
    spatial_dims: int, anisotropic: bool = False, patch_size: Sequence[int] | None = None
) -> AugmentConfig:
    """nnU-Net v2's settings (``configure_rotation_dummyDA_mirroring_and_inital_patch_size``).

    Args:
        spatial_dims: 2 or 3.
        anisotropic: 3D data whose patch is much flatter along z (nnU-Net: max(patch) / patch[0] > 3); switches on
            the dummy-2D mode with in-plane rotations of +-180 degrees.
        patch_size: 2D only: a patch with aspect ratio > 1.5 gets +-15 degrees instead of +-180 (as nnU-Net).

    Returns:
        The configuration.
    """
    if spatial_dims == 2:
        elongated = patch_size is not None and max(patch_size) / min(patch_size) > 1.5
        return AugmentConfig(rotation_deg=(-15.0, 15.0) if elongated else (-180.0, 180.0))
    if spatial_dims != 3:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if anisotropic:
        return AugmentConfig(rotation_deg=(-180.0, 180.0), dummy_2d=True)
    return AugmentConfig()


def _check(image: Tensor, label: Tensor, patch_size: Sequence[int]) -> None:
    if image.ndim not in (4, 5) or image.ndim - 2 != len(patch_size):
        raise ValueError(f"image {tuple(image.shape)} must be (B, C, *spatial) matching patch_size {tuple(patch_size)}")
    if label.shape[0] != image.shape[0] or label.shape[2:] != image.shape[2:]:
        raise ValueError(f"label {tuple(label.shape)} does not match image {tuple(image.shape)}")
    if label.is_floating_point():
        raise TypeError(f"label must be an integer tensor, got {label.dtype}")


def _intensity(image: Tensor, cfg: AugmentConfig, gen: torch.Generator) -> Tensor:
    """Intensity transforms in nnU-Net's order; ``image`` is owned by the pipeline and changed in place."""
    lowres_ignore = (0,) if (cfg.dummy_2d and image.ndim == 5) else ()
    intensity.gaussian_noise(image, gen, p=cfg.p_noise, std_range=cfg.noise_std)
    intensity.gaussian_blur(image, gen, p=cfg.p_blur, sigma_range=cfg.blur_sigma, p_per_channel=cfg.p_blur_per_channel)
    intensity.brightness(image, gen, p=cfg.p_brightness, factor_range=cfg.brightness_range)
    intensity.contrast(image, gen, p=cfg.p_contrast, factor_range=cfg.contrast_range)
    intensity.simulate_low_resolution(
        image, gen, p=cfg.p_lowres, zoom_range=cfg.lowres_zoom, p_per_channel=cfg.p_lowres_per_channel,
        ignore_axes=lowres_ignore,
    )  # fmt: skip
    intensity.gamma(image, gen, p=cfg.p_gamma_inverted, gamma_range=cfg.gamma_range, invert=True)
    intensity.gamma(image, gen, p=cfg.p_gamma, gamma_range=cfg.gamma_range, invert=False)
    return image


@torch.no_grad()
def augment(
    image: Tensor, label: Tensor, patch_size: Sequence[int], config: AugmentConfig, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Augment a batch and crop it to ``patch_size`` from the centre of the (larger) input.

    Args:
        image: (B, C, z, y, x) or (B, C, y, x) float, on any device; ideally ``config.input_size(patch_size)`` big so
            rotations and scaling find real data instead of zero padding.
        label: (B, 1, *spatial) integer (int8/int16/int64...), same spatial shape; ``-1`` voxels are kept.
        patch_size: output spatial size, (z, y, x) or (y, x).
        config: probabilities and ranges.
        generator: CPU ``torch.Generator``; all randomness comes from it.

    Returns:
        (image, label) of shape (B, C, *patch_size) and (B, 1, *patch_size), new tensors with the inputs' dtypes.

    Raises:
        ValueError: shapes disagree, or the input is smaller than the patch.
        TypeError: the label is floating point.
    """
    _check(image, label, patch_size)
    draw = draw_spatial(
        generator, image.shape[0], patch_size, p_rotation=config.p_rotation, rotation_deg=config.rotation_deg,
        rotation_axes=config.rotation_axes, p_scaling=config.p_scaling, scale_range=config.scale_range,
        p_elastic=config.p_elastic, elastic_scale=config.elastic_scale, elastic_magnitude=config.elastic_magnitude,
        elastic_spacing=config.elastic_spacing,
        p_mirror=config.p_mirror, mirror_axes=config.mirror_axes, dummy_2d=config.dummy_2d,
    )  # fmt: skip
    image, label = apply_spatial(image, label, patch_size, draw, label_pad_value=config.label_pad_value)
    image = _intensity(image, config, generator)
    if config.mask_channels:
        channels = list(config.mask_channels)
        image[:, channels] = image[:, channels].masked_fill(label[:, :1] < 0, 0.0)
    return image, label


class Augmenter:
    """``augment`` bound to a configuration and a seeded generator: ``Augmenter(cfg, seed)(image, label, patch)``.

    Args:
        config: probabilities and ranges.
        seed: seed of the CPU generator; ``None`` draws one from torch's global generator.
    """

    def __init__(self, config: AugmentConfig, seed: int | None = None) -> None:
        self.config = config
        self.generator = torch.Generator()
        self.generator.manual_seed(int(torch.randint(0, 2**62, (1,))) if seed is None else seed)

    def __call__(self, image: Tensor, label: Tensor, patch_size: Sequence[int]) -> tuple[Tensor, Tensor]:
        return augment(image, label, patch_size, self.config, self.generator)

    def input_size(self, patch_size: Sequence[int]) -> tuple[int, ...]:
        """Input crop for ``patch_size`` under this configuration."""
        return self.config.input_size(patch_size)


__all__ = ["AugmentConfig", "Augmenter", "augment", "default_config"]
