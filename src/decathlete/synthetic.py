"""A built-in synthetic dataset (MSD layout) for the demo and the tests: no download, deterministic under a seed.

Each case is an MR-like volume: a body ellipsoid (zero outside, so cropping to the nonzero region matters), an
"organ" ellipsoid (label 1) and a small "lesion" sphere inside it (label 2) with its own contrast, a smooth
multiplicative bias field and Gaussian noise. Spacing is anisotropic (thick slices) and varies a little between
cases, so resampling and the anisotropy rules are exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

DEFAULT_SHAPE = (20, 64, 64)  # (z, y, x)
DEFAULT_SPACING = (3.0, 1.2, 1.2)  # (z, y, x) mm


def _ellipsoid(grid: tuple[np.ndarray, ...], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def synthetic_case(rng: np.random.Generator, shape: tuple[int, int, int] = DEFAULT_SHAPE,
                   spacing: tuple[float, float, float] = DEFAULT_SPACING) -> tuple[np.ndarray, np.ndarray]:
    """One (image, label) pair, arrays (z, y, x); coordinates in mm so shapes are round in physical space."""
    grid = tuple(np.arange(n, dtype=np.float32)[tuple(slice(None) if a == i else None for a in range(3))] * s
                 for i, (n, s) in enumerate(zip(shape, spacing)))
    extent = np.array(shape) * np.array(spacing)
    body = _ellipsoid(grid, extent / 2, extent * rng.uniform(0.42, 0.48, 3))
    organ_centre = extent / 2 + rng.uniform(-0.1, 0.1, 3) * extent
    organ_radii = extent * rng.uniform(0.16, 0.24, 3) * np.array([1.4, 1.0, 1.0])
    organ = _ellipsoid(grid, organ_centre, organ_radii) & body
    lesion_centre = organ_centre + rng.uniform(-0.35, 0.35, 3) * organ_radii
    lesion = _ellipsoid(grid, lesion_centre, np.full(3, rng.uniform(0.55, 0.75) * organ_radii.min())) & organ
    label = np.zeros(shape, np.uint8)
    label[organ] = 1
    label[lesion] = 2
    image = np.where(body, 100.0, 0.0) + 60.0 * organ + rng.choice([-70.0, 80.0]) * lesion
    bias = np.exp(0.25 * sum(rng.uniform(-1, 1) * (g / e - 0.5) for g, e in zip(grid, extent)))
    image = image * bias + rng.normal(0.0, 12.0, shape) * body
    return image.astype(np.float32), label


def make_synthetic_dataset(root: str | Path, n_cases: int = 24, seed: int = 0,
                           shape: tuple[int, int, int] = DEFAULT_SHAPE,
                           spacing: tuple[float, float, float] = DEFAULT_SPACING) -> Path:
    """Write ``n_cases`` labelled cases plus dataset.json in the MSD layout under ``root``; returns ``root``."""
    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    training = []
    for i in range(n_cases):
        case_spacing = (spacing[0] * rng.uniform(0.85, 1.15), *spacing[1:])
        image, label = synthetic_case(rng, shape, case_spacing)
        affine = np.diag([*case_spacing[::-1], 1.0])  # nibabel axes are (x, y, z): reverse the array order
        name = f"synth_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image.transpose(2, 1, 0), affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label.transpose(2, 1, 0), affine), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {"name": "SyntheticOrgans", "description": "decathlete built-in synthetic dataset",
            "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "organ", "2": "lesion"},
            "numTraining": n_cases, "numTest": 0, "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root
