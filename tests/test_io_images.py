"""Tests for decathlete.io.images: axis order, exact geometry round trips, channels, labels, atomic writes."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from decathlete.io.images import (
    Geometry,
    ImageReadError,
    image_suffix,
    read_geometry,
    read_image,
    read_label,
    write_image,
)
from synthetic import write_dicom_series

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SPACING_XYZ = (0.7, 0.8, 5.0)  # (z, y, x) = (5.0, 0.8, 0.7): anisotropic, every axis different


def _rotation(deg: float, axis: str) -> np.ndarray:
    c, s = np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))
    mats = {
        "z": [[c, -s, 0], [s, c, 0], [0, 0, 1]],
        "x": [[1, 0, 0], [0, c, -s], [0, s, c]],
    }
    return np.array(mats[axis], dtype=np.float64)


def _oblique_affine() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = _rotation(20, "z") @ _rotation(-7, "x") @ np.diag(SPACING_XYZ)
    affine[:3, 3] = [12.5, -30.25, 7.0]
    return affine


def _volume(dtype=np.int16, shape_zyx=(4, 6, 8)) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 1000, shape_zyx).astype(dtype)


def _write_nifti(path: Path, data_zyx: np.ndarray, affine: np.ndarray, codes: tuple[int, int] = (1, 1)) -> None:
    img = nib.Nifti1Image(data_zyx.transpose(2, 1, 0) if data_zyx.ndim == 3 else data_zyx, affine)
    img.header.set_qform(affine, code=codes[0])
    img.header.set_sform(affine, code=codes[1])
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def _sitk_oblique(data_zyx: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(data_zyx)
    img.SetSpacing(SPACING_XYZ)
    img.SetOrigin((-12.5, 30.25, 7.0))
    img.SetDirection(tuple((_rotation(25, "x") @ _rotation(-10, "z")).ravel()))
    return img


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("codes", [(1, 1), (0, 2), (1, 0)])
def test_nifti_round_trip_is_exact(tmp_path: Path, suffix: str, codes: tuple[int, int]) -> None:
    src, dst = tmp_path / f"in{suffix}", tmp_path / f"out{suffix}"
    _write_nifti(src, _volume(), _oblique_affine(), codes)
    arr, geo = read_image(src, dtype=None)
    assert arr.dtype == np.int16 and arr.shape == (1, 4, 6, 8)
    write_image(arr, geo, dst)
    arr2, geo2 = read_image(dst, dtype=None)
    np.testing.assert_array_equal(arr, arr2)
    assert geo2 == geo
    h1, h2 = nib.load(src).header, nib.load(dst).header
    for key in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "srow_x", "srow_y", "srow_z"):
        assert np.array_equal(h1[key], h2[key]), key
    assert np.array_equal(h1["pixdim"][:4], h2["pixdim"][:4]) and h1["xyzt_units"] == h2["xyzt_units"]
    assert np.array_equal(nib.load(src).affine, nib.load(dst).affine)
    assert geo.spacing == tuple(float(np.float32(v)) for v in SPACING_XYZ[::-1])


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_sitk_round_trip_is_exact(tmp_path: Path, suffix: str) -> None:
    img = _sitk_oblique(_volume())
    sitk.WriteImage(img, str(tmp_path / f"in{suffix}"))
    arr, geo = read_image(tmp_path / f"in{suffix}", dtype=None)
    assert geo.source_format == "sitk" and geo.header is None
    assert geo.shape == (4, 6, 8) and geo.origin == img.GetOrigin()
    np.testing.assert_allclose(geo.spacing, SPACING_XYZ[::-1], rtol=1e-14)  # NRRD: see the note below
    np.testing.assert_allclose(geo.direction, img.GetDirection(), atol=1e-14)
    (tmp_path / "out").mkdir()
    write_image(arr, geo, tmp_path / "out" / f"out{suffix}")
    arr2, geo2 = read_image(tmp_path / "out" / f"out{suffix}", dtype=None)
    np.testing.assert_array_equal(arr, arr2)
    assert arr2.dtype == np.int16
    if suffix == ".nrrd":
        # NRRD stores spacing*direction ("space directions"); ITK splits it with a norm, which can move the last bit.
        np.testing.assert_allclose(geo2.spacing, geo.spacing, rtol=1e-14)
        np.testing.assert_allclose(geo2.direction, geo.direction, atol=1e-14)
        assert geo2.origin == geo.origin and geo2.shape == geo.shape
    else:
        assert geo2 == geo
    assert _no_temp_files(tmp_path / "out")


def test_spacing_and_index_order_in_both_libraries(tmp_path: Path) -> None:
    arr = np.zeros((4, 6, 8), np.int16)
    arr[1, 2, 3] = 7  # z=1, y=2, x=3
    geo = Geometry.from_physical((4, 6, 8), (3.0, 0.75, 0.5), (0.0, 0.0, 0.0), np.eye(3).ravel())
    for name in ("a.nii.gz", "a.mha"):
        write_image(arr, geo, tmp_path / name)
        g, channels = read_geometry(tmp_path / name)
        assert (g.shape, g.spacing, channels) == ((4, 6, 8), (3.0, 0.75, 0.5), 1)
        back, _ = read_image(tmp_path / name)
        assert back[0, 1, 2, 3] == 7 and back.sum() == 7
    nib_data = np.asarray(nib.load(tmp_path / "a.nii.gz").dataobj)
    assert nib_data.shape == (8, 6, 4) and nib_data[3, 2, 1] == 7
    assert nib.load(tmp_path / "a.nii.gz").header.get_zooms() == (0.5, 0.75, 3.0)
    for name in ("a.nii.gz", "a.mha"):
        img = sitk.ReadImage(str(tmp_path / name))
        assert img.GetSize() == (8, 6, 4) and img.GetSpacing() == (0.5, 0.75, 3.0) and img[3, 2, 1] == 7


@pytest.mark.parametrize("codes", [(1, 1), (0, 2)])
def test_nibabel_geometry_matches_sitk_on_same_file(tmp_path: Path, codes: tuple[int, int]) -> None:
    path = tmp_path / "oblique.nii.gz"
    _write_nifti(path, _volume(), _oblique_affine(), codes)
    geo, _ = read_geometry(path)
    img = sitk.ReadImage(str(path))
    np.testing.assert_allclose(geo.spacing, img.GetSpacing()[::-1], rtol=1e-7)
    np.testing.assert_allclose(geo.origin, img.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(geo.direction, img.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(read_image(path, dtype=None)[0][0], sitk.GetArrayFromImage(img))
    # Both representations are filled and consistent: affine = diag(-1,-1,1) @ D @ diag(spacing_xyz), origin flipped.
    flip = np.diag([-1.0, -1.0, 1.0])
    d = np.reshape(geo.direction, (3, 3))
    np.testing.assert_allclose(np.array(geo.affine)[:3, :3], flip @ d @ np.diag(geo.spacing[::-1]), atol=1e-6)
    np.testing.assert_allclose(np.array(geo.affine)[:3, 3], flip @ np.array(geo.origin), atol=1e-9)


def test_cross_format_preserves_physical_geometry(tmp_path: Path) -> None:
    _write_nifti(tmp_path / "in.nii.gz", _volume(), _oblique_affine())
    arr, geo = read_image(tmp_path / "in.nii.gz")
    for suffix in (".mha", ".nrrd"):
        write_image(arr, geo, tmp_path / f"out{suffix}")
        arr2, geo2 = read_image(tmp_path / f"out{suffix}")
        np.testing.assert_array_equal(arr, arr2)
        assert geo2.same_grid(geo, spacing_tol=1e-9, direction_tol=1e-9, origin_tol_mm=1e-9) == []
    # ...and back: an ITK geometry written as NIfTI (float32 storage) stays within float32 precision.
    _, sgeo = read_image(tmp_path / "out.mha")
    write_image(arr, sgeo, tmp_path / "back.nii.gz")
    _, geo3 = read_image(tmp_path / "back.nii.gz")
    assert geo3.same_grid(geo, spacing_tol=1e-6, direction_tol=1e-6, origin_tol_mm=1e-5) == []
    hdr = nib.load(tmp_path / "back.nii.gz").header
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (1, 1)
    itk = sitk.ReadImage(str(tmp_path / "back.nii.gz"))
    np.testing.assert_allclose(itk.GetDirection(), sgeo.direction, atol=1e-6)


def test_geometry_dict_and_same_grid() -> None:
    geo = Geometry.from_physical((4, 6, 8), (3.0, 0.75, 0.5), (1.5, -2.0, 3.25), _rotation(20, "z").ravel())
    assert Geometry.from_dict(json.loads(json.dumps(geo.to_dict()))) == geo
    assert geo.same_grid(geo) == []
    moved = Geometry.from_physical((4, 6, 9), (3.0, 0.75, 0.6), (1.5, -2.0, 4.25), np.eye(3).ravel())
    diffs = moved.same_grid(geo)
    assert [d.split()[0] for d in diffs] == ["shape", "spacing", "direction", "origin"]


def test_four_d_nifti_and_multi_file_channels(tmp_path: Path) -> None:
    data = np.random.default_rng(1).normal(size=(8, 6, 4, 3)).astype(np.float32)  # (x, y, z, c)
    _write_nifti(tmp_path / "4d.nii.gz", data, _oblique_affine())
    assert read_geometry(tmp_path / "4d.nii.gz")[1] == 3
    arr, geo = read_image(tmp_path / "4d.nii.gz")
    assert arr.shape == (3, 4, 6, 8) and geo.shape == (4, 6, 8) and arr.flags.c_contiguous
    np.testing.assert_array_equal(arr, data.transpose(3, 2, 1, 0))
    write_image(arr, geo, tmp_path / "4d_out.nii.gz")
    assert nib.load(tmp_path / "4d_out.nii.gz").shape == (8, 6, 4, 3)
    write_image(arr, geo, tmp_path / "vec.mha")  # channels -> ITK vector image and back
    np.testing.assert_array_equal(read_image(tmp_path / "vec.mha")[0], arr)

    for c in range(3):
        _write_nifti(tmp_path / f"case_{c:04d}.nii.gz", arr[c], _oblique_affine())
    stacked, geo_s = read_image([tmp_path / f"case_{c:04d}.nii.gz" for c in range(3)])
    np.testing.assert_array_equal(stacked, arr)
    assert stacked.dtype == np.float32 and geo_s.same_grid(geo) == []

    _write_nifti(tmp_path / "other_0001.nii.gz", arr[0, :, :, :-1], _oblique_affine())
    with pytest.raises(ValueError, match="shape"):
        read_image([tmp_path / "case_0000.nii.gz", tmp_path / "other_0001.nii.gz"])


def test_dicom_series(tmp_path: Path) -> None:
    vol = _volume(np.int16, (5, 6, 8))
    write_dicom_series(tmp_path, vol, (3.0, 0.75, 0.5), (-10.0, 20.0, 30.0))
    arr, geo = read_image(tmp_path, dtype=None)
    assert image_suffix(tmp_path) == "dicom"
    assert arr.shape == (1, 5, 6, 8) and geo.shape == (5, 6, 8)
    np.testing.assert_array_equal(arr[0], vol)
    np.testing.assert_allclose(geo.spacing, (3.0, 0.75, 0.5))
    np.testing.assert_allclose(geo.origin, (-10.0, 20.0, 30.0))
    assert read_geometry(tmp_path)[0] == geo
    with pytest.raises(ValueError, match="DICOM"):
        write_image(arr, geo, tmp_path)


def test_labels(tmp_path: Path) -> None:
    lab = np.random.default_rng(2).integers(0, 4, (4, 6, 8))
    _write_nifti(tmp_path / "f.nii.gz", lab.astype(np.float32), _oblique_affine())
    out, geo = read_label(tmp_path / "f.nii.gz")
    assert out.dtype == np.uint8 and out.shape == geo.shape == (4, 6, 8)
    np.testing.assert_array_equal(out, lab)
    _write_nifti(tmp_path / "neg.nii.gz", (lab - 300).astype(np.float32), _oblique_affine())
    assert read_label(tmp_path / "neg.nii.gz")[0].dtype == np.int16
    sitk.WriteImage(sitk.GetImageFromArray(lab.astype(np.int32)), str(tmp_path / "i.nrrd"))
    assert read_label(tmp_path / "i.nrrd")[0].dtype == np.int32  # integer files keep their dtype
    _write_nifti(tmp_path / "bad.nii.gz", lab.astype(np.float32) + 0.5, _oblique_affine())
    with pytest.raises(ValueError, match="bad.nii.gz"):
        read_label(tmp_path / "bad.nii.gz")
    # int64 predictions (argmax) are written compactly; float -> int writes round instead of truncating.
    write_image(lab.astype(np.int64), geo, tmp_path / "pred.nii.gz")
    assert nib.load(tmp_path / "pred.nii.gz").get_data_dtype() == np.uint8
    write_image(lab - 0.001, geo, tmp_path / "r.nii.gz", dtype=np.uint8)
    np.testing.assert_array_equal(read_label(tmp_path / "r.nii.gz")[0], lab)


def test_large_values_and_scaling(tmp_path: Path) -> None:
    data = np.full((8, 6, 4), 1.7e6, np.float32)
    data[0, 0, 0] = -3.25
    _write_nifti(tmp_path / "big.nii.gz", data, np.eye(4))
    arr, _ = read_image(tmp_path / "big.nii.gz")
    assert arr.dtype == np.float32 and arr[0, 0, 0, 1] == 1.7e6 and arr[0, 0, 0, 0] == -3.25
    img = nib.Nifti1Image(np.arange(192, dtype=np.int16).reshape(8, 6, 4), np.eye(4))
    img.header.set_slope_inter(2.0, 10.0)
    nib.save(img, str(tmp_path / "scaled.nii.gz"))
    arr, _ = read_image(tmp_path / "scaled.nii.gz")
    np.testing.assert_array_equal(arr[0], np.arange(192).reshape(8, 6, 4).transpose(2, 1, 0) * 2.0 + 10.0)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsupported"):
        image_suffix(tmp_path / "x.png")
    assert image_suffix("A.NII.GZ") == ".nii.gz" and image_suffix("a.nii") == ".nii"
    with pytest.raises(ImageReadError, match="missing.nii.gz"):
        read_image(tmp_path / "missing.nii.gz")
    _write_nifti(tmp_path / "ok.nii.gz", _volume(), np.eye(4))
    raw = gzip.decompress((tmp_path / "ok.nii.gz").read_bytes())
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(raw[:400]))  # header intact, data truncated
    (tmp_path / "junk.mha").write_bytes(b"not an image at all")
    (tmp_path / "junk.nii").write_bytes(b"\0" * 10)
    for name in ("cut.nii.gz", "junk.mha", "junk.nii"):
        with pytest.raises(ImageReadError) as info:
            read_image(tmp_path / name)
        assert info.value.path == str(tmp_path / name) and str(info.value).startswith(f"{tmp_path / name}: ")
    with pytest.raises(ValueError, match="does not match"):
        write_image(np.zeros((4, 6, 9)), read_geometry(tmp_path / "ok.nii.gz")[0], tmp_path / "o.nii.gz")


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".mhd"])
def test_atomic_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    geo = Geometry.from_physical((4, 6, 8), (3.0, 0.75, 0.5), (0.0, 0.0, 0.0), np.eye(3).ravel())
    write_image(_volume(), geo, tmp_path / f"ok{suffix}")
    assert _no_temp_files(tmp_path) and read_image(tmp_path / f"ok{suffix}")[1].same_grid(geo) == []

    def failing_save(obj, filename, *args, **kwargs) -> None:
        Path(filename).write_bytes(b"partial")  # leave a half-written temp file behind, then fail
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", failing_save)
    monkeypatch.setattr(sitk, "WriteImage", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_image(_volume(), geo, tmp_path / f"fail{suffix}")
    assert not (tmp_path / f"fail{suffix}").exists()
    assert _no_temp_files(tmp_path)


@pytest.mark.integration
@pytest.mark.skipif(not (DATA / "Task04_Hippocampus").is_dir(), reason="shared/data/Task04_Hippocampus not present")
def test_real_hippocampus_file() -> None:
    path = sorted((DATA / "Task04_Hippocampus" / "imagesTr").glob("*.nii.gz"))[0]
    geo, channels = read_geometry(path)
    arr, geo2 = read_image(path)
    assert geo == geo2 and channels == 1
    assert geo.spacing == (1.0, 1.0, 1.0)
    assert arr.shape == (1, *nib.load(path).shape[::-1]) and geo.shape == nib.load(path).shape[::-1]
