"""A synthetic abdominal CT for the memory benchmark: int16 Hounsfield units, several organs, MSD layout.

    python _synthetic_ct.py ROOT --train-cases 4 --train-shape 40 192 192 --test-shape 300 512 512

writes ``ROOT/Task99_SyntheticCT`` (``imagesTr``/``labelsTr``/``dataset.json`` with ``modality`` CT, labels 1-5 =
liver, spleen, left kidney, right kidney, spine; an empty ``imagesTs`` as nnU-Net's MSD converter wants) and
``ROOT/test/ct.nii.gz``; every volume at spacing 2.5 x 0.8 x 0.8 mm (z, y, x).
Organs are ellipsoids placed in proportion to the body (air -1000 HU outside, fat/soft tissue inside, bone 700 HU),
with Gaussian noise; each organ is painted inside its bounding box only, so a 300x512x512 volume needs a few
hundred MB, not a float grid per organ.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

SPACING = (2.5, 0.8, 0.8)  # (z, y, x) mm
RAW_NAME = "Task99_SyntheticCT"  # nnU-Net's MSD converter reads "Task<ID>_<name>" from the folder name
# name: (label, HU, centre as a fraction of the extent (z, y, x), radii as a fraction of the extent)
ORGANS = {"liver": (1, 60, (0.45, 0.45, 0.32), (0.22, 0.16, 0.15)),
          "spleen": (2, 50, (0.45, 0.45, 0.72), (0.12, 0.08, 0.06)),
          "kidney_left": (3, 35, (0.60, 0.60, 0.66), (0.10, 0.05, 0.04)),
          "kidney_right": (4, 35, (0.62, 0.60, 0.34), (0.10, 0.05, 0.04)),
          "spine": (5, 700, (0.50, 0.70, 0.50), (0.60, 0.04, 0.03))}


def _paint(image: np.ndarray, label: np.ndarray, centre: np.ndarray, radii: np.ndarray, value: int,
           hu: float) -> None:
    lo = np.maximum(np.floor(centre - radii).astype(int), 0)
    hi = np.minimum(np.ceil(centre + radii).astype(int) + 1, image.shape)
    axes = [(np.arange(a, b, dtype=np.float32) - c) / r for a, b, c, r in zip(lo, hi, centre, radii)]
    inside = (axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2) <= 1.0
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    image[box][inside] = hu
    label[box][inside] = value


def synthetic_ct(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image int16 HU, label uint8), arrays (z, y, x)."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    yy = (np.arange(y, dtype=np.float32) - y / 2) / (0.38 * y)
    xx = (np.arange(x, dtype=np.float32) - x / 2) / (0.46 * x)
    body = (yy[:, None] ** 2 + xx[None, :] ** 2) <= 1.0
    image = np.full(shape, -1000.0, np.float32)
    image[:, body] = -80.0  # fat
    label = np.zeros(shape, np.uint8)
    extent = np.array(shape, np.float32)
    for value, hu, centre, radii in ORGANS.values():
        jitter = rng.uniform(-0.03, 0.03, 3)
        _paint(image, label, (np.array(centre) + jitter) * extent, np.array(radii) * extent, value, hu)
    image += rng.standard_normal(shape, dtype=np.float32) * 15.0
    return np.clip(image, -1024, 3071).astype(np.int16), label


def _save(array: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(array.transpose(2, 1, 0), np.diag([*SPACING[::-1], 1.0])), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--train-cases", type=int, default=4)
    parser.add_argument("--train-shape", type=int, nargs=3, default=(40, 192, 192))
    parser.add_argument("--test-shape", type=int, nargs=3, default=(300, 512, 512))
    args = parser.parse_args()
    raw = args.root / RAW_NAME
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(args.train_cases):
        image, label = synthetic_ct(tuple(args.train_shape), seed=i)
        name = f"ct_{i:03d}.nii.gz"
        _save(image, raw / "imagesTr" / name)
        _save(label, raw / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    labels = {"0": "background", **{str(v[0]): name for name, v in ORGANS.items()}}
    (raw / "dataset.json").write_text(json.dumps({
        "name": "SyntheticCT", "modality": {"0": "CT"}, "labels": labels, "numTraining": len(training),
        "numTest": 0, "training": training, "test": []}, indent=2))
    (args.root / "test").mkdir(parents=True, exist_ok=True)
    image, _ = synthetic_ct(tuple(args.test_shape), seed=1000)
    _save(image, args.root / "test" / "ct.nii.gz")


if __name__ == "__main__":
    main()
