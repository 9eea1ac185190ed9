"""Planner rules against hand-computed cases and nnU-Net v2's own plans."""

from __future__ import annotations

import json

import numpy as np
import pytest

from decathlete import registry
from decathlete.nets.unet import DynamicUNet
from decathlete.planning import rules
from decathlete.planning.plans import Plans
from decathlete.recipes.base import get_recipe
from decathlete.recipes.build import build_normalization


def fake_fingerprint(shape, spacing, n_cases=20, channels=("MRI",), crop_fraction=1.0, labels=(0, 1, 2), jitter=0.0):
    rng = np.random.default_rng(0)
    cases = []
    for i in range(n_cases):
        sp = np.asarray(spacing, float) * (1 + jitter * rng.uniform(-1, 1, 3))
        cases.append(
            {
                "id": f"c{i}",
                "spacing": sp.tolist(),
                "shape": list(shape),
                "shape_after_crop": list(shape),
                "crop_fraction": crop_fraction,
                "class_voxels": {},
            }
        )
    stats = {
        "mean": 10.0,
        "std": 2.0,
        "median": 9.0,
        "min": -5.0,
        "max": 100.0,
        "percentile_00_5": -1.0,
        "percentile_99_5": 50.0,
    }
    return {
        "dataset": "fake",
        "n_cases": n_cases,
        "channel_names": list(channels),
        "label_values": list(labels),
        "median_spacing": list(spacing),
        "median_shape_after_crop": list(shape),
        "median_crop_fraction": crop_fraction,
        "cases": cases,
        "foreground_intensity": [{"channel": c, "name": n, "n_samples": 1, **stats} for c, n in enumerate(channels)],
    }


def test_target_spacing_is_median_for_isotropic_data() -> None:
    spacings = np.array([[1.0, 1.0, 1.0], [1.2, 1.0, 0.9], [0.8, 1.1, 1.0]])
    shapes = np.array([[100, 100, 100]] * 3)
    assert rules.target_spacing(spacings, shapes).tolist() == [1.0, 1.0, 1.0]


def test_anisotropic_axis_takes_tenth_percentile() -> None:
    z = np.linspace(2.5, 6.0, 11)  # 10th percentile 2.85
    spacings = np.stack([z, np.full(11, 0.7), np.full(11, 0.7)], 1)
    shapes = np.array([[40, 512, 512]] * 11)
    target = rules.target_spacing(spacings, shapes)
    assert target[0] == pytest.approx(np.percentile(z, 10)) and target[1:].tolist() == [0.7, 0.7]
    # anisotropic spacing but many slices: the median stays
    assert rules.target_spacing(spacings, np.array([[400, 512, 512]] * 11))[0] == pytest.approx(np.median(z))


