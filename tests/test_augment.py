"""Tests for decathlete.augment: batched spatial and intensity augmentation (CPU, small volumes)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from decathlete.augment import AugmentConfig, Augmenter, augment, default_config, intensity, required_input_size
from decathlete.augment.spatial import center_crop

# Every probability zero: the starting point of the single-transform tests.
OFF = AugmentConfig(
    p_rotation=0, p_scaling=0, p_elastic=0, p_noise=0, p_blur=0, p_brightness=0, p_contrast=0, p_lowres=0,
    p_gamma_inverted=0, p_gamma=0, p_mirror=0,
)  # fmt: skip
ALL_ON = replace(
    OFF, p_rotation=1, p_scaling=1, p_elastic=1, p_noise=1, p_blur=1, p_brightness=1, p_contrast=1, p_lowres=1,
    p_gamma_inverted=1, p_gamma=1, p_mirror=0.5,
)  # fmt: skip


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_batch(shape, seed: int = 0, label_dtype=torch.int8):
    g = gen(seed)
    image = torch.randn(shape, generator=g)
    label = torch.randint(-1, 3, (shape[0], 1, *shape[2:]), generator=g).to(label_dtype)
    return image, label


def blob(shape, centre, radius: float) -> torch.Tensor:
    """Smooth Gaussian-profile blob, values in (0, 1], 0.5 at ``radius``."""
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    r2 = sum((g - c) ** 2 for g, c in zip(grids, centre))
    return torch.exp(-r2 * math.log(2) / radius**2)


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


@pytest.mark.parametrize("in_shape", [(2, 1, 16, 24, 24), (2, 2, 19, 27, 30)])
def test_identity_is_exact_centre_crop(in_shape):
    image, label = random_batch(in_shape)
    before = image.clone(), label.clone()
    out_img, out_lab = augment(image, label, (16, 24, 24), OFF, gen())
    assert torch.equal(out_img, center_crop(image, (16, 24, 24)))
    assert torch.equal(out_lab, center_crop(label, (16, 24, 24)))
    assert torch.equal(image, before[0]) and torch.equal(label, before[1])  # inputs untouched


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.long])
def test_labels_keep_their_values_and_dtype(dtype):
    patch = (12, 16, 16)
    cfg = replace(OFF, p_rotation=1, p_scaling=1)
    image, label = random_batch((3, 1, *required_input_size(patch, 30, (0.7, 1.4))), label_dtype=dtype)
    out_img, out_lab = augment(image, label, patch, cfg, gen())
    assert out_lab.dtype == dtype and out_img.shape == (3, 1, *patch) and out_lab.shape == (3, 1, *patch)
    assert set(out_lab.unique().tolist()) <= set(label.unique().tolist())
    assert (out_lab == -1).any()  # "outside" voxels survive


def test_label_pad_value_for_voxels_outside_input():
    image, label = random_batch((2, 1, 16, 16, 16))
    label.clamp_(min=0)
    cfg = replace(OFF, p_scaling=1, scale_range=(1.5, 1.5))  # zoom out: the grid leaves the input
    _, out_lab = augment(image, label, (16, 16, 16), cfg, gen())
    assert out_lab[:, :, 0, 0, 0].eq(-1).all()
    _, out_lab = augment(image, label, (16, 16, 16), replace(cfg, label_pad_value=0), gen())
    assert set(out_lab.unique().tolist()) <= set(label.unique().tolist())


def test_image_and_label_move_together():
    patch = (24, 24, 24)
    size = required_input_size(patch, 30, (0.7, 1.4))
    image = torch.stack([blob(size, [n / 2 + 2 for n in size], 9.0), blob(size, [n / 2 - 2 for n in size], 9.0)])
    image = image[:, None]
    label = (image > 0.5).to(torch.int8)
    cfg = replace(OFF, p_rotation=1, p_scaling=1)
    for seed in range(3):
        out_img, out_lab = augment(image, label, patch, cfg, gen(seed))
        for b in range(2):
            smooth, nearest = out_img[b, 0] > 0.5, out_lab[b, 0] == 1
            assert iou(smooth, nearest) > 0.9
            centroid_gap = smooth.nonzero().float().mean(0) - nearest.nonzero().float().mean(0)
            assert centroid_gap.abs().max() < 0.25  # same grid for both: no shift between image and label


def test_elastic_displacement_is_bounded_and_smooth():
    patch = (16, 24, 24)
    size = required_input_size(patch, 0, (1.0, 1.0), elastic_magnitude=0.1)
    ramp = torch.arange(size[2], dtype=torch.float32).expand(2, 1, *size).contiguous()  # image value = x index
    cfg = replace(OFF, p_elastic=1.0, elastic_scale=(0.1, 0.2), elastic_magnitude=(0.1, 0.1))
    out, out_lab = augment(ramp, torch.zeros_like(ramp, dtype=torch.int8), patch, cfg, gen())
    shift = out - center_crop(ramp, patch)  # linear interpolation of a ramp is exact: the x displacement itself
    assert shift.abs().max() <= 0.1 * 24 / 2 + 1e-4 and shift.abs().max() > 0.5
    assert shift.diff(dim=-1).abs().max() < 0.5  # smooth: neighbours move nearly together
    assert out_lab.eq(0).all()


def test_rotation_by_90_degrees_about_z_is_rot90():
    image, label = random_batch((2, 1, 14, 28, 28))
    patch = (10, 20, 20)
    cfg = replace(OFF, p_rotation=1, rotation_deg=(90.0, 90.0), rotation_axes=(0,))
    out_img, out_lab = augment(image, label, patch, cfg, gen())
    expected_img = torch.rot90(center_crop(image, patch), k=1, dims=(-2, -1))
    expected_lab = torch.rot90(center_crop(label, patch), k=1, dims=(-2, -1))
    assert torch.equal(out_lab, expected_lab)
    torch.testing.assert_close(out_img, expected_img, atol=1e-4, rtol=0)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_mirroring_is_flip(axis):
    image, label = random_batch((2, 1, 18, 26, 24))
    patch = (16, 24, 24)
    cfg = replace(OFF, p_mirror=1.0, mirror_axes=(axis,))
    out_img, out_lab = augment(image, label, patch, cfg, gen())
    assert torch.equal(out_img, center_crop(image, patch).flip(2 + axis))
    assert torch.equal(out_lab, center_crop(label, patch).flip(2 + axis))


def test_mirroring_folded_into_resampling_matches_flip():
    image, label = random_batch((2, 1, 14, 28, 28))
    patch = (10, 20, 20)
    rot = replace(OFF, p_rotation=1, rotation_deg=(90.0, 90.0), rotation_axes=(0,))
    plain_img, plain_lab = augment(image, label, patch, rot, gen())
    flip_img, flip_lab = augment(image, label, patch, replace(rot, p_mirror=1.0, mirror_axes=(2,)), gen())
    assert torch.equal(flip_lab, plain_lab.flip(4))
    torch.testing.assert_close(flip_img, plain_img.flip(4), atol=1e-4, rtol=0)


def test_zoom_in_by_two():
    patch = (32, 32, 32)
    cfg = replace(OFF, p_scaling=1, scale_range=(0.5, 0.5))  # nnU-Net's meaning: 0.5 samples half the extent
    constant = torch.full((1, 1, 34, 34, 34), 3.0)
    out_img, _ = augment(constant, torch.zeros_like(constant, dtype=torch.int8), patch, cfg, gen())
    torch.testing.assert_close(out_img, torch.full_like(out_img, 3.0))
    ball = blob((34, 34, 34), (16.5, 16.5, 16.5), 5.0)[None, None]
    ball_label = (ball > 0.5).to(torch.int8)
    out_img, out_lab = augment(ball, ball_label, patch, cfg, gen())
    ratio = float((out_img > 0.5).sum()) / float((ball > 0.5).sum())
    assert abs(ratio - 8.0) / 8.0 < 0.15
    assert abs(float(out_lab.sum()) / float(ball_label.sum()) - 8.0) / 8.0 < 0.15


def test_brightness_multiplies_each_channel():
    image = torch.rand(3, 2, 8, 10, 10) + 0.5
    out = intensity.brightness(image.clone(), gen(), p=1.0, factor_range=(0.75, 1.25))
    ratio = (out / image).flatten(2)
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio))  # one factor per (sample, channel)
    assert ((ratio >= 0.75 - 1e-6) & (ratio <= 1.25 + 1e-6)).all()
    assert not torch.allclose(ratio, torch.ones_like(ratio))


def test_contrast_stays_in_original_range():
    image = torch.randn(3, 2, 8, 10, 10)
    out = intensity.contrast(image.clone(), gen(1), p=1.0, factor_range=(1.25, 1.25))
    flat_in, flat_out = image.flatten(2), out.flatten(2)
    assert (flat_out.amin(2) >= flat_in.amin(2) - 1e-6).all() and (flat_out.amax(2) <= flat_in.amax(2) + 1e-6).all()
    assert (flat_out.std(2) > flat_in.std(2)).all()  # factor 1.25 did stretch


@pytest.mark.parametrize("invert", [False, True])
def test_gamma_retains_mean_and_std(invert):
    image = torch.randn(3, 2, 8, 10, 10)
    out = intensity.gamma(image.clone(), gen(), p=1.0, gamma_range=(0.7, 1.5), invert=invert)
    torch.testing.assert_close(out.flatten(2).mean(2), image.flatten(2).mean(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.flatten(2).std(2), image.flatten(2).std(2), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out, image)


def test_noise_std():
    image = torch.zeros(2, 2, 16, 24, 24)
    out = intensity.gaussian_noise(image, gen(), p=1.0, std_range=(0.3, 0.3))
    assert abs(float(out.std()) - 0.3) < 0.01
    assert torch.equal(out[:, 0], out[:, 1])  # nnU-Net: one noise field for all channels of a sample


def test_blur_smooths_and_low_resolution_keeps_shape():
    image = torch.randn(2, 2, 12, 16, 16)
    blurred = intensity.gaussian_blur(image.clone(), gen(), p=1.0, sigma_range=(1.0, 1.0), p_per_channel=1.0)
    assert blurred.shape == image.shape and float(blurred.std()) < 0.5 * float(image.std())
    torch.testing.assert_close(blurred.mean(), image.mean(), atol=0.02, rtol=0)
    low = intensity.simulate_low_resolution(image.clone(), gen(), p=1.0, zoom_range=(0.5, 0.5), p_per_channel=1.0)
    assert low.shape == image.shape and not torch.allclose(low, image)
    ref = torch.nn.functional.interpolate(
        torch.nn.functional.interpolate(image[:1, :1], size=(6, 8, 8), mode="nearest-exact"),
        size=(12, 16, 16), mode="trilinear",
    )  # fmt: skip
    torch.testing.assert_close(low[:1, :1], ref)


def test_dummy_2d_never_mixes_z():
    depth, patch = 8, (8, 16, 16)
    cfg = replace(default_config(3, anisotropic=True), p_rotation=1, p_scaling=1, p_elastic=1, p_noise=0, p_blur=0,
                  p_brightness=0, p_contrast=0, p_lowres=0, p_gamma=0, p_gamma_inverted=0, p_mirror=0)  # fmt: skip
    assert cfg.dummy_2d
    _, height, width = cfg.input_size(patch)  # large enough that no voxel comes from outside the input
    values = torch.arange(1, 11, dtype=torch.float32) * 10.0  # input z = 10, centre-cropped to 8
    image = values.view(1, 1, 10, 1, 1).expand(2, 1, 10, height, width).contiguous()
    label = torch.arange(1, 11, dtype=torch.int16).view(1, 1, 10, 1, 1).expand(2, 1, 10, height, width).contiguous()
    out_img, out_lab = augment(image, label, patch, cfg, gen())
    for z in range(depth):
        torch.testing.assert_close(out_img[:, :, z], torch.full_like(out_img[:, :, z], float(values[z + 1])))
        assert out_lab[:, :, z].eq(z + 2).all()
    assert not torch.equal(out_img, center_crop(image, patch))  # something did happen in plane


def test_dummy_2d_size_and_mirroring_of_z():
    assert required_input_size((8, 20, 20), 180, (0.7, 1.4), dummy_2d=True)[0] == 8
    image, label = random_batch((2, 1, 8, 24, 24))
    cfg = replace(OFF, dummy_2d=True, p_mirror=1.0, mirror_axes=(0,))
    out_img, out_lab = augment(image, label, (8, 20, 20), cfg, gen())
    assert torch.equal(out_img, center_crop(image, (8, 20, 20)).flip(2))
    assert torch.equal(out_lab, center_crop(label, (8, 20, 20)).flip(2))


def test_determinism():
    image, label = random_batch((2, 2, 16, 20, 20))
    patch = (12, 16, 16)
    a = augment(image, label, patch, ALL_ON, gen(7))
    b = augment(image, label, patch, ALL_ON, gen(7))
    c = augment(image, label, patch, ALL_ON, gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    aug = Augmenter(ALL_ON, seed=7)
    d = aug(image, label, patch)
    assert torch.equal(a[0], d[0]) and not torch.equal(d[0], aug(image, label, patch)[0])


def test_2d_batches():
    image, label = random_batch((4, 3, 40, 36))
    patch = (32, 32)
    cfg = replace(default_config(2, patch_size=patch), p_elastic=0.5)
    out_img, out_lab = augment(image, label, patch, cfg, gen())
    assert out_img.shape == (4, 3, 32, 32) and out_lab.shape == (4, 1, 32, 32)
    assert set(out_lab.unique().tolist()) <= set(label.unique().tolist())
    out_img, out_lab = augment(image, label, patch, replace(ALL_ON, p_mirror=1), gen())
    assert out_img.isfinite().all()


def test_all_transforms_keep_shapes_and_finite_values():
    image, label = random_batch((2, 2, 20, 24, 24))
    out_img, out_lab = augment(image, label, (16, 20, 20), ALL_ON, gen(3))
    assert out_img.shape == (2, 2, 16, 20, 20) and out_lab.shape == (2, 1, 16, 20, 20)
    assert out_img.isfinite().all() and out_img.dtype == image.dtype
    assert set(out_lab.unique().tolist()) <= set(label.unique().tolist())


def test_required_input_size():
    assert required_input_size((16, 24, 24), 0, (1.0, 1.0)) == (16, 24, 24)
    assert required_input_size((32, 48), (0, 0), (0.7, 1.0)) == (32, 48)
    bigger = required_input_size((40, 56, 40), 30, (1.0, 1.0))
    assert all(b > p for b, p in zip(bigger, (40, 56, 40)))
    assert all(b >= p for b, p in zip(required_input_size((40, 56, 40), 30, (0.7, 1.4)), bigger))
    g = gen()
    for _ in range(20):
        patch = tuple(int(v) for v in torch.randint(1, 64, (3,), generator=g))
        size = required_input_size(patch, float(torch.rand(1, generator=g)) * 180, (0.5, 0.9))
        assert all(s >= p and (s - p) % 2 == 0 for s, p in zip(size, patch))
    # The box really contains every rotated corner: a random rotation of the patch needs no padding.
    patch = (10, 14, 12)
    size = required_input_size(patch, 30, (0.7, 1.4))
    ones = torch.ones(4, 1, *size)
    out, _ = augment(
        ones, torch.zeros_like(ones, dtype=torch.int8), patch, replace(OFF, p_rotation=1, p_scaling=1), gen()
    )
    assert torch.allclose(out, torch.ones_like(out), atol=1e-5)


def test_config_round_trips_through_json():
    cfg = default_config(3, anisotropic=True)
    back = AugmentConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert default_config(3) == AugmentConfig()
    assert default_config(2, patch_size=(64, 256)).rotation_deg == (-15.0, 15.0)
    with pytest.raises(TypeError):
        AugmentConfig.from_dict({"p_rotaton": 0.1})


def test_bad_inputs():
    image, label = random_batch((2, 1, 8, 8, 8))
    with pytest.raises(ValueError):
        augment(image, label, (16, 8, 8), OFF, gen())
    with pytest.raises(TypeError):
        augment(image, label.float(), (8, 8, 8), OFF, gen())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_is_deterministic():
    image, label = random_batch((2, 2, 20, 24, 24))
    cfg = replace(ALL_ON, p_noise=0.0)  # noise fields come from a device generator: different numbers per device
    cpu_img, cpu_lab = augment(image, label, (16, 20, 20), cfg, gen(5))
    gpu_img, gpu_lab = augment(image.cuda(), label.cuda(), (16, 20, 20), cfg, gen(5))
    assert gpu_img.is_cuda and gpu_lab.is_cuda
    torch.testing.assert_close(gpu_img.cpu(), cpu_img, atol=1e-3, rtol=1e-3)
    assert float((gpu_lab.cpu() != cpu_lab).float().mean()) < 1e-3  # nearest ties may round differently
    again = augment(image.cuda(), label.cuda(), (16, 20, 20), ALL_ON, gen(5))
    once = augment(image.cuda(), label.cuda(), (16, 20, 20), ALL_ON, gen(5))
    assert torch.equal(again[0], once[0]) and torch.equal(again[1], once[1])
