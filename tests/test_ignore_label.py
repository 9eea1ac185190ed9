"""nnU-Net v2's ignore label (sparse annotations): no output, no loss, no forced sample, no score for its voxels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from decathlete import api
from decathlete.crossval import cross_validate
from decathlete.data.sampling import PatchSampler
from decathlete.evaluate import evaluate_folder, ignore_label_from_dataset_json, labels_from_dataset_json
from decathlete.io.checkpoint import FINAL, load_checkpoint
from decathlete.io.images import read_label
from decathlete.labels import IGNORE_TARGET, LabelScheme
from decathlete.losses.base import LossContext, TrainingBatch
from decathlete.metrics.summary import case_metrics
from decathlete.nets.base import NetOutput
from decathlete.preprocess import cache
from decathlete.preprocess.pipeline import PreprocessedCase, sample_class_locations
from decathlete.registry import get
from decathlete.train.trainer import TrainOptions, train
from synthetic import make_nnunet_dataset, write_json, write_nifti

SOFTMAX = {"label_values": [0, 1, 2, 3], "labels": {"background": 0, "a": 1, "b": 2, "ignore": 3}}
REGIONS = {"label_values": [0, 1, 2, 3], "labels": {"background": 0, "ab": [1, 2], "b": 2, "ignore": 3},
           "regions": {"ab": [1, 2], "b": [2]}, "regions_class_order": [1, 2]}


def test_scheme_knows_the_ignore_label() -> None:
    labels = LabelScheme.from_dataset(SOFTMAX)
    assert labels.ignore_label == 3 and labels.label_values == (0, 1, 2) and labels.num_outputs == 3
    assert labels.evaluation_labels() == {"a": 1, "b": 2} and labels.output_values == [0, 1, 2]
    assert labels.loss_ignore_index == IGNORE_TARGET
    label = torch.tensor([0, 1, 2, 3, -1]).view(1, 1, 5, 1, 1)
    assert labels.targets(label).flatten().tolist() == [0, 1, 2, IGNORE_TARGET, 0]  # outside (-1) is background
    regions = LabelScheme.from_dataset(REGIONS)
    assert regions.ignore_label == 3 and regions.num_outputs == 2 and list(regions.regions) == ["ab", "b"]
    assert regions.targets(label)[0, :, :, 0, 0].tolist() == [[0, 1, 1, IGNORE_TARGET, 0], [0, 0, 1, IGNORE_TARGET, 0]]
    plain = LabelScheme.from_dataset({"label_values": [0, 1], "labels": {"background": 0, "a": 1}})
    assert plain.ignore_label is None and plain.loss_ignore_index is None and plain.num_outputs == 2


def test_pseudo_dice_leaves_ignored_voxels_out() -> None:
    labels = LabelScheme.from_dataset(SOFTMAX)
    label = torch.tensor([1, 1, 3, 3, 0]).view(1, 1, 5, 1, 1)
    predicted = torch.tensor([1, 0, 1, 2, 2])  # the two predictions on ignored voxels count nowhere
    logits = torch.nn.functional.one_hot(predicted, 3).T.reshape(1, 3, 5, 1, 1).float()
    assert labels.pseudo_dice_counts(logits, label).tolist() == [[1, 0], [0, 1], [1, 0]]  # tp, fp, fn of a, b
    regions = LabelScheme.from_dataset(REGIONS)
    sigmoid = torch.tensor([[9, -9, 9, 9, -9], [-9, -9, 9, -9, 9]], dtype=torch.float).view(1, 2, 5, 1, 1)
    assert regions.pseudo_dice_counts(sigmoid, label).tolist() == [[1, 0], [0, 1], [1, 0]]


def _loss_with_ignore(dataset: dict, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    labels = LabelScheme.from_dataset(dataset)
    loss = LossContext(labels, [1.0], batch_dice=False).logits_loss("dice_ce")
    return loss(NetOutput.of(logits), TrainingBatch(torch.zeros(0), label, [labels.targets(label)]))


@pytest.mark.parametrize("dataset", [SOFTMAX, REGIONS], ids=["softmax", "regions"])
def test_loss_equals_the_loss_on_the_annotated_voxels(dataset: dict) -> None:
    gen = torch.Generator().manual_seed(0)
    label = torch.randint(0, 3, (2, 1, 4, 5, 6), generator=gen)
    label[..., :2] = 3  # the first two x columns are unannotated
    n_out = LabelScheme.from_dataset(dataset).num_outputs
    logits = torch.randn((2, n_out, 4, 5, 6), generator=gen)
    subset_labels = LabelScheme.from_dataset({**dataset, "labels": {}, "label_values": [0, 1, 2]})
    subset = label[..., 2:]
    reference = get("losses", "dice_bce" if dataset is REGIONS else "dice_ce")(batch_dice=False)
    expected = reference(logits[..., 2:], subset_labels.targets(subset))
    torch.testing.assert_close(_loss_with_ignore(dataset, logits, label), expected)
    # whatever the network says on ignored voxels does not matter
    changed = logits.clone()
    changed[..., :2] = 100 * torch.randn((2, n_out, 4, 5, 2), generator=gen)
    torch.testing.assert_close(_loss_with_ignore(dataset, changed, label), expected)


def test_case_metrics_leave_ignored_reference_voxels_out() -> None:
    ref = np.array([1, 1, 1, 0, 0, 3, 3, 3]).reshape(1, 2, 4)
    pred = np.array([1, 1, 0, 1, 0, 1, 1, 0]).reshape(1, 2, 4)
    m = case_metrics(pred, ref, (1.0, 1.0, 1.0), {"a": 1}, ignore_label=3)["a"]
    # annotated voxels: tp 2, fp 1, fn 1, tn 1; the two 1s predicted on ignored voxels are no false positives
    assert (m["tp"], m["fp"], m["fn"], m["tn"], m["n_pred"]) == (2, 1, 1, 1, 3)
    assert m["dice"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert case_metrics(pred, ref, (1.0, 1.0, 1.0), {"a": 1})["a"]["fp"] == 3  # without it they are


def test_evaluate_folder_with_an_ignore_label(tmp_path: Path) -> None:
    dataset = write_json(tmp_path / "ds" / "dataset.json",
                         {"labels": {"background": 0, "a": 1, "ignore": 2}, "channel_names": {"0": "CT"}})
    assert labels_from_dataset_json(dataset) == {"a": 1} and ignore_label_from_dataset_json(dataset) == 2
    msd = write_json(tmp_path / "msd.json", {"labels": {"0": "background", "1": "a", "2": "ignore"}})
    assert labels_from_dataset_json(msd) == {"a": 1} and ignore_label_from_dataset_json(msd) == 2
    ref = np.zeros((4, 6, 6), dtype=np.uint8)
    ref[1:3, 1:4, 1:4] = 1  # 18 voxels
    ref[:, :, 5] = 2  # a fully unannotated column
    pred = np.zeros_like(ref)
    pred[1:3, 1:4, 1:3] = 1  # 12 of the 18
    pred[:, :, 4:] = 1  # 24 voxels: 4 x 6 annotated background (false positives) and 24 on ignored voxels
    write_nifti(tmp_path / "ref" / "c.nii.gz", ref)
    write_nifti(tmp_path / "pred" / "c.nii.gz", pred)
    summary = evaluate_folder(tmp_path / "pred", tmp_path / "ref", labels_from_dataset_json(dataset), plots=False,
                              ignore_label=ignore_label_from_dataset_json(dataset))
    assert summary["mean"]["a"]["dice"] == pytest.approx(2 * 12 / (12 + 24 + 18))
    auto = evaluate_folder(tmp_path / "pred", tmp_path / "ref", plots=False, ignore_label=2)
    assert list(auto["labels"]) == ["1"]  # the ignore value is no label


def test_forced_samples_never_target_the_ignore_label(tmp_path: Path) -> None:
    seg = np.full((6, 8, 8), 3, dtype=np.int8)  # mostly unannotated
    seg[0, 0, 0] = 1
    image = np.zeros((1, *seg.shape), dtype=np.float32)
    cache.write_case(tmp_path, "sparse", PreprocessedCase(image, seg, {}, sample_class_locations(seg, seed=0)))
    sampler = PatchSampler(tmp_path, ["sparse"], (2, 2, 2), oversample_foreground=1.0, ignore_label=3)
    rng = np.random.default_rng(0)
    classes = {m["class"] for _ in range(10) for m in sampler.sample_batch(2, rng)[2]}
    assert classes == {1}
    assert PatchSampler(tmp_path, ["sparse"], (2, 2, 2), oversample_foreground=1.0)._eligible(
        {1: np.zeros((1, 3)), 3: np.zeros((5, 3))}) == [1, 3]


@pytest.mark.usefixtures("one_thread")
def test_training_with_an_ignore_label_end_to_end(tmp_path: Path) -> None:
    labels = {"background": 0, "organ": 1, "ignore": 2}
    data = make_nnunet_dataset(tmp_path / "raw", n_cases=4, channels=1, shape=(16, 24, 24), labels=labels)
    assert api.validate(data) == []
    plans = api.plan(data, tmp_path / "work", recipe="tiny", workers=1, progress=False)
    assert LabelScheme.from_dataset(plans.dataset).num_outputs == 2
    api.preprocess(tmp_path / "work", ["3d_fullres"], workers=1, progress=False)
    summary = train(tmp_path / "work", TrainOptions("3d_fullres", 0, epochs=1, iterations_per_epoch=3,
                                                    val_iterations=1, device="cpu", num_workers=0, progress=False))
    state = load_checkpoint(Path(summary["folder"]) / FINAL)
    assert len(state["state"]["history"]["pseudo_dice_per_class"][-1]) == 1  # the organ only
    assert np.isfinite(state["state"]["history"]["train_loss"]).all()
    result = cross_validate(tmp_path / "work", folds=[0], device="cpu", tta=False, progress=False)
    assert list(result["mean"]) == ["organ"]  # scored without the ignore label
    predictions = sorted((Path(summary["folder"]) / "validation").glob("*.nii.gz"))
    assert predictions
    for prediction in predictions:
        assert set(np.unique(read_label(prediction)[0])) <= {0, 1}  # never the ignore value