def test_pool_and_conv_props_anisotropic_hand_computed() -> None:
    strides, kernels, patch, divisor = rules.pool_and_conv_props([5.0, 0.8, 0.8], [20, 160, 160])
    assert strides == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    assert kernels == [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    assert patch == [20, 160, 160] and divisor == [4, 32, 32]


def test_pool_and_conv_props_pads_patch_to_divisor() -> None:
    strides, _, patch, divisor = rules.pool_and_conv_props([1.0, 1.0, 1.0], [36, 50, 35])
    assert strides == [[1, 1, 1]] + [[2, 2, 2]] * 3
    assert patch == [40, 56, 40] and divisor == [8, 8, 8]


def test_hippocampus_like_plan_matches_nnunet() -> None:
    """nnU-Net v2.8.1 plans Task04 (median 36x50x35 at 1 mm, 200 cases) as 3d_fullres patch 40x56x40, batch 7,
    4 stages, and 2d patch 56x40, batch 281 (read from its nnUNetPlans.json for our copy of the data)."""
    fp = fake_fingerprint((36, 50, 35), (1.0, 1.0, 1.0), n_cases=200)
    plans = rules.plan_nnunet(fp, {"name": "fake"}, get_recipe("default"))
    full, two_d = plans.configurations["3d_fullres"], plans.configurations["2d"]
    assert (full.patch_size, full.batch_size, full.parameters) == ([40, 56, 40], 7, 5_601_545)
    assert (two_d.patch_size, two_d.batch_size, two_d.features_per_stage) == ([56, 40], 281, [32, 64, 128, 256])
    assert two_d.batch_dice and not full.batch_dice
    assert full.features_per_stage == [32, 64, 128, 256]
    assert full.kernel_sizes == [[3, 3, 3]] * 4
    assert "3d_lowres" not in plans.configurations
    assert full.normalization == [{"scheme": "zscore", "use_nonzero_mask": False}]


def test_patch_shrinks_to_fit_budget_and_estimate_uses_network_description() -> None:
    fp = fake_fingerprint((300, 300, 300), (1.0, 1.0, 1.0), n_cases=50)
    recipe = get_recipe("default")
    big = rules.plan_nnunet(fp, {"name": "fake"}, recipe, gpu_memory_gb=8).configurations["3d_fullres"]
    small = rules.plan_nnunet(fp, {"name": "fake"}, recipe, gpu_memory_gb=2).configurations["3d_fullres"]
    assert np.prod(small.patch_size) < np.prod(big.patch_size)
    for config, budget in ((big, 8), (small, 2)):
        kwargs = config.network.kwargs
        elements = DynamicUNet.feature_map_elements(config.patch_size, 1, 3, **kwargs)
        per_sample_gb = elements * rules.BYTES_PER_ELEMENT[3] / rules.GIB
        assert per_sample_gb * 2 <= budget  # the reference batch fits
        assert config.memory_estimate_gb == pytest.approx(per_sample_gb * config.batch_size, rel=1e-3)
        assert all(p % d == 0 for p, d in zip(config.patch_size, np.prod(config.strides, axis=0)))
    assert big.features_per_stage[-1] == 320  # capped


def test_batch_size_capped_by_five_percent_and_at_least_two() -> None:
    fp = fake_fingerprint((16, 16, 16), (1.0, 1.0, 1.0), n_cases=10)
    full = rules.plan_nnunet(fp, {"name": "fake"}, get_recipe("default")).configurations["3d_fullres"]
    # 5% of 10 * 16^3 voxels is 2048: less than one 16^3 patch, so the floor of 2 applies
    assert full.patch_size == [16, 16, 16] and full.batch_size == 2
    fp = fake_fingerprint((36, 50, 35), (1.0, 1.0, 1.0), n_cases=100)
    full = rules.plan_nnunet(fp, {"name": "fake"}, get_recipe("default")).configurations["3d_fullres"]
    assert full.batch_size == round(100 * 36 * 50 * 35 * 0.05 / (40 * 56 * 40))


def test_lowres_planned_for_large_images() -> None:
    fp = fake_fingerprint((400, 512, 512), (1.0, 0.8, 0.8), n_cases=30)
    plans = rules.plan_nnunet(fp, {"name": "fake"}, get_recipe("default"))
    assert "3d_lowres" in plans.configurations
    low, full = plans.configurations["3d_lowres"], plans.configurations["3d_fullres"]
    assert all(lo > fu for lo, fu in zip(low.spacing, full.spacing))
    assert np.prod(low.median_shape) < np.prod(full.median_shape) / 2


def test_ct_normalisation_and_nonzero_mask_rule() -> None:
    fp = fake_fingerprint((64, 64, 64), (1.0, 1.0, 1.0), channels=("CT", "T2"), crop_fraction=0.6)
    norm = build_normalization(get_recipe("default"), fp)
    assert norm[0] == {"scheme": "ct", "clip": [-1.0, 50.0], "mean": 10.0, "std": 2.0}
    assert norm[1] == {"scheme": "zscore", "use_nonzero_mask": True}


def test_2d_configuration_slices_along_the_coarse_axis() -> None:
    fp = fake_fingerprint((30, 256, 256), (4.0, 0.8, 0.8), n_cases=20)
    two_d = rules.plan_nnunet(fp, {"name": "fake"}, get_recipe("default")).configurations["2d"]
    assert two_d.spatial_dims == 2 and len(two_d.patch_size) == 2
    assert two_d.resampling["slice_axis"] == 0 and two_d.features_per_stage[-1] <= 512


def test_residual_recipe_plans_residual_network() -> None:
    fp = fake_fingerprint((128, 128, 128), (1.0, 1.0, 1.0))
    full = rules.plan_nnunet(fp, {"name": "fake"}, get_recipe("resenc_m")).configurations["3d_fullres"]
    kwargs = full.network.kwargs
    assert kwargs["block"] == "residual" and kwargs["n_blocks_per_stage"][:4] == [1, 3, 4, 6]
    assert len(kwargs["n_blocks_per_stage"]) == full.n_stages


def test_plans_json_round_trip(tmp_path) -> None:
    fp = fake_fingerprint((36, 50, 35), (1.0, 1.0, 1.0))
    plans = rules.plan_nnunet(fp, {"name": "fake"}, get_recipe("default"))
    plans.save(tmp_path / "plans.json")
    loaded = Plans.load(tmp_path / "plans.json")
    assert loaded.to_dict() == json.loads((tmp_path / "plans.json").read_text())
    assert loaded.configuration("3d_fullres").patch_size == [40, 56, 40]
    with pytest.raises(KeyError, match="available"):
        loaded.configuration("3d_cascade")
    assert not list(tmp_path.glob(".tmp-*"))


def _plan(fp: dict, *overrides: str) -> Plans:
    return rules.plan_nnunet(fp, {"name": "fake"}, get_recipe("default").with_overrides(list(overrides)))


def test_recipe_fixes_spacing_patch_and_batch() -> None:
    fp = fake_fingerprint((60, 200, 200), (2.5, 0.8, 0.8))
    default = _plan(fp).configurations["3d_fullres"]
    fixed = _plan(fp, "planning.target_spacing=[2.0, 1.0, 1.0]", "planning.patch_size_3d=[30, 100, 100]",
                  "planning.batch_size=1").configurations["3d_fullres"]
    assert fixed.spacing == [2.0, 1.0, 1.0] and fixed.batch_size == 1
    divisor = np.prod(fixed.strides, axis=0)  # padded up to what its pooling needs, never shrunk
    assert all(p % d == 0 and 0 <= p - w < d for p, w, d in zip(fixed.patch_size, (30, 100, 100), divisor))
    assert fixed.median_shape == [75, 160, 160] and default.batch_size >= 2
    assert fixed.memory_estimate_gb < default.memory_estimate_gb * 2


def test_recipe_chooses_widths_blocks_and_batch_floor() -> None:
    fp = fake_fingerprint((36, 50, 35), (1.0, 1.0, 1.0), n_cases=2)
    full = _plan(fp, "planning.base_features=16", "planning.max_features_3d=64", "planning.n_blocks_per_stage=[1, 2]",
                 "planning.n_conv_per_stage_decoder=1", "planning.min_batch_size=1").configurations["3d_fullres"]
    assert full.features_per_stage == [16, 32, 64, 64][: full.n_stages]
    assert full.network.kwargs["n_blocks_per_stage"] == [1] + [2] * (full.n_stages - 1)
    assert full.network.kwargs["n_conv_per_stage_decoder"] == 1
    # two tiny cases: 5% of the dataset's voxels is less than one patch, so only the floor of 1 holds the batch
    assert full.batch_size == 1 and _plan(fp).configurations["3d_fullres"].batch_size == 2


def test_recipe_normalisation_per_channel_or_for_all() -> None:
    fp = fake_fingerprint((64, 64, 64), (1.0, 1.0, 1.0), channels=("CT", "T2"), crop_fraction=0.6)
    both = _plan(fp, 'planning.normalization=["none"]').configurations["3d_fullres"].normalization
    assert both == [{"scheme": "none"}, {"scheme": "none"}]
    each = _plan(fp, 'planning.normalization=[{"name": "ct", "kwargs": {"clip": [-100, 200]}}, '
                     '{"name": "zscore", "kwargs": {"use_nonzero_mask": false}}]').configurations["2d"].normalization
    assert each == [{"scheme": "ct", "clip": [-100, 200], "mean": 10.0, "std": 2.0},
                    {"scheme": "zscore", "use_nonzero_mask": False}]
    with pytest.raises(ValueError, match="3 schemes for 2 channels"):
        _plan(fp, 'planning.normalization=["ct", "ct", "ct"]')


@pytest.mark.parametrize(("mode", "keep", "slice_spacing", "identifier"), [
    ("keep", True, 4.0, "2d"), ("target", False, 4.0, "2d_target"), ("in_plane", False, 0.8, "2d_in_plane")])
def test_2d_slice_axis_is_kept_or_resampled(mode: str, keep: bool, slice_spacing: float, identifier: str) -> None:
    fp = fake_fingerprint((30, 256, 256), (4.0, 0.8, 0.8))
    two_d = _plan(fp, f"planning.slice_axis_spacing_2d={mode}").configurations["2d"]
    assert two_d.resampling["keep_slice_axis_spacing"] is keep and two_d.data_identifier == identifier
    assert two_d.spacing == [slice_spacing, 0.8, 0.8] and two_d.resampling["slice_axis"] == 0


def test_networks_that_ask_for_it_get_the_patch_size() -> None:
    @registry.register_net("test_sized_unet")
    class SizedUNet(DynamicUNet):
        plan_patch_size = True

        def __init__(self, in_channels: int, num_classes: int, train_patch_size: list[int], **kwargs) -> None:
            super().__init__(in_channels, num_classes, **kwargs)
            self.train_patch_size = train_patch_size

    try:
        full = _plan(fake_fingerprint((36, 50, 35), (1.0, 1.0, 1.0)), "net.name=test_sized_unet"
                     ).configurations["3d_fullres"]
        assert full.network.kwargs["train_patch_size"] == full.patch_size
        assert "train_patch_size" not in _plan(fake_fingerprint((36, 50, 35), (1.0, 1.0, 1.0))).configurations[
            "3d_fullres"].network.kwargs
    finally:
        registry.unregister("nets", "test_sized_unet")


def test_a_normalisation_scheme_may_ask_for_the_dataset() -> None:
    seen = {}

    @registry.register_normalizer("test_windowed")
    class Windowed:
        @staticmethod
        def plan(stats, fingerprint, dataset, window=(-100, 200)):  # noqa: ANN001, ANN205
            seen["dataset"] = dataset
            return {"scheme": "test_windowed", "window": list(window)}

        @staticmethod
        def apply(channel, spec, mask=None):  # noqa: ANN001, ANN205
            return channel

    try:
        fp = fake_fingerprint((36, 50, 35), (1.0, 1.0, 1.0))
        plans = rules.plan_nnunet(fp, {"name": "fake", "root": "/data"}, get_recipe("default").with_overrides(
            ['planning.normalization=[{"name": "test_windowed", "kwargs": {"window": [0, 80]}}]']))
        assert plans.configurations["3d_fullres"].normalization == [{"scheme": "test_windowed", "window": [0, 80]}]
        assert seen["dataset"]["root"] == "/data"
    finally:
        registry.unregister("normalizers", "test_windowed")


def test_planning_whole_volumes_uses_the_uncropped_shapes() -> None:
    fp = fake_fingerprint((40, 100, 100), (1.0, 1.0, 1.0))
    for c in fp["cases"]:
        c["shape_after_crop"] = [30, 60, 60]
    cropped, whole = _plan(fp).configurations["3d_fullres"], _plan(fp, "planning.crop_to_nonzero=false"
                                                                      ).configurations["3d_fullres"]
    assert cropped.median_shape == [30, 60, 60] and cropped.crop_to_nonzero
    assert whole.median_shape == [40, 100, 100] and not whole.crop_to_nonzero
