"""Metrics: hand-computed overlap, anisotropic surface distances (axis order!), empty masks, regions, MONAI check."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from decathlete.metrics import METRICS, case_metrics, label_metrics, overlap_metrics, surface_metrics
from decathlete.metrics.surface import distances_to, surfel_area_table

# MONAI is a test extra, so the agreement is checked wherever the suite runs (CI included).
HAS_MONAI = importlib.util.find_spec("monai") is not None
ANISO = (3.0, 1.0, 1.0)  # (z, y, x) mm: slices 3 mm apart


def cube(shape=(12, 12, 12), lo=(3, 3, 3), size=6) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[lo[0] : lo[0] + size, lo[1] : lo[1] + size, lo[2] : lo[2] + size] = True
    return m


def test_two_cubes_overlap_by_hand():
    pred = cube((10, 10, 10), (2, 2, 2), 4)
    ref = cube((10, 10, 10), (3, 2, 2), 4)  # shifted one voxel along z: 3 of 4 slices overlap
    m = overlap_metrics(pred, ref, spacing=(2.0, 1.0, 0.5))
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (48, 16, 16, 1000 - 80)
    assert (m["n_pred"], m["n_ref"]) == (64, 64)
    assert m["dice"] == pytest.approx(96 / 128) and m["iou"] == pytest.approx(48 / 80)
    assert m["sensitivity"] == pytest.approx(0.75) and m["precision"] == pytest.approx(0.75)
    assert m["volume_pred_mm3"] == pytest.approx(64.0) and m["volume_ref_mm3"] == pytest.approx(64.0)


@pytest.mark.parametrize(("axis", "expected_mm"), [(0, 3.0), (1, 1.0), (2, 1.0)])
def test_hd95_uses_array_axis_order_spacing(axis, expected_mm):
    ref = cube()
    pred = np.roll(ref, 1, axis=axis)  # one voxel along `axis`; spacing (z=3, y=1, x=1)
    assert surface_metrics(pred, ref, ANISO)["hd95"] == pytest.approx(expected_mm)
    assert surface_metrics(ref, pred, ANISO)["hd95"] == pytest.approx(expected_mm)  # symmetric


def test_nsd_tolerance_and_shift_direction():
    ref = cube()
    assert surface_metrics(ref, ref, ANISO, tolerance_mm=0.0)["nsd"] == pytest.approx(1.0)
    shift_x, shift_z = np.roll(ref, 1, axis=2), np.roll(ref, 1, axis=0)  # 1 mm and 3 mm shifts
    assert surface_metrics(shift_x, ref, ANISO, tolerance_mm=1.5)["nsd"] == pytest.approx(1.0)  # shift < tau
    assert surface_metrics(shift_z, ref, ANISO, tolerance_mm=1.5)["nsd"] < 0.9  # shift > tau
    assert surface_metrics(shift_z, ref, ANISO, tolerance_mm=3.0)["nsd"] == pytest.approx(1.0)  # d <= tau counts
    assert surface_metrics(shift_x, ref, ANISO, tolerance_mm=0.5)["nsd"] < 0.9


def test_surfel_areas_scale_with_spacing():
    # A face normal to z (code 0b11110000: the 4 voxels at dz=0 inside) has area proportional to y*x spacing.
    flat_z, flat_x = 0b11110000, 0b10101010
    a1, a2 = surfel_area_table((1.0, 1.0, 1.0)), surfel_area_table((3.0, 2.0, 0.5))
    assert a1[flat_z] == pytest.approx(1.0) and a2[flat_z] == pytest.approx(2.0 * 0.5)
    assert a2[flat_x] == pytest.approx(3.0 * 2.0)
    assert a1[0] == a1[255] == 0 and np.allclose(a2, a2[::-1])  # inside/outside swap keeps the area


def test_kdtree_distances_equal_the_distance_transform():
    rng = np.random.default_rng(3)
    points, target = rng.random((9, 11, 13)) < 0.05, rng.random((9, 11, 13)) < 0.02
    target[4, 5, 6] = True
    edt = ndimage.distance_transform_edt(~target, sampling=ANISO)[points]
    assert np.allclose(distances_to(points, target, ANISO), edt, rtol=0, atol=1e-9)


def test_empty_mask_conventions():
    shape = (4, 5, 6)
    empty, full = np.zeros(shape, bool), np.zeros(shape, bool)
    full[1:3, 1:3, 1:3] = True
    both = label_metrics(empty, empty, ANISO)
    assert (both["dice"], both["iou"], both["nsd"], both["hd95"]) == (1.0, 1.0, 1.0, 0.0)
    assert (both["sensitivity"], both["precision"], both["tn"]) == (1.0, 1.0, 120)
    diagonal = math.sqrt((4 * 3.0) ** 2 + 5**2 + 6**2)
    for pred, ref in ((full, empty), (empty, full)):
        one = label_metrics(pred, ref, ANISO)
        assert (one["dice"], one["iou"], one["nsd"], one["sensitivity"], one["precision"]) == (0, 0, 0, 0, 0)
        assert one["hd95"] == pytest.approx(diagonal)
    for m in (both, label_metrics(full, empty, ANISO), label_metrics(empty, full, ANISO)):
        assert list(m) == list(METRICS) and all(math.isfinite(v) for v in m.values())


def test_regions_are_unions_of_labels():
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[2:6, 2:6, 2:6], ref[6:8, 2:6, 2:6] = 1, 2
    pred = ref.copy()
    pred[6:8, 2:6, 2:6] = 1  # label 2 predicted as 1: wrong labels, right region
    m = case_metrics(pred, ref, (1.0, 1.0, 1.0), {"one": 1, "two": 2, "whole": [1, 2]}, {"two": 2.0})
    assert m["whole"]["dice"] == 1.0 and m["whole"]["hd95"] == 0.0 and m["whole"]["n_ref"] == 96
    assert m["two"]["dice"] == 0.0 and m["two"]["n_pred"] == 0
    assert m["one"]["dice"] == pytest.approx(2 * 64 / (96 + 64))
    with pytest.raises(ValueError, match="unknown labels"):
        case_metrics(pred, ref, (1.0, 1.0, 1.0), {"one": 1}, {"on": 2.0})


def _random_blobs(rng: np.random.Generator, n: int) -> list[dict]:
    cases = []
    for i in range(n):
        shape = tuple(int(s) for s in rng.integers(16, 30, 3))

        def blob(shape=shape) -> np.ndarray:
            x = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
            return x > np.quantile(x, rng.uniform(0.75, 0.95))

        ref = blob()
        # Unrelated blobs, a dilated copy and a noisy copy: far, near and exact surfaces; many touch the border.
        pred = [blob, lambda r=ref: ndimage.binary_dilation(r), lambda r=ref: r ^ (rng.random(r.shape) < 0.02)][i % 3]
        pred = pred()
        spacing = tuple(float(s) for s in np.round(rng.uniform(0.4, 3.5, 3), 3))
        cases.append({"pred": pred, "ref": ref, "spacing": spacing, "tau": float(rng.uniform(0.5, 4.0))})
    return cases


MONAI_SCRIPT = """
import json, sys, numpy as np
try:
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice
except ImportError as e:
    print("IMPORT-FAILED", e)
    sys.exit(3)
