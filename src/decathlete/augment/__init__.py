"""Batched data augmentation on torch tensors, on the training device (CPU or GPU).

``augment(image, label, patch_size, config, generator)`` runs nnU-Net v2's augmentation list on a whole batch;
``AugmentConfig`` holds every probability and range, ``default_config`` gives nnU-Net's settings and
``required_input_size`` tells the sampler how large a crop to hand over. Axes are (B, C, z, y, x) or (B, C, y, x).
"""

from __future__ import annotations

from decathlete.augment.pipeline import AugmentConfig, Augmenter, augment, default_config
from decathlete.augment.spatial import SpatialDraw, apply_spatial, draw_spatial, required_input_size

__all__ = [
    "AugmentConfig",
    "Augmenter",
    "SpatialDraw",
    "apply_spatial",
    "augment",
    "default_config",
    "draw_spatial",
    "required_input_size",
]
