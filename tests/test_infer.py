"""Inference: Gaussian tiles without seams, mirroring TTA, fold ensembles, exact output geometry, safe folder runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from decathlete import api
from decathlete.infer import gaussian_importance, mirrored_forward, sliding_window_predict, tile_starts
from decathlete.infer.cases import discover_cases
from decathlete.infer.predictor import Predictor, invert_preprocessing, predict_folder
from decathlete.infer.sliding_window import whole_volume_patch
from decathlete.infer.tta import flip_combinations
from decathlete.io import images
from decathlete.io.checkpoint import FINAL
from decathlete.preprocess.cropping import paste_into_bbox
from decathlete.preprocess.pipeline import preprocess_case
from decathlete.preprocess.resampling import resample_data, separate_axis_for
from decathlete.synthetic import make_synthetic_dataset, synthetic_case
from decathlete.train.trainer import TrainOptions, train
from synthetic import write_dicom_series

TRAIN_SHAPE = (16, 40, 40)  # (z, y, x); the synthetic spacing is about (3.0, 1.2, 1.2) mm
TEST_SPACING_ZYX = (2.2, 1.1, 0.9)  # differs from the training spacing on every axis: resampling both ways


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model, barely trained (geometry, not accuracy, is tested): 3d_fullres folds 0 and 1, 2d fold 0."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("infer")
    data = make_synthetic_dataset(root / "raw", n_cases=6, shape=TRAIN_SHAPE)
    api.plan(data, root / "work", recipe="tiny", workers=1, progress=False)
    api.preprocess(root / "work", ["3d_fullres", "2d"], workers=1, progress=False)
    kwargs = {
        "epochs": 1,
        "iterations_per_epoch": 2,
        "val_iterations": 1,
        "device": "cpu",
        "num_workers": 0,
        "progress": False,
    }
    for config, fold in (("3d_fullres", 0), ("3d_fullres", 1), ("2d", 0)):
        train(root / "work", TrainOptions(config, fold, **kwargs))
    return root / "work"


def _rotation(degrees: tuple[float, float, float]) -> np.ndarray:
    a, b, c = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _test_image(seed: int = 1, shape: tuple[int, int, int] = (14, 30, 60)) -> np.ndarray:
    image, _ = synthetic_case(np.random.default_rng(seed), shape, TEST_SPACING_ZYX)
    return image


def _write_oblique_nifti(path: Path, seed: int = 1) -> None:
    affine = np.eye(4)
    affine[:3, :3] = _rotation((12.0, -7.0, 25.0)) @ np.diag(TEST_SPACING_ZYX[::-1])
    affine[:3, 3] = (-31.5, 17.25, 102.0)
    img = nib.Nifti1Image(_test_image(seed).transpose(2, 1, 0), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=2)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)


def _write_oblique_sitk(path: Path, seed: int = 2) -> None:
    img = sitk.GetImageFromArray(_test_image(seed))
    img.SetSpacing(TEST_SPACING_ZYX[::-1])  # ITK order (x, y, z)
    img.SetOrigin((12.125, -40.5, 3.3))
    img.SetDirection(tuple(_rotation((-9.0, 14.0, 31.0)).ravel()))
    sitk.WriteImage(img, str(path))


# --- sliding window --------------------------------------------------------------------------------------------


def test_gaussian_importance_max_one_symmetric_no_zeros() -> None:
    g = gaussian_importance((9, 16, 7))
    assert g.shape == (9, 16, 7) and g.dtype == torch.float32
    assert g.max() == 1 and g[4, 7, 3] == 1 and g[4, 8, 3] == 1  # odd axes: the centre; even: the middle two
    for axis in range(3):
        assert torch.equal(g, g.flip(axis))
    assert g.min() > 0
    tiny = gaussian_importance((64, 64), sigma_scale=1 / 64, dtype=torch.float16)  # underflows in fp16
    assert tiny.min() > 0 and tiny.max() == 1


def test_tile_starts_hand_computed() -> None:
    assert tile_starts([100], [40], 0.5) == [[0, 20, 40, 60]]
    assert tile_starts([40, 41], [40, 40], 0.5) == [[0], [0, 1]]
    assert tile_starts([30], [40]) == [[0]]  # smaller than the patch: one tile of the padded image
    assert tile_starts([100], [40], 1.0) == [[0, 30, 60]]  # ceil(60 / 40) + 1 = 3 tiles, evenly spaced
    assert tile_starts([57], [20], 0.5) == [[0, 9, 18, 28, 37]]  # ceil(37 / 10) + 1 = 5; 18.5 rounds to even
    with pytest.raises(ValueError, match="step"):
        tile_starts([10], [4], 0.0)


def _pointwise_net(c_in: int, k: int, dims: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = (torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d)(c_in, k, 1)
    return net.eval()


@pytest.mark.parametrize(
    ("shape", "patch", "batch"),
    [
        ((37, 53, 29), (16, 24, 20), 3),  # tiled on every axis
        ((10, 12, 50), (16, 16, 16), 1),  # padded on two axes, tiled on one
        ((10, 12, 14), (16, 16, 16), None),  # whole-volume fast path
    ],
)
def test_sliding_window_has_no_seams(shape: tuple[int, ...], patch: tuple[int, ...], batch: int | None) -> None:
    net = _pointwise_net(2, 3)
    image = torch.randn(2, *shape)
    expected = net(image[None])[0].detach()
    got = sliding_window_predict(net, image, patch, 3, step=0.5, batch_tiles=batch)
    assert got.shape == (3, *shape) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    mirrored = sliding_window_predict(net, image, patch, 3, mirror_axes=(0, 1, 2))  # a 1x1 conv is flip-equivariant
    torch.testing.assert_close(mirrored, expected, atol=1e-5, rtol=0)


class _TileMean(torch.nn.Module):
    """Each tile's output is the mean of its input, everywhere: overlapping tiles disagree, so weights matter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=tuple(range(1, x.ndim)), keepdim=True).expand(x.shape[0], 1, *x.shape[2:])


