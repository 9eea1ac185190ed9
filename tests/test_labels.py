"""The outputs' meaning in one object: softmax classes or nested sigmoid regions, targets, pseudo-Dice, painting."""

from __future__ import annotations

import torch

from decathlete.labels import LabelScheme, check_regions

MSD = {"label_values": [0, 1, 2, 3], "labels": {"background": 0, "edema": 1, "non-enhancing": 2, "enhancing": 3}}
BRATS = {**MSD, "regions": {"whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing tumour": [3]},
         "regions_class_order": [1, 2, 3]}


def test_softmax_classes() -> None:
    labels = LabelScheme.from_dataset(MSD)
    assert not labels.region_based and labels.num_outputs == 4 and labels.nonlinearity == "softmax"
    assert labels.output_values == [0, 1, 2, 3]
    assert labels.evaluation_labels() == {"edema": 1, "non-enhancing": 2, "enhancing": 3}
    label = torch.tensor([[[-1, 0, 1, 3]]])
    assert labels.targets(label).tolist() == [[[0, 0, 1, 3]]]  # "outside" is background


def test_nested_regions_from_a_label_map() -> None:
    labels = LabelScheme.from_dataset(BRATS)
    assert labels.region_based and labels.num_outputs == 3 and labels.nonlinearity == "sigmoid"
    assert labels.output_values == [1, 2, 3]
    assert labels.evaluation_labels() == {"whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing tumour": [3]}
    label = torch.tensor([[[0, 1, 2, 3, -1]]])[:, None]  # (B, 1, 1, 5)
    assert labels.targets(label)[0, :, 0].tolist() == [[0, 1, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 0]]


def test_pseudo_dice_counts_by_hand() -> None:
    label = torch.tensor([0, 1, 1, 2, -1]).view(1, 1, 5)
    softmax = LabelScheme.from_dataset({"label_values": [0, 1, 2], "labels": {}})
    logits = torch.zeros(1, 3, 5)
    logits[0, [0, 1, 2, 2, 1], torch.arange(5)] = 5  # predicted 0, 1, 2, 2, (1 where outside: counts nowhere)
    assert softmax.pseudo_dice_counts(logits, label).tolist() == [[1, 1], [0, 1], [1, 0]]  # tp / fp / fn, classes 1-2
    regions = LabelScheme.from_dataset({"label_values": [0, 1, 2], "labels": {}, "regions": {"any": [1, 2], "two": [2]},
                                        "regions_class_order": [1, 2]})
    sigmoid = torch.tensor([[-5, 5, -5, 5, 5], [-5, -5, -5, 5, 5]], dtype=torch.float32)[None]
    assert regions.pseudo_dice_counts(sigmoid, label).tolist() == [[2, 1], [0, 0], [1, 0]]


def test_activation_in_place() -> None:
    logits = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    probs = LabelScheme.from_dataset(MSD).activate_(logits.clone())
    torch.testing.assert_close(probs, torch.softmax(logits, 0))
    torch.testing.assert_close(LabelScheme.from_dataset(BRATS).activate_(logits.clone()), logits.sigmoid())


def test_region_definitions_are_checked_against_the_labels() -> None:
    assert check_regions(BRATS["regions"], [1, 2, 3], [0, 1, 2, 3]) == []
    problems = check_regions({"a": [1, 4], "b": [0]}, [2, 0, 9], [0, 1, 2])
    assert any("3 entries for 2 regions" in p for p in problems)
    assert any("region 'a' [1, 4]" in p for p in problems) and any("region 'b' [0]" in p for p in problems)
    assert any("paints label 2, which it does not contain" in p for p in problems)