out = []
for c in json.load(open(sys.argv[1])):
    p = torch.from_numpy(np.load(c["pred"]))[None, None].float()
    r = torch.from_numpy(np.load(c["ref"]))[None, None].float()
    nsd = compute_surface_dice(p, r, [c["tau"]], include_background=True, spacing=c["spacing"], use_subvoxels=True)
    hd = compute_hausdorff_distance(p, r, include_background=True, percentile=95, directed=False, spacing=c["spacing"])
    out.append({"nsd": nsd.item(), "hd95": hd.item()})
print(json.dumps(out))
"""


@pytest.mark.slow  # ~10 s, nearly all of it MONAI's import
def test_agrees_with_monai(tmp_path):
    """NSD vs compute_surface_dice(use_subvoxels=True), HD95 vs compute_hausdorff_distance(percentile=95)."""
    if not HAS_MONAI:
        pytest.skip("MONAI is not installed in this environment: pip install -e '.[test]'")
    cases = _random_blobs(np.random.default_rng(7), 10)
    spec = []
    for i, c in enumerate(cases):
        np.save(tmp_path / f"p{i}.npy", c["pred"])
        np.save(tmp_path / f"r{i}.npy", c["ref"])
        spec.append({"pred": str(tmp_path / f"p{i}.npy"), "ref": str(tmp_path / f"r{i}.npy"),
                     "spacing": list(c["spacing"]), "tau": c["tau"]})  # fmt: skip
    (tmp_path / "cases.json").write_text(json.dumps(spec))
    (tmp_path / "monai_metrics.py").write_text(MONAI_SCRIPT)
    run = subprocess.run([sys.executable, str(tmp_path / "monai_metrics.py"), str(tmp_path / "cases.json")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    if run.returncode == 3 and "IMPORT-FAILED" in run.stdout:
        pytest.fail(f"MONAI is installed but does not import: {run.stdout.strip()[-200:]}")
    assert run.returncode == 0, run.stderr[-2000:]
    monai = json.loads(run.stdout.strip().splitlines()[-1])
    ours = [surface_metrics(c["pred"], c["ref"], c["spacing"], c["tau"]) for c in cases]
    nsd_diff = max(abs(o["nsd"] - m["nsd"]) for o, m in zip(ours, monai))
    hd_diff = max(abs(o["hd95"] - m["hd95"]) / max(1.0, m["hd95"]) for o, m in zip(ours, monai))
    # MONAI computes in float32; the definitions are the same, so only rounding separates the results.
    assert nsd_diff < 1e-4, [(o["nsd"], m["nsd"]) for o, m in zip(ours, monai)]
    assert hd_diff < 1e-4, [(o["hd95"], m["hd95"]) for o, m in zip(ours, monai)]
    assert len({round(o["nsd"], 3) for o in ours}) > 5  # the cases really differ