@pytest.mark.parametrize("weighting", ["constant", "center", "gaussian"])
def test_tile_weightings_average_overlapping_tiles_by_their_weights(weighting: str) -> None:
    from decathlete import registry

    image = torch.arange(20 * 12, dtype=torch.float32).reshape(1, 20, 12) ** 1.5
    patch = (8, 12)
    weights = registry.get("tile_weights", weighting)(patch)
    assert weights.shape == patch and bool((weights > 0).all())
    got = sliding_window_predict(_TileMean(), image[None], patch, 1, step=0.5, tile_weights=lambda p: weights)
    # by hand: tiles start at 0, 4, 8, 12 along the first axis; each voxel averages its tiles' means by weight
    num, den = torch.zeros(20, 12, dtype=torch.float64), torch.zeros(20, 12, dtype=torch.float64)
    for start in (0, 4, 8, 12):
        tile = image[0, start:start + 8]
        num[start:start + 8] += tile.double().mean() * weights.double()
        den[start:start + 8] += weights.double()
    torch.testing.assert_close(got[0, 0].double(), num / den, rtol=1e-5, atol=1e-3)
    if weighting == "center":  # the centre half of each tile decides wherever a tile's centre covers the voxel
        assert weights[2:6, 3:9].eq(1).all() and weights[:2].lt(0.01).all() and weights[:, :3].lt(0.01).all()
        torch.testing.assert_close(got[0, 0, 6, 6].double(), image[0, 4:12].double().mean(), rtol=1e-2, atol=0)
    if weighting == "gaussian":
        torch.testing.assert_close(weights, gaussian_importance(patch))


