"""Coarse-axis transposition (nnU-Net v2's ``transpose_forward``): plans put the thickest axis first, preprocessing
transposes each case into that order and inference transposes its prediction back onto the input's exact grid."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from decathlete import api
from decathlete.infer.predictor import Predictor, invert_preprocessing, predict_folder
from decathlete.io.images import read_label
from decathlete.planning import rules
from decathlete.planning.plans import Plans
from decathlete.preprocess import cache
from decathlete.preprocess.pipeline import preprocess_case, resolve_config
from decathlete.recipes.base import get_recipe
from decathlete.synthetic import make_synthetic_dataset
from synthetic import write_nifti
from test_planning import fake_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")


def _plan(shape: tuple[int, ...], spacing: tuple[float, ...]) -> Plans:
    return rules.plan_nnunet(fake_fingerprint(shape, spacing), {"name": "fake"}, get_recipe("default"))


# --- planning --------------------------------------------------------------------------------------------------


def test_sagittal_stack_is_planned_with_its_thick_axis_first() -> None:
    axial = _plan((30, 256, 256), (4.0, 0.8, 0.8))
    sagittal = _plan((256, 256, 30), (0.8, 0.8, 4.0))  # thick along array x (the file's first axis)
    assert axial.transpose_forward == axial.transpose_backward == [0, 1, 2]
    assert (sagittal.transpose_forward, sagittal.transpose_backward) == ([2, 0, 1], [1, 2, 0])
    full = sagittal.configurations["3d_fullres"]
    assert full.spacing == [4.0, 0.8, 0.8] and full.median_shape == [30, 256, 256]
    assert full.patch_size[0] < full.patch_size[1] == full.patch_size[2]
    assert full.kernel_sizes[0] == [1, 3, 3]  # no convolution across the thick axis in the first stage
    # the same volume stored another way round is planned exactly alike, in the transposed order
    for name, config in axial.configurations.items():
        assert asdict(sagittal.configurations[name]) == asdict(config), name
    assert sagittal.configurations["2d"].resampling["slice_axis"] == 0


@pytest.mark.parametrize(("spacing", "forward", "backward"), [
    ((1.0, 1.0, 1.0), [0, 1, 2], [0, 1, 2]),  # isotropic: identity
    ((3.0, 3.0, 1.0), [0, 1, 2], [0, 1, 2]),  # axis 0 ties for the coarsest: the first keeps its place
    ((0.8, 4.0, 0.8), [1, 0, 2], [1, 0, 2]),  # coronal
    ((1.0, 3.0, 3.0), [1, 0, 2], [1, 0, 2]),  # the first of the tied coarsest moves to the front
    ((0.7, 0.8, 5.0), [2, 0, 1], [1, 2, 0]),  # sagittal: the others keep their order
])
def test_transpose_axes_rule(spacing: tuple[float, ...], forward: list[int], backward: list[int]) -> None:
    assert rules.transpose_axes(np.array(spacing)) == (forward, backward)


# --- backwards compatibility -----------------------------------------------------------------------------------


def test_plans_and_caches_made_before_transposition_load_as_identity(tmp_path: Path) -> None:
    old = _plan((36, 50, 35), (1.0, 1.0, 1.0)).to_dict()
    del old["transpose_forward"], old["transpose_backward"]
    old["version"] = 1
    (tmp_path / "plans.json").write_text(json.dumps(old))
    plans = Plans.load(tmp_path / "plans.json")
    assert plans.transpose_forward == plans.transpose_backward == [0, 1, 2]
    assert plans.preprocessing_config("3d_fullres")["transpose_forward"] == [0, 1, 2]
    # identity adds nothing to the cache's settings, so cases preprocessed before the field existed stay complete
    config = asdict(plans.configuration("3d_fullres"))
    assert resolve_config(plans.preprocessing_config("3d_fullres")) == resolve_config(config)
    assert "transpose_forward" not in resolve_config(config)
    with pytest.raises(ValueError, match="undo"):
        Plans.from_dict({**plans.to_dict(), "transpose_forward": [2, 0, 1]})
    with pytest.raises(ValueError, match="permutation"):
        Plans.from_dict({**plans.to_dict(), "transpose_forward": [0, 0, 1]})


def test_old_cache_properties_invert_without_transposition() -> None:
    label = np.random.default_rng(0).integers(0, 3, (3, 4, 5))
    probabilities = np.eye(3, dtype=np.float32)[label].transpose(3, 0, 1, 2)
    old = {"shape_before_crop": [3, 4, 5], "shape_after_crop": [3, 4, 5], "crop_bbox": [[0, 3], [0, 4], [0, 5]],
           "target_spacing": [1.0, 1.0, 1.0], "spacing_after_crop": [1.0, 1.0, 1.0],
           "preprocessing": {"resampling": {"anisotropy_threshold": 3.0, "separate_axis_order": 0}}}
    np.testing.assert_array_equal(invert_preprocessing(probabilities, old, [0, 1, 2])[0], label)


# --- preprocessing and its inverse -----------------------------------------------------------------------------


def test_preprocessing_transposes_and_inversion_restores_the_label_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    shape, spacing = (6, 9, 12), (1.0, 1.0, 4.0)  # (z, y, x); thick along x = the NIfTI file's first axis
    box = (slice(1, 5), slice(2, 8), slice(3, 10))
    image = np.zeros(shape, np.float32)
    image[box] = rng.uniform(1, 2, image[box].shape)  # cropped to this box
    label = np.zeros(shape, np.uint8)
    label[box] = rng.integers(0, 3, image[box].shape)
    img = write_nifti(tmp_path / "img.nii.gz", image, spacing)
    lab = write_nifti(tmp_path / "lab.nii.gz", label, spacing)
    # the case's own spacing as the target: no resampling, so the round trip must be exact
    config = {"spacing": [4.0, 1.0, 1.0], "transpose_forward": [2, 0, 1]}
    pre = preprocess_case(img, lab, config, case_id="t")
    props = pre.properties
    assert pre.data.shape == (1, 7, 4, 6) and pre.data.flags.c_contiguous
    np.testing.assert_array_equal(pre.seg, label[box].transpose(2, 0, 1))
    assert props["transpose_forward"] == [2, 0, 1] and props["shape_before_crop"] == [12, 6, 9]
    assert props["crop_bbox"] == [[3, 10], [1, 5], [2, 8]] and props["spacing_after_crop"] == [4.0, 1.0, 1.0]
    assert props["geometry"]["shape"] == list(shape) and props["preprocessing"]["transpose_forward"] == [2, 0, 1]
    probabilities = np.eye(3, dtype=np.float32)[pre.seg].transpose(3, 0, 1, 2)  # the perfect prediction
    back, full = invert_preprocessing(probabilities, props, [0, 1, 2], return_probabilities=True)
    np.testing.assert_array_equal(back, label)
    assert full.shape == (3, *shape) and back.flags.c_contiguous
    np.testing.assert_array_equal(full.argmax(0), label)


# --- end to end ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sagittal_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Plan, preprocess and barely train (1 iteration) on stacks whose NIfTI first axis (array x) is the thick one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("transpose")
    data = make_synthetic_dataset(root / "raw", n_cases=4, shape=(40, 36, 14), spacing=(1.2, 1.2, 3.0))
    work = root / "work"
    try:
        api.plan(data, work, recipe="tiny", workers=1, progress=False, configurations=["3d_fullres"])
        api.preprocess(work, ["3d_fullres"], workers=1, progress=False)
        api.train(work, "3d_fullres", 0, epochs=1, iterations_per_epoch=1, val_iterations=1, device="cpu",
                  num_workers=0, progress=False)
    finally:
        torch.set_num_threads(threads)
    return work


def test_sagittal_dataset_round_trip_keeps_the_input_geometry(sagittal_work: Path, tmp_path: Path) -> None:
    plans = Plans.load(sagittal_work / "plans.json")
    assert plans.transpose_forward == [2, 0, 1]
    assert plans.configuration("3d_fullres").spacing[0] == pytest.approx(3.0)
    case = "synth_003"
    props = cache.read_properties(sagittal_work / "preprocessed" / "3d_fullres", case)
    assert props["shape_before_crop"] == [14, 40, 36] and props["geometry"]["shape"] == [40, 36, 14]
    raw = Path(plans.dataset["root"])
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(raw / "imagesTr" / f"{case}.nii.gz", inp / f"{case}.nii.gz")
    predict_folder(inp, tmp_path / "out", sagittal_work, device="cpu", progress=False, save_probabilities=True)
    src, out = nib.load(inp / f"{case}.nii.gz"), nib.load(tmp_path / "out" / f"{case}.nii.gz")
    assert out.shape == src.shape == (14, 36, 40) and np.array_equal(out.affine, src.affine)
    assert np.array_equal(out.header["pixdim"], src.header["pixdim"])
    with np.load(tmp_path / "out" / f"{case}.npz") as npz:
        assert npz["probabilities"].shape == (3, 40, 36, 14)


def test_perfect_prediction_in_the_transposed_order_lands_on_the_reference(sagittal_work: Path) -> None:
    raw = Path(Plans.load(sagittal_work / "plans.json").dataset["root"])
    image, reference = raw / "imagesTr" / "synth_000.nii.gz", raw / "labelsTr" / "synth_000.nii.gz"
    predictor = Predictor(sagittal_work, device="cpu")
    seg = preprocess_case(image, reference, predictor.preprocessing).seg
    onehot = np.eye(3, dtype=np.float32)[np.maximum(seg, 0)].transpose(3, 0, 1, 2)
    predictor.predict_probabilities = lambda data, progress=False: onehot  # an oracle: only geometry is tested
    label, _ = predictor.predict_case(image)
    truth, _ = read_label(reference)
    assert label.shape == truth.shape
    organ = (label > 0), (truth > 0)
    assert 2 * (organ[0] & organ[1]).sum() / (organ[0].sum() + organ[1].sum()) > 0.95


# --- real data ---------------------------------------------------------------------------------------------------

OPENKBP = Path(__file__).resolve().parents[2] / "shared" / "data" / "Task106_OpenKBP_HeadNeckCT"


@pytest.mark.integration
@pytest.mark.skipif(not OPENKBP.is_dir(), reason="../shared/data/Task106_OpenKBP_HeadNeckCT absent")
def test_openkbp_planned_with_its_coarse_in_plane_axis_first(tmp_path: Path) -> None:
    """OpenKBP's CT has 2.5 mm slices and ~4-5 mm in-plane voxels: array y (the coarsest, first of the tie) moves
    first, as nnU-Net's planner would, and a prediction still lands on the input's exact grid."""
    meta = json.loads((OPENKBP / "dataset.json").read_text())
    raw = tmp_path / "raw"
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True)
    training = meta["training"][:3]
    for entry in training:
        for key in ("image", "label"):
            (raw / entry[key]).symlink_to(OPENKBP / entry[key])
    (raw / "dataset.json").write_text(json.dumps({**meta, "training": training, "test": [], "numTraining": 3}))
    work = tmp_path / "work"
    api.plan(raw, work, recipe="tiny", workers=1, progress=False, configurations=["3d_fullres"])
    plans = Plans.load(work / "plans.json")
    assert plans.transpose_forward == [1, 0, 2]
    spacing = plans.configuration("3d_fullres").spacing
    assert spacing[0] == max(spacing) and spacing[1] < spacing[0]  # the 2.5 mm slices now on array axis 1
    api.preprocess(work, ["3d_fullres"], workers=1, progress=False)
    api.train(work, "3d_fullres", 0, epochs=1, iterations_per_epoch=1, val_iterations=1, device="cpu",
              num_workers=0, progress=False)
    source = OPENKBP / training[0]["image"]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / source.name).symlink_to(source)
    predict_folder(tmp_path / "in", tmp_path / "out", work, device="cpu", progress=False, tta=False)
    out, ref = nib.load(tmp_path / "out" / source.name), nib.load(source)
    assert out.shape == ref.shape and np.array_equal(out.affine, ref.affine)
