"""Tiny synthetic raw datasets for tests (MSD and nnU-Net v2 layouts), written with nibabel.

Arrays are given in the framework's (z, y, x) order (channels first: (C, z, y, x)); NIfTI stores (x, y, z[, c]),
so :func:`write_nifti` transposes. Images are noise plus a per-label offset, so a network can learn them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np


def nifti_affine(
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: np.ndarray | None = None,
) -> np.ndarray:
    """NIfTI (RAS) affine for a (z, y, x) ``spacing``; ``origin`` (x, y, z) and ``direction`` (3x3) are RAS too."""
    sz, sy, sx = (float(s) for s in spacing)
    rot = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([sx, sy, sz])
    affine[:3, 3] = origin
    return affine


def write_nifti(
    path: str | Path,
    array: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    affine: np.ndarray | None = None,
    dtype: Any = None,
) -> Path:
    """Write a (z, y, x) or (C, z, y, x) array (C > 1 -> a 4D MSD-style file) as NIfTI; 2D/5D arrays pass as is."""
    arr = np.asarray(array if dtype is None else np.asarray(array).astype(dtype))
    if arr.ndim == 4:
        data = arr.transpose(3, 2, 1, 0)  # (C, z, y, x) -> (x, y, z, C)
    elif arr.ndim == 3:
        data = arr.transpose(2, 1, 0)
    else:
        data = arr  # deliberately odd dimensionality (2D, 5D) for validation tests
    aff = nifti_affine(spacing, origin) if affine is None else affine
    img = nib.Nifti1Image(data, aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def make_case(
    rng: np.random.Generator,
    shape: Sequence[int] = (8, 10, 12),
    channels: int = 1,
    label_values: Sequence[int] = (0, 1, 2),
) -> tuple[np.ndarray, np.ndarray]:
    """Random (C, z, y, x) float32 image and (z, y, x) uint8 label with every value of ``label_values`` present."""
    shape = tuple(int(s) for s in shape)
    label = np.zeros(shape, dtype=np.uint8)
    fg = [v for v in label_values if v != 0]
    z = max(shape[0] // max(len(fg), 1), 1)
    for i, v in enumerate(fg):
        # One box per foreground value, in its own z band, jittered in-plane; always non-empty.
        y0 = int(rng.integers(0, max(shape[1] // 2, 1)))
        x0 = int(rng.integers(0, max(shape[2] // 2, 1)))
        label[min(i * z, shape[0] - 1) : min(i * z, shape[0] - 1) + max(z, 1), y0 : y0 + max(shape[1] // 3, 1),
              x0 : x0 + max(shape[2] // 3, 1)] = v  # fmt: skip
    image = rng.normal(0.0, 1.0, size=(channels, *shape)).astype(np.float32)
    image += (label.astype(np.float32) * 2.0)[None] * (1.0 + np.arange(channels, dtype=np.float32))[:, None, None, None]
    return image, label


def make_msd_dataset(
    root: str | Path,
    n_cases: int = 3,
    channels: int = 1,
    shape: Sequence[int] = (8, 10, 12),
    spacing: Sequence[float] = (2.0, 1.0, 1.0),
    labels: Sequence[str] = ("background", "a", "b"),
    n_test: int = 0,
    modality: Sequence[str] | None = None,
    name: str = "Synthetic",
    seed: int = 0,
    image_dtype: Any = np.float32,
    label_dtype: Any = np.uint8,
) -> Path:
    """Write an MSD-layout dataset (one 3D file, or one 4D file when ``channels`` > 1, per case) and return its root.

    Cases are ``case_000`` ...; test cases ``test_000`` ... in imagesTs. Label ``i`` is named ``labels[i]``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    modality = list(modality) if modality is not None else [f"MOD{i}" for i in range(channels)]
    training, test = [], []
    for i in range(n_cases + n_test):
        image, label = make_case(rng, shape, channels, range(len(labels)))
        cid = f"case_{i:03d}" if i < n_cases else f"test_{i - n_cases:03d}"
        folder = "imagesTr" if i < n_cases else "imagesTs"
        write_nifti(root / folder / f"{cid}.nii.gz", image if channels > 1 else image[0], spacing, dtype=image_dtype)
        if i < n_cases:
            write_nifti(root / "labelsTr" / f"{cid}.nii.gz", label, spacing, dtype=label_dtype)
            training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
        else:
            test.append(f"./imagesTs/{cid}.nii.gz")
    meta = {
        "name": name,
        "tensorImageSize": "4D" if channels > 1 else "3D",
        "modality": {str(i): m for i, m in enumerate(modality)},
        "labels": {str(i): n for i, n in enumerate(labels)},
        "numTraining": n_cases,
        "numTest": n_test,
        "training": training,
        "test": test,
    }
    write_json(root / "dataset.json", meta)
    return root