def test_whole_volume_patch_hand_computed() -> None:
    # 43x59x47 with patch 40x56x40 and divisor 8x8x8: 2x2x2 = 8 tiles (716,800 voxels) vs one 48x64x48 (147,456)
    assert whole_volume_patch((43, 59, 47), (40, 56, 40), (8, 8, 8)) == (48, 64, 48)
    assert whole_volume_patch((36, 50, 35), (40, 56, 40), (8, 8, 8)) is None  # one tile of the padded image anyway
    assert whole_volume_patch((200, 200, 200), (40, 56, 40), (8, 8, 8)) is None  # over 4 patches: tile it
    # 2x1x1 tiles = 2 patches vs a 48x56x40 whole volume (1.2 patches)
    assert whole_volume_patch((41, 30, 40), (40, 56, 40), (16, 8, 8)) == (48, 56, 40)


def test_whole_volume_inference_is_one_pass_over_the_padded_image() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Conv3d(4, 2, 3, padding=1)).eval()
    image = torch.randn(1, 19, 21, 17)
    calls = []
    net.register_forward_pre_hook(lambda _m, args: calls.append(tuple(args[0].shape)))
    got = sliding_window_predict(net, image, (16, 16, 16), 2, whole_volume_divisor=(4, 4, 4))
    assert calls == [(1, 1, 20, 24, 20)]  # 8 tiles replaced by one padded pass (half before, half after)
    padded = torch.nn.functional.pad(image, (1, 2, 1, 2, 0, 1))
    expected = net(padded[None])[0, :, 0:19, 1:22, 1:18].detach()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("mirror_axes", "batch"), [((), 4), ((0, 1), 4), ((0, 1), None)])
