"""Augmentation presets (registry kind ``augmentations``): a configuration's base `AugmentConfig`, before a recipe's
overrides, and the crop size the sampler must hand over for it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from decathlete.augment.pipeline import AugmentConfig, default_config
from decathlete.augment.spatial import required_input_size
from decathlete.registry import register_augmentation

if TYPE_CHECKING:
    from decathlete.planning.plans import Configuration

# nnU-Net sizes the sampled crop for scales within (0.85, 1.25), not the full scaling range: rarer, stronger zooms
# pull in a little padding (label -1 -> 0) instead of every crop being read much larger.
MARGIN_SCALE_RANGE = (0.85, 1.25)


@register_augmentation("nnunet")
def nnunet(configuration: Configuration) -> AugmentConfig:
    """nnU-Net v2's settings for the configuration: dummy-2D with +-180 degrees for flat 3D patches (the largest
    axis more than 3x the first), +-15 degrees for elongated 2D patches, the 3D defaults otherwise."""
    patch = configuration.patch_size
    anisotropic = configuration.spatial_dims == 3 and max(patch) / patch[0] > 3
    return default_config(configuration.spatial_dims, anisotropic, patch)


@register_augmentation("none")
def no_augmentation(configuration: Configuration) -> AugmentConfig:
    """Every transform off: the crop is the patch."""
    names = [f for f in AugmentConfig.__dataclass_fields__ if f.startswith("p_") and not f.endswith("_per_channel")]
    return AugmentConfig(**{name: 0.0 for name in names})


def sampling_size(config: AugmentConfig, patch_size: Sequence[int]) -> tuple[int, ...]:
    """The crop the sampler reads so that the spatial transforms of ``config`` find data for ``patch_size``."""
    rotation = config.rotation_deg if config.p_rotation > 0 else (0.0, 0.0)
    scale = MARGIN_SCALE_RANGE if config.p_scaling > 0 else (1.0, 1.0)
    magnitude = max(config.elastic_magnitude) if config.p_elastic > 0 else 0.0
    return tuple(required_input_size(patch_size, rotation, scale, rotation_axes=config.rotation_axes,
                                     dummy_2d=config.dummy_2d, elastic_magnitude=magnitude))