def make_nnunet_dataset(
    root: str | Path,
    n_cases: int = 3,
    channels: int = 2,
    shape: Sequence[int] = (8, 10, 12),
    spacing: Sequence[float] = (2.0, 1.0, 1.0),
    labels: dict[str, int | list[int]] | None = None,
    regions_class_order: Sequence[int] | None = None,
    n_test: int = 0,
    channel_names: Sequence[str] | None = None,
    file_ending: str = ".nii.gz",
    seed: int = 0,
) -> Path:
    """Write an nnU-Net v2 raw dataset (``imagesTr/<case>_000X``, ``labelsTr/<case>``) and return its root.

    ``labels`` defaults to {"background": 0, "a": 1, "b": 2}; pass lists (regions) plus ``regions_class_order``
    for a region-based dataset. The label files hold every integer value used by ``labels``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    labels = dict(labels) if labels is not None else {"background": 0, "a": 1, "b": 2}
    values = sorted({int(x) for v in labels.values() for x in (v if isinstance(v, list) else [v])})
    names = list(channel_names) if channel_names is not None else [f"MOD{i}" for i in range(channels)]
    for i in range(n_cases + n_test):
        image, label = make_case(rng, shape, channels, values)
        cid = f"case_{i:03d}" if i < n_cases else f"test_{i - n_cases:03d}"
        folder = "imagesTr" if i < n_cases else "imagesTs"
        for c in range(channels):
            write_nifti(root / folder / f"{cid}_{c:04d}{file_ending}", image[c], spacing)
        if i < n_cases:
            write_nifti(root / "labelsTr" / f"{cid}{file_ending}", label, spacing)
    meta: dict[str, Any] = {
        "channel_names": {str(i): n for i, n in enumerate(names)},
        "labels": labels,
        "numTraining": n_cases,
        "file_ending": file_ending,
    }
    if regions_class_order is not None:
        meta["regions_class_order"] = list(regions_class_order)
    write_json(root / "dataset.json", meta)
    return root


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
    return path


def edit_dataset_json(root: str | Path, **changes: Any) -> dict[str, Any]:
    """Update top-level keys of ``root/dataset.json`` (a value of None deletes the key); returns the new content."""
    path = Path(root) / "dataset.json"
    meta = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    write_json(path, meta)
    return meta


def snapshot(root: str | Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime_ns) of everything under ``root`` (symlinks not followed), to detect writes."""
    root = Path(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, n))
            out[os.path.relpath(os.path.join(dirpath, n), root)] = (st.st_size, st.st_mtime_ns)
    return out


def write_dicom_series(folder: str | Path, volume: np.ndarray, spacing: Sequence[float],
                       origin: Sequence[float] = (0.0, 0.0, 0.0)) -> Path:
    """Write a (z, y, x) int16 volume as an axial DICOM series, one file per slice (``spacing`` in z, y, x)."""
    import SimpleITK as sitk

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(volume)
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    img.SetOrigin(tuple(float(o) for o in origin))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # as in SimpleITK's DicomSeriesFromArray example
    common = [("0008|0060", "CT"), ("0020|000e", "1.2.826.0.1.3680043.2.1125.1"),
              ("0020|000d", "1.2.826.0.1.3680043.2.1125.2"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
              ("0028|0030", f"{spacing[1]}\\{spacing[2]}"), ("0018|0050", str(spacing[0]))]
    for z in range(volume.shape[0]):
        sl = img[:, :, z]
        for tag, value in common:
            sl.SetMetaData(tag, value)
        sl.SetMetaData("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, z)))))
        sl.SetMetaData("0020|0013", str(z))
        sl.SetMetaData("0008|0018", f"1.2.826.0.1.3680043.2.1125.3.{z}")
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(sl)
    return folder



def tiny_workdir(root: Path, n_cases: int, shape: tuple[int, int, int] = (16, 40, 40)) -> Path:
    """``root/work``: a generated dataset (`decathlete.synthetic`) planned with the ``tiny`` recipe for 3d_fullres
    and preprocessed."""
    from decathlete import api
    from decathlete.synthetic import make_synthetic_dataset

    raw = make_synthetic_dataset(root / "raw", n_cases=n_cases, shape=shape)
    api.plan(raw, root / "work", recipe="tiny", workers=1, progress=False, configurations=["3d_fullres"])
    api.preprocess(root / "work", ["3d_fullres"], workers=1, progress=False)
    return root / "work"