def test_tile_bar_counts_tiles_times_flips(bars, capsys: pytest.CaptureFixture, mirror_axes: tuple[int, ...],
                                          batch: int | None) -> None:
    made = bars("decathlete.infer.sliding_window")
    image = torch.randn(1, 12, 16, 8)
    # by hand, patch 8x8x8, step 0.5: z starts 0, 4 (2); y starts 0, 4, 8 (3); x fits (1) -> 6 tiles, x 4 flips
    sliding_window_predict(_pointwise_net(1, 2), image, (8, 8, 8), 2, batch_tiles=batch, mirror_axes=mirror_axes,
                           progress=True, desc="fold_0")
    flips = 2 ** len(mirror_axes)
    [bar] = made
    assert (bar.n, bar.total, bar.leave) == (6 * flips, 6 * flips, False)
    assert bar.desc == ("fold_0 (6 tiles x 4 flips)" if flips > 1 else "fold_0 (6 tiles)")
    assert bar.unit == ("tile-flip" if flips > 1 else "tile")
    assert f"{6 * flips}/{6 * flips}" in capsys.readouterr().err
    sliding_window_predict(_pointwise_net(1, 2), image, (8, 8, 8), 2, mirror_axes=mirror_axes)  # progress off
    assert len(made) == 1 and capsys.readouterr().err == ""


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_2d_network_predicts_slice_by_slice(slice_axis: int) -> None:
    net = _pointwise_net(2, 3, dims=2)
    image = torch.randn(2, 6, 30, 20)
    calls = []
    net.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape))
    got = sliding_window_predict(net, image, (16, 16), 3, batch_tiles=4, slice_axis=slice_axis)
    assert calls and all(s[0] <= 4 and s[2:] == (16, 16) for s in calls)  # batches of in-plane tiles
    planes = image.movedim(1 + slice_axis, 0)  # (S, C, a, b)
    expected = net(planes).detach().movedim(0, 1 + slice_axis)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_mirrored_forward_averages_flipped_logits_and_uses_full_resolution_output() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 2, 3, padding=1).eval()  # not flip-equivariant

    class DeepSupervised(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return [conv(x), conv(x)[:, :, ::2, ::2, ::2]]

    x = torch.randn(2, 1, 6, 8, 10)
    with torch.no_grad():
        expected = sum(torch.flip(conv(torch.flip(x, d)), d) for d in ([], [2], [4], [2, 4])) / 4
        for per_pass in (1, 3, 4):  # one flip per forward pass, uneven groups, all flips in one batch
            got = mirrored_forward(DeepSupervised(), x, (0, 2), per_pass)
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert flip_combinations((2, 0, 1)) == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    with pytest.raises(ValueError, match="mirror axes"):
        mirrored_forward(conv, x, (3,))


# --- inverse preprocessing -------------------------------------------------------------------------------------


def test_per_class_inversion_equals_full_resample_then_argmax(tmp_path: Path) -> None:
    path = tmp_path / "case.nii.gz"
    image = np.zeros((12, 30, 26), np.float32)
    image[2:11, 4:27, 3:22] = np.random.default_rng(0).uniform(1, 2, (9, 23, 19))  # cropped to this box
    nib.save(nib.Nifti1Image(image.transpose(2, 1, 0), np.diag([0.8, 0.7, 4.0, 1.0])), path)
    config = {"spacing": [1.5, 1.0, 1.0], "resampling": {"anisotropy_threshold": 3.0}}
    props = preprocess_case(path, None, config).properties
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(0, 2, (4, *props["shape_after_resampling"])).astype(np.float32))
    probs = torch.softmax(logits, 0).numpy()
    values = [0, 1, 2, 5]
    label, full = invert_preprocessing(probs, props, values, return_probabilities=True)
    axis = separate_axis_for(props["target_spacing"], props["spacing_after_crop"])
    assert axis == 0  # the 4 mm axis: resampled separately with order 0
    stack = resample_data(probs, props["shape_after_crop"], 1, axis, 0)
    naive = paste_into_bbox(np.asarray(values, np.uint8)[stack.argmax(0)], props["crop_bbox"], image.shape)
    assert label.shape == image.shape and label.dtype == np.uint8
    np.testing.assert_array_equal(label, naive)
    assert full.dtype == np.float16 and full.shape == (4, *image.shape)
    np.testing.assert_allclose(full.astype(np.float32).sum(0), 1.0, atol=3e-3)  # still a distribution
    regions, _ = invert_preprocessing(probs, props, [1, 2, 3, 4], region_based=True)
    painted = np.zeros(props["shape_after_crop"], np.uint8)
    for value, p in zip([1, 2, 3, 4], stack):
        painted[p > 0.5] = value
    np.testing.assert_array_equal(regions, paste_into_bbox(painted, props["crop_bbox"], image.shape))


# --- predictor -------------------------------------------------------------------------------------------------


def test_oblique_anisotropic_inputs_keep_their_exact_geometry(workdir: Path, tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    _write_oblique_nifti(inp / "obl.nii.gz")
    _write_oblique_sitk(inp / "itk.nrrd")
    _write_oblique_sitk(inp / "meta.mha", seed=3)
    summary = predict_folder(inp, tmp_path / "out", workdir, device="cpu", progress=False)
    assert summary["n_done"] == 3
    src, out = nib.load(inp / "obl.nii.gz"), nib.load(tmp_path / "out" / "obl.nii.gz")
    assert out.shape == src.shape and out.get_data_dtype() == np.uint8
    assert np.array_equal(out.affine, src.affine)
    for get in ("get_qform", "get_sform"):
        (a, code_a), (b, code_b) = getattr(src.header, get)(coded=True), getattr(out.header, get)(coded=True)
        assert np.array_equal(a, b) and code_a == code_b
    assert np.array_equal(out.header["pixdim"], src.header["pixdim"])
    assert out.header.get_xyzt_units() == src.header.get_xyzt_units()
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2}
    for name in ("itk.nrrd", "meta.mha"):
        a, b = sitk.ReadImage(str(inp / name)), sitk.ReadImage(str(tmp_path / "out" / name))
        assert b.GetSize() == a.GetSize() and b.GetOrigin() == a.GetOrigin()
        if name.endswith(".nrrd"):
            # NRRD stores spacing x direction products: even ITK's own read -> CopyInformation -> write moves an
            # oblique grid's spacing by an ulp. Ours must equal that round trip exactly.
            copy = sitk.GetImageFromArray(sitk.GetArrayFromImage(b))
            copy.CopyInformation(a)
            sitk.WriteImage(copy, str(tmp_path / "itk_copy.nrrd"))
            a = sitk.ReadImage(str(tmp_path / "itk_copy.nrrd"))
        assert b.GetSpacing() == a.GetSpacing() and b.GetDirection() == a.GetDirection()


