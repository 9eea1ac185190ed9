"""Image I/O with exact geometry: NIfTI (nibabel), NRRD / MHA / MHD / DICOM series (SimpleITK).

Axis conventions (the classic bug, so spelled out once):

* Every array this module returns or accepts is ordered ``(channels, z, y, x)`` (or ``(z, y, x)``), where
  x = file index i (fastest on disk), y = j, z = k. ``Geometry.shape`` and ``Geometry.spacing`` follow that
  ARRAY order, so ``spacing[0]`` is the slice distance along z.
* nibabel indexes data as ``(i, j, k[, c]) = (x, y, z[, c])``: we transpose with ``(2, 1, 0)`` (4D:
  ``(3, 2, 1, 0)``) and reverse ``header.get_zooms()[:3]``. SimpleITK's ``GetArrayFromImage`` is already
  ``(z, y, x)`` but ``GetSpacing()`` / ``GetSize()`` and ``img[i, j, k]`` are ``(x, y, z)``.
* ``Geometry.origin`` / ``Geometry.direction`` use the ITK convention: LPS world, physical ``(x, y, z)``
  order, direction row-major 3x3 whose COLUMNS are the world directions of the index axes i, j, k.
  ``Geometry.affine`` is the nibabel RAS affine mapping ``(i, j, k, 1)`` to RAS mm. They are tied by
  ``affine[:3, :3] = F @ D @ diag(spacing_xyz)`` and ``affine[:3, 3] = F @ origin`` with ``F = diag(-1, -1, 1)``;
  both are filled whichever library read the file.

Exact round trips: a NIfTI geometry keeps the original header (minus data-dependent fields) in
``Geometry.header`` so qform/sform, their codes, pixdim and xyzt_units are written back unchanged.
SimpleITK geometries are stored as float64 spacing/origin/direction, which are exactly what ITK writes.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from decathlete.errors import ImageReadError  # defined there so the command line reports it cheaply
from decathlete.io.atomic import write_atomic

SUPPORTED_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_LPS_RAS = np.diag([-1.0, -1.0, 1.0])  # ITK (LPS) <-> nibabel (RAS): flip x and y
_Floats = Sequence[float]
_DType = Any  # anything np.dtype() accepts; None where documented


def _itk_affine(spacing_xyz: _Floats, origin: _Floats, direction: _Floats) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = _LPS_RAS @ np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(spacing_xyz)
    affine[:3, 3] = _LPS_RAS @ np.asarray(origin, dtype=np.float64)
    return affine


@dataclass(frozen=True)
class Geometry:
    """The voxel grid of an image. See the module docstring for the axis conventions.

    Attributes:
        shape: spatial shape in array order (z, y, x).
        spacing: voxel size in mm, array order (z, y, x).
        origin: world position (LPS, physical x, y, z) of voxel (0, 0, 0).
        direction: 9 numbers, row-major 3x3, columns = LPS directions of index axes i, j, k.
        affine: 4x4 RAS affine mapping (i, j, k) = (x, y, z) index to RAS mm.
        source_format: "nifti" or "sitk": which library read the file.
        header: JSON-safe extras for an exact round trip (base64 NIfTI header), or None.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    affine: tuple[tuple[float, ...], ...]
    source_format: str
    header: str | None = None

    def __post_init__(self) -> None:
        # Normalise numpy scalars / lists to plain tuples so equality and JSON round trips are exact.
        for name, n in (("shape", 3), ("spacing", 3), ("origin", 3), ("direction", 9)):
            values = tuple((int if name == "shape" else float)(v) for v in np.ravel(getattr(self, name)))
            if len(values) != n:
                raise ValueError(f"Geometry.{name} needs {n} values, got {values}")
            object.__setattr__(self, name, values)
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"Geometry.affine must be 4x4, got shape {affine.shape}")
        object.__setattr__(self, "affine", tuple(map(tuple, affine.tolist())))

    @classmethod
    def from_physical(cls, shape: Sequence[int], spacing: _Floats, origin: _Floats, direction: _Floats) -> Geometry:
        """A "sitk" geometry from ITK-style values (shape and spacing in (z, y, x) order); the affine is derived."""
        return cls(shape, spacing, origin, direction, _itk_affine(tuple(spacing)[::-1], origin, direction), "sitk")

    def to_dict(self) -> dict:
        """JSON-serialisable dict (floats survive json exactly because json uses repr)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        """Inverse of `to_dict`."""
        return cls(**d)

    def same_grid(
        self,
        other: Geometry,
        spacing_tol: float = 1e-3,
        direction_tol: float = 1e-3,
        origin_tol_mm: float | None = None,
    ) -> list[str]:
        """Human-readable differences between two grids (shape, spacing, direction, origin); [] = same grid.

        Args:
            other: geometry to compare with.
            spacing_tol: relative tolerance per spacing value; direction_tol: absolute, per matrix entry.
            origin_tol_mm: absolute, per coordinate; None means spacing_tol x the smallest spacing (< 1 voxel).
        """
        diffs = []
        if self.shape != other.shape:
            diffs.append(f"shape {self.shape} != {other.shape}")
        a, b = np.array(self.spacing), np.array(other.spacing)
        if np.any(np.abs(a - b) > spacing_tol * np.maximum(np.abs(a), np.abs(b))):
            diffs.append(f"spacing {self.spacing} != {other.spacing}")
        if np.max(np.abs(np.subtract(self.direction, other.direction))) > direction_tol:
            diffs.append(f"direction {self.direction} != {other.direction}")
        tol = origin_tol_mm if origin_tol_mm is not None else spacing_tol * min(*self.spacing, *other.spacing)
        if np.max(np.abs(np.subtract(self.origin, other.origin))) > tol:
            diffs.append(f"origin {self.origin} != {other.origin} (tolerance {tol:g} mm)")
        return diffs


def image_suffix(path: str | Path) -> str:
    """The supported suffix of `path` (lower case, e.g. ".nii.gz"), "dicom" for a directory; else ValueError."""
    path = Path(path)
    if path.is_dir():
        return "dicom"
    name = path.name.lower()
    for suffix in SUPPORTED_SUFFIXES:  # ".nii.gz" is listed before ".nii" so it wins
        if name.endswith(suffix):
            return suffix
    raise ValueError(
        f"unsupported image file {str(path)!r}: expected {', '.join(SUPPORTED_SUFFIXES)} or a DICOM folder"
    )


def _nifti_geometry(img: nib.Nifti1Image, path: Path) -> tuple[Geometry, int]:
    shape = img.shape
    # (x, y, z), (x, y, z, c) or NIfTI's vector-intent layout (x, y, z, t=1, c)
    channels = {3: 1, 4: shape[-1], 5: shape[-1] if shape[3:4] == (1,) else 0}.get(len(shape), 0)
    if not channels:
        raise ImageReadError(path, f"expected a 3D or 4D (x, y, z, c) NIfTI image, got shape {shape}")
    affine = np.asarray(img.affine, dtype=np.float64)
    spacing_xyz = [float(z) for z in img.header.get_zooms()[:3]]
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    # Unit direction columns even if pixdim and sform scaling differ slightly; spacing = pixdim, as in ITK/nnU-Net.
    direction = _LPS_RAS @ affine[:3, :3] / np.where(norms > 0, norms, 1.0)
    hdr = img.header.copy()
    # Drop data-dependent fields (write_image sets them per array): an image and its label then compare equal.
    hdr.set_data_shape(shape[:3])
    hdr.set_data_dtype(np.float32)
    hdr.set_slope_inter(None, None)
    hdr["cal_min"], hdr["cal_max"], hdr["vox_offset"] = 0, 0, 0
    header = base64.b64encode(hdr.binaryblock).decode("ascii")
    origin = _LPS_RAS @ affine[:3, 3]
    return Geometry(shape[:3][::-1], spacing_xyz[::-1], origin, direction, affine, "nifti", header), int(channels)


def _sitk_geometry(src: sitk.Image | sitk.ImageFileReader, path: Path) -> tuple[Geometry, int]:
    # Works on an Image or on an ImageFileReader after ReadImageInformation (same getter names).
    dim, size = src.GetDimension(), src.GetSize()
    is_reader = isinstance(src, sitk.ImageFileReader)
    comps = src.GetNumberOfComponents() if is_reader else src.GetNumberOfComponentsPerPixel()
    if dim == 3:
        channels, direction = comps, src.GetDirection()
    elif dim == 4 and comps == 1:  # 4D scalar image: the 4th axis is the channel axis
        channels = size[3]
        direction = np.asarray(src.GetDirection()).reshape(4, 4)[:3, :3].ravel()
    else:
        raise ImageReadError(path, f"expected a 3D image (or 4D channels), got {dim}D with {comps} components")
    geometry = Geometry.from_physical(size[:3][::-1], src.GetSpacing()[:3][::-1], src.GetOrigin()[:3], direction)
    return geometry, int(channels)


def _read_sitk_image(path: Path) -> sitk.Image:
    if not path.is_dir():
        return sitk.ReadImage(str(path))
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
    if not series:
        raise ImageReadError(path, "no DICOM series found in folder")
    # Several series in one folder: take the largest (the volume rather than a localizer).
    files = max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), s) for s in series), key=len)
    return sitk.ReadImage(files)  # a list of files is read as one series


def _load(path: str | Path, header_only: bool, dtype: _DType = None) -> tuple[np.ndarray, Geometry, int]:
    """(C-contiguous (c, z, y, x) array in `dtype` (None: as stored; empty if header_only), geometry, channels)."""
    path = Path(path)
    suffix = image_suffix(path)
    if not path.exists():
        raise ImageReadError(path, "file not found")
    try:
        if suffix in _NIFTI_SUFFIXES:
            # mmap=False: a memmap view would keep the file open and alias data the caller may overwrite.
            img = nib.load(str(path), mmap=False)
            geometry, channels = _nifti_geometry(img, path)
            if header_only:
                return np.empty(0), geometry, channels
            data = np.asarray(img.dataobj)  # a fresh array; applies scl_slope / scl_inter
            data = data.reshape(data.shape[:3] + (channels,), order="F")  # 3D and (x,y,z,1,c) -> (x,y,z,c)
            # Fortran-ordered (x, y, z, c) transposed is C-ordered (c, z, y, x): no copy unless dtype changes.
            data = data.transpose(3, 2, 1, 0).astype(data.dtype if dtype is None else dtype, order="C", copy=False)
            return (data if data.flags.writeable else data.copy()), geometry, channels
        if header_only and suffix != "dicom":  # DICOM series have no cheap header path: spacing needs all slices
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            geometry, channels = _sitk_geometry(reader, path)
            return np.empty(0), geometry, channels
        img = _read_sitk_image(path)
        geometry, channels = _sitk_geometry(img, path)
        # A view of ITK's buffer (valid while `img` lives) so the conversion below is the only copy.
        view = sitk.GetArrayViewFromImage(img)  # (z, y, x); (z, y, x, c) for vector images; (c, z, y, x) for 4D
        if img.GetNumberOfComponentsPerPixel() > 1:
            view = np.moveaxis(view, -1, 0)
        elif img.GetDimension() == 3:
            view = view[None]
        data = np.array(view, dtype=view.dtype if dtype is None else dtype, order="C", copy=True)
        return data, geometry, channels
    except ImageReadError:
        raise
    except Exception as exc:  # nibabel, gzip, zlib and ITK raise many unrelated types for broken files
        raise ImageReadError(path, f"{type(exc).__name__}: {exc}") from exc


def read_geometry(path: str | Path) -> tuple[Geometry, int]:
    """(geometry, channels) from the header only (DICOM folders are read fully); errors as in `read_image`."""
    _, geometry, channels = _load(path, header_only=True)
    return geometry, channels


def read_image(paths: str | Path | Sequence[str | Path], dtype: _DType = np.float32) -> tuple[np.ndarray, Geometry]:
    """Read one (possibly multi-channel) image or several single-/multi-channel files as channels.

    Args:
        paths: one path or a sequence of paths (e.g. nnU-Net's case_0000, case_0001 ...).
        dtype: output dtype; None keeps the stored dtype (after NIfTI scaling).

    Returns:
        C-contiguous array (C, z, y, x) and the geometry of the first file.

    Raises:
        ImageReadError: a file is missing or unreadable. ValueError: unsupported suffix or differing shapes.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("read_image needs at least one path")
    if len(paths) == 1:
        data, geometry, _ = _load(paths[0], header_only=False, dtype=dtype)
        return data, geometry
    first, geometry, _ = _load(paths[0], header_only=False)
    arrays = [first]
    for p in paths[1:]:
        data, geo, _ = _load(p, header_only=False)
        if geo.shape != geometry.shape:
            raise ValueError(f"{p}: shape {geo.shape} (z, y, x) differs from {paths[0]}: {geometry.shape}")
        if diffs := geometry.same_grid(geo):
            warnings.warn(f"{p}: grid differs from {paths[0]}: {'; '.join(diffs)}", stacklevel=2)
        arrays.append(data)
    # concatenate casts straight into the output: no per-file converted copies.
    return np.concatenate(arrays, dtype=np.result_type(*arrays) if dtype is None else dtype, casting="unsafe"), geometry


def _smallest_int_dtype(lo: float, hi: float) -> np.dtype:
    # min_scalar_type(-1) = int8, (200) = uint8, and their promotion int16 fits both ends.
    return np.promote_types(np.min_scalar_type(int(lo)), np.min_scalar_type(int(hi)))


def read_label(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read a single-channel label map as an integer (z, y, x) array.

    Integer files keep their dtype; float files with integral values get the smallest fitting integer dtype.
    Raises ImageReadError for unreadable files, ValueError for several channels or non-integral values.
    """
    data, geometry, channels = _load(path, header_only=False)
    if channels != 1:
        raise ValueError(f"{path}: a label map must have one channel, found {channels}")
    data = data[0]
    if data.dtype.kind in "biu" or data.size == 0:
        return (data if data.dtype.kind in "iu" else data.astype(np.uint8)), geometry
    lo, hi = float(data.min()), float(data.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or not np.array_equal(data, np.rint(data)):
        raise ValueError(f"{path}: label values are not all integers (dtype {data.dtype}, range [{lo}, {hi}])")
    return data.astype(_smallest_int_dtype(lo, hi)), geometry


def _output_array(array: np.ndarray, dtype: _DType) -> np.ndarray:
    if dtype is None:
        # bool and float16 cannot be stored by nibabel / ITK; int64 (argmax output) wastes 8 bytes per voxel.
        dtype = {np.dtype(bool): np.uint8, np.dtype(np.float16): np.float32}.get(array.dtype, array.dtype)
        if array.dtype in (np.int64, np.uint64):
            dtype = _smallest_int_dtype(int(array.min()), int(array.max())) if array.size else np.uint8
    dtype = np.dtype(dtype)
    if dtype.kind in "iu" and array.dtype.kind == "f":
        array = np.rint(array)  # astype truncates: 0.9999 would become 0
    return array.astype(dtype, copy=False)


def _stored_nifti_header(geometry: Geometry) -> nib.Nifti1Header | None:
    """The original header, if it still describes `geometry` (a changed affine means a new grid)."""
    if geometry.source_format != "nifti" or not geometry.header:
        return None
    raw = base64.b64decode(geometry.header)
    hdr = (nib.Nifti2Header if len(raw) == 540 else nib.Nifti1Header)(raw, check=False)
    return hdr if np.allclose(hdr.get_best_affine(), geometry.affine, rtol=0, atol=1e-6) else None


def _write_nifti(arr: np.ndarray, geometry: Geometry, path: Path) -> None:
    data = arr[0].transpose(2, 1, 0) if arr.shape[0] == 1 else arr.transpose(3, 2, 1, 0)  # -> (x, y, z[, c])
    hdr = _stored_nifti_header(geometry)
    if hdr is not None:
        klass = nib.Nifti2Image if isinstance(hdr, nib.Nifti2Header) else nib.Nifti1Image
        # The header's own best affine leaves qform/sform and codes untouched (nibabel rewrites them on a change).
        img = klass(data, hdr.get_best_affine(), header=hdr, dtype=data.dtype)
        img.header.set_slope_inter(None, None)
    else:
        affine = np.asarray(geometry.affine, dtype=np.float64)
        img = nib.Nifti1Image(data, affine, dtype=data.dtype)
        # nibabel's default is sform "aligned" + qform unknown; scanner codes for both, as ITK writes, agree everywhere.
        img.header.set_qform(affine, code=1)
        img.header.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def _write_sitk(arr: np.ndarray, geometry: Geometry, path: Path) -> None:
    one = arr.shape[0] == 1
    img = sitk.GetImageFromArray(arr[0] if one else np.moveaxis(arr, 0, -1), isVector=not one)
    img.SetSpacing(geometry.spacing[::-1])
    img.SetOrigin(geometry.origin)
    img.SetDirection(geometry.direction)
    sitk.WriteImage(img, str(path), True)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a hidden temp name in the same folder, then os.replace: readers never see half a file."""
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(6)
    if path.name.lower().endswith(".mhd"):
        # .mhd names its .raw/.zraw data file inside: write under final names in a temp folder, move header last.
        tmp_dir = folder / f".tmp-{token}-{path.name}.d"
        tmp_dir.mkdir()
        try:
            write(tmp_dir / path.name)
            for f in sorted(tmp_dir.iterdir(), key=lambda p: p.name == path.name):
                os.replace(f, folder / f.name)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        return
    # Not mkstemp, whose mode 0600 would stick to the image.
    write_atomic(path, write)


def write_image(array: np.ndarray, geometry: Geometry, path: str | Path, dtype: _DType = None) -> None:
    """Write a (z, y, x) or (C, z, y, x) array on `geometry`, atomically, in the format of `path`'s suffix.

    A NIfTI geometry written to NIfTI reuses the stored header (identical affine, qform/sform, codes, pixdim,
    xyzt_units); other combinations write spacing/origin/direction (or the affine) to float precision.
    One channel is written as a 3D image; several as a 4D NIfTI (x, y, z, c) or an ITK vector image.

    Args:
        array: voxel data in array order.
        geometry: grid of the array; `geometry.shape` must equal the array's spatial shape.
        path: destination (.nii.gz, .nii, .nrrd, .mha, .mhd); missing parent folders are created.
        dtype: stored dtype; None keeps the array's, except bool -> uint8, float16 -> float32 and 64-bit
            integers -> the smallest fitting integer type. Floats cast to integers are rounded, not truncated.
    """
    path = Path(path)
    if (suffix := image_suffix(path)) == "dicom":
        raise ValueError(f"{path}: writing DICOM is not supported")
    arr = np.asarray(array)
    arr = arr[None] if arr.ndim == 3 else arr
    if arr.ndim != 4 or arr.shape[1:] != geometry.shape:
        raise ValueError(f"{path}: array shape {np.shape(array)} does not match geometry shape {geometry.shape}")
    arr = _output_array(arr, dtype)
    writer = _write_nifti if suffix in _NIFTI_SUFFIXES else _write_sitk
    _atomic_write(path, lambda tmp: writer(arr, geometry, tmp))