def test_predict_uses_every_trained_fold_by_default(workdir: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(workdir, work, ignore=shutil.ignore_patterns("preprocessed"))
    assert [d.name for d in Predictor(work, device="cpu").fold_dirs] == ["fold_0", "fold_1"]  # nnU-Net: 0-4
    assert [d.name for d in Predictor(work, folds=(1,), device="cpu").fold_dirs] == ["fold_1"]
    unfinished = work / "models" / "3d_fullres" / "tiny" / "fold_2"
    shutil.copytree(unfinished.parent / "fold_0", unfinished)
    (unfinished / FINAL).unlink()  # a fold still training: no final checkpoint yet
    predictor = Predictor(work, device="cpu", tta=False)
    assert [d.name for d in predictor.fold_dirs] == ["fold_0", "fold_1"] and predictor.skipped_folds == ["fold_2"]
    with pytest.raises(FileNotFoundError):
        Predictor(work, folds=(2,), device="cpu")  # a fold asked for by name must be there
    inp = tmp_path / "in"
    inp.mkdir()
    _write_oblique_nifti(inp / "case.nii.gz")
    summary = predictor.predict_folder(inp, tmp_path / "out", progress=False)
    assert summary["folds"] == ["fold_0", "fold_1"] and summary["skipped_folds"] == ["fold_2"]


def test_predict_shows_a_tile_bar_per_fold_inside_the_case_bar(workdir: Path, tmp_path: Path, bars,
                                                               capsys: pytest.CaptureFixture) -> None:
    made = bars("decathlete.infer.outputs", "decathlete.infer.sliding_window")
    inp = tmp_path / "in"
    inp.mkdir()
    _write_oblique_nifti(inp / "case.nii.gz")
    predictor = Predictor(workdir, folds=(0, 1), device="cpu")
    calls = []  # tiles through the network, every flip counted
    for net in predictor.networks:
        net.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    predictor.predict_folder(inp, tmp_path / "out", progress=True)
    outer, *inner = made
    assert (outer.desc, outer.n, outer.total) == ("predict", 1, 1)
    assert [bar.desc.split(" (")[0] for bar in inner] == ["fold_0", "fold_1"]
    assert all(bar.n == bar.total > 0 and not bar.leave for bar in inner)
    assert sum(bar.total for bar in inner) == sum(calls) and inner[0].total % 8 == 0  # 8 flips (z, y, x)
    err = capsys.readouterr().err
    assert f"{inner[0].total}/{inner[0].total}" in err and "1/1" in err
    made.clear()
    predictor.predict_folder(inp, tmp_path / "quiet", progress=False)
    assert all(bar.disable for bar in made) and capsys.readouterr().err == ""


def test_fold_ensemble_averages_probabilities_and_no_tta_runs_once(workdir: Path, tmp_path: Path) -> None:
    path = tmp_path / "obl.nii.gz"
    _write_oblique_nifti(path)
    data = preprocess_case(path, None, Predictor(workdir, device="cpu").preprocessing).data
    both = Predictor(workdir, folds=(0, 1), device="cpu", tta=False)
    single = [Predictor(workdir, folds=(k,), device="cpu", tta=False) for k in (0, 1)]
    expected = (single[0].predict_probabilities(data) + single[1].predict_probabilities(data)) / 2
    np.testing.assert_allclose(both.predict_probabilities(data), expected, atol=1e-6)
    calls = {True: 0, False: 0}
    for tta in (True, False):
        predictor = Predictor(workdir, device="cpu", tta=tta)
        hook = lambda _m, args, t=tta: calls.__setitem__(t, calls[t] + args[0].shape[0])  # noqa: E731
        predictor.networks[0].register_forward_pre_hook(hook)
        label, probs = predictor.predict_case(path)
        assert label.shape == nib.load(path).shape[::-1] and probs is None
    assert calls[True] == 8 * calls[False] > 0  # samples through the network: every flip combination of z, y, x
    label2d, _ = Predictor(workdir, "2d", device="cpu").predict_case(path)
    assert label2d.shape == label.shape


def test_channels_last_3d_network_gives_the_contiguous_networks_probabilities(workdir: Path, tmp_path: Path) -> None:
    path = tmp_path / "obl.nii.gz"
    _write_oblique_nifti(path)
    predictor = Predictor(workdir, device="cpu")
    conv = next(m for m in predictor.networks[0].modules() if isinstance(m, torch.nn.Conv3d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)  # the CPU speed-up is on
    data = preprocess_case(path, None, predictor.preprocessing).data
    fast = predictor.predict_probabilities(data)
    predictor.networks = [net.to(memory_format=torch.contiguous_format) for net in predictor.networks]
    np.testing.assert_allclose(fast, predictor.predict_probabilities(data), atol=1e-5)


def test_channel_files_probabilities_and_resume(workdir: Path, tmp_path: Path) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    _write_oblique_nifti(inp / "caseA_0000.nii.gz", seed=4)
    _write_oblique_nifti(inp / "caseB_0000.nii.gz", seed=5)
    predictor = Predictor(workdir, device="cpu", tta=False)
    first = predictor.predict_folder(inp, out, save_probabilities=True, progress=False)
    assert first["n_done"] == 2 and sorted(p.name for p in out.iterdir()) == [
        "caseA.nii.gz",
        "caseA.npz",
        "caseB.nii.gz",
        "caseB.npz",
        "efficiency.json",
        "provenance.json",
    ]
    with np.load(out / "caseA.npz") as npz:
        probs, values = npz["probabilities"], npz["class_values"]
    label = np.asarray(nib.load(out / "caseA.nii.gz").dataobj).transpose(2, 1, 0)
    assert probs.dtype == np.float16 and probs.shape == (3, *label.shape) and list(values) == [0, 1, 2]
    assert np.mean(values[probs.argmax(0)] == label) > 0.99  # float16 rounding may flip near-ties
    stamp = (out / "caseA.nii.gz").stat().st_mtime_ns
    assert predictor.predict_folder(inp, out, save_probabilities=True, progress=False)["n_skipped"] == 2
    assert (out / "caseA.nii.gz").stat().st_mtime_ns == stamp
    assert predictor.predict_folder(inp, out, overwrite=True, progress=False)["n_done"] == 2
    assert sorted(p.name for p in inp.iterdir()) == ["caseA_0000.nii.gz", "caseB_0000.nii.gz"]


def test_dicom_series_folders_are_cases_written_as_nifti_on_their_grid(workdir: Path, tmp_path: Path) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    volume = np.clip(_test_image(seed=6, shape=(12, 30, 34)), -1000, 3000).astype(np.int16)
    write_dicom_series(inp / "patient1", volume, (2.5, 0.8, 0.7), (-20.0, 15.0, 40.0))
    result = Predictor(workdir, device="cpu", tta=False).predict_folder(inp, out, progress=False)
    assert result["n_done"] == 1 and sorted(p.name for p in out.iterdir()) == ["efficiency.json", "patient1.nii.gz",
                                                                               "provenance.json"]
    label, geometry = images.read_label(out / "patient1.nii.gz")
    source = images.read_geometry(inp / "patient1")[0]
    assert label.shape == volume.shape and geometry.same_grid(source) == []
    np.testing.assert_allclose(geometry.spacing, (2.5, 0.8, 0.7), rtol=1e-6)
    (inp / "stray.nii.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="DICOM series folders"):
        discover_cases(inp, 1)


def test_output_inside_input_is_refused(workdir: Path, tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    _write_oblique_nifti(inp / "obl.nii.gz")
    predictor = Predictor(workdir, device="cpu", tta=False)
    for out in (inp, inp / "pred", inp / "a" / ".." / "b"):
        with pytest.raises(ValueError, match="input folder"):
            predictor.predict_folder(inp, out, progress=False)
    assert [p.name for p in inp.iterdir()] == ["obl.nii.gz"]


def test_interrupted_write_leaves_no_complete_looking_file(
    workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    _write_oblique_nifti(inp / "obl.nii.gz")
    predictor = Predictor(workdir, device="cpu", tta=False)

    def broken(array: np.ndarray, geometry: images.Geometry, path: Path, exc: BaseException) -> None:
        path.write_bytes(b"half a NIfTI")  # the writer dies midway through the temporary
        raise exc

    monkeypatch.setattr(images, "_write_nifti", lambda a, g, p: broken(a, g, p, OSError("disk full")))
    with pytest.raises(RuntimeError, match="obl: OSError: disk full"):
        predictor.predict_folder(inp, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["provenance.json"]  # an entry without a label map: not done
    monkeypatch.setattr(images, "_write_nifti", lambda a, g, p: broken(a, g, p, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C stops the run at once, and still leaves nothing
        predictor.predict_folder(inp, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["provenance.json"]
    monkeypatch.undo()
    assert predictor.predict_folder(inp, out, progress=False)["n_done"] == 1  # the next run redoes the case
    assert sorted(p.name for p in out.iterdir()) == ["efficiency.json", "obl.nii.gz", "provenance.json"]


def test_discover_cases(tmp_path: Path) -> None:
    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz", ".tmp-1-x-c_0000.nii.gz"):
        (tmp_path / name).touch()
    assert discover_cases(tmp_path, 2) == {
        c: [tmp_path / f"{c}_0000.nii.gz", tmp_path / f"{c}_0001.nii.gz"] for c in ("a", "b")
    }
    # A one-channel model: _0000 + _0001 are two channels of one case, which it cannot take (not two cases).
    with pytest.raises(ValueError, match="takes 1 channel .*case 'a' has _0000, _0001; case 'b' has _0000, _0001"):
        discover_cases(tmp_path, 1)
    (tmp_path / "b_0001.nii.gz").unlink()
    with pytest.raises(ValueError, match="case 'b' has _0000\\."):
        discover_cases(tmp_path, 2)
    numbered = tmp_path / "numbered"  # MSD-like case numbers (not from _0000 on) are cases, one file each
    numbered.mkdir()
    for name in ("x_0001.nii.gz", "x_0002.nii.gz", "x_0001.nrrd"):
        (numbered / name).touch()
    with pytest.raises(ValueError, match="two images for case 'x_0001'"):
        discover_cases(numbered, 1)
    (numbered / "x_0001.nrrd").unlink()
    assert list(discover_cases(numbered, 1)) == ["x_0001", "x_0002"]


def test_whole_volume_is_the_default_and_the_cli_can_switch_it_off() -> None:
    import inspect

    from decathlete.cli import build_parser
    from decathlete.crossval import cross_validate

    assert inspect.signature(Predictor).parameters["whole_volume"].default is True
    assert inspect.signature(cross_validate).parameters["whole_volume"].default is True
    parser = build_parser()
    for verb in (["predict", "-i", "a", "-o", "b", "-m", "w"], ["crossval", "w"]):
        assert parser.parse_args(verb).no_whole_volume is False
        assert parser.parse_args([*verb, "--no-whole-volume"]).no_whole_volume is True
