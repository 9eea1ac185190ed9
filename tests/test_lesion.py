"""The ``lesion`` batch transform (Witanto et al. 2021's disease simulation): lesions stay inside one organ, the
labels, the seed, the offset's sign and size, 2D batches, and the recipe seam."""

from __future__ import annotations

import pytest
import torch

from decathlete.augment.lesion import lesion
from decathlete.recipes.base import Augmentation, Recipe, RecipeError, Spec, validate
from decathlete.registry import get

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(b: int = 3, spatial: tuple[int, ...] = (24, 24, 24), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (b, 1, *spatial) and labels: a ball (1), a box (2), background 0, a -1 slab along the first axis."""
    image = torch.randn(b, 1, *spatial, generator=torch.Generator().manual_seed(seed))
    label = torch.zeros(b, 1, *spatial, dtype=torch.long)
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in spatial], indexing="ij")
    for i in range(b):
        centre = [8.0] * (len(spatial) - 1) + [8.0 + i]
        ball = sum((g - c) ** 2 for g, c in zip(grids, centre)) <= 5.0**2
        label[i, 0][ball] = 1
        label[(i, 0, *[slice(13, 21)] * len(spatial))] = 2
    label[:, :, :2] = -1
    return image, label


def run(image: torch.Tensor, label: torch.Tensor, seed: int = 0, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return lesion(image, label, torch.Generator().manual_seed(seed), **kwargs)


def assert_inside_one_organ(image: torch.Tensor, label: torch.Tensor, out: torch.Tensor) -> None:
    """Every sample changed, and only within a single organ."""
    changed = (out != image).any(1)  # (B, *spatial)
    for i in range(image.shape[0]):
        assert changed[i].any(), f"sample {i} has no lesion at p=1"
        values = label[i, 0][changed[i]].unique()
        assert values.numel() == 1 and values.item() > 0, f"sample {i} changed labels {values.tolist()}"


def test_changes_stay_inside_one_organ_and_labels_are_kept() -> None:
    image, label = batch()
    original = image.clone(), label.clone()
    out, new_label = run(image, label, p=1.0)
    assert_inside_one_organ(image, label, out)
    assert torch.equal(new_label, label) and torch.equal(image, original[0]) and torch.equal(label, original[1])
    assert out.dtype == image.dtype and new_label.dtype == label.dtype
    organs = sum(len(set(label[i, 0][(out[i] != image[i]).any(0)].tolist())) for i in range(3))
    assert organs == 3  # one organ per sample


def test_lesion_label_marks_changed_voxels_of_the_chosen_organ() -> None:
    image, label = batch()
    for seed in range(4):
        out, new_label = run(image, label, seed=seed, p=1.0, lesion_label=9)
        for i in range(3):
            changed = (out[i] != image[i]).any(0)
            marked = new_label[i, 0] == 9
            assert marked.any() and (marked <= changed).all()
            assert label[i, 0][marked].unique().tolist() == label[i, 0][changed].unique().tolist()
            assert torch.equal(new_label[i, 0][~marked], label[i, 0][~marked])


def test_a_seed_reproduces_the_output() -> None:
    image, label = batch()
    first = run(image, label, seed=3, p=1.0, lesion_label=9)
    again = run(image, label, seed=3, p=1.0, lesion_label=9)
    other = run(image, label, seed=4, p=1.0, lesion_label=9)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_p_zero_and_samples_without_foreground_are_untouched() -> None:
    image, label = batch()
    out, new_label = run(image, label, p=0.0, lesion_label=9)
    assert torch.equal(out, image) and torch.equal(new_label, label)
    label[1, 0][label[1, 0] > 0] = 0  # sample 1: background and -1 only
    out, new_label = run(image, label, p=1.0, lesion_label=9)
    assert torch.equal(out[1], image[1]) and torch.equal(new_label[1], label[1])
    assert not torch.equal(out[0], image[0]) and not torch.equal(out[2], image[2])


def test_labels_restricts_the_organs() -> None:
    image, label = batch()
    for seed in range(4):
        out, _ = run(image, label, seed=seed, p=1.0, labels=[2])
        changed = (out != image).any(1)
        assert changed.any() and (label[:, 0][changed] == 2).all()


def test_2d_batches_keep_the_guarantees() -> None:
    image, label = batch(b=4, spatial=(32, 32))
    image = image.repeat(1, 2, 1, 1)  # two channels, the same change to each
    out, new_label = run(image, label, p=1.0, lesion_label=5)
    assert_inside_one_organ(image, label, out)
    assert torch.allclose(out[:, 0] - image[:, 0], out[:, 1] - image[:, 1])
    assert ((new_label == 5) <= (out != image).any(1, keepdim=True)).all()


@pytest.mark.parametrize("p_hypo", [0.0, 1.0])
def test_offset_sign_and_size(p_hypo: float) -> None:
    image, label = batch(b=4)
    for seed in range(3):
        out, _ = run(image, label, seed=seed, p=1.0, p_hypo=p_hypo, noise=0.0, offset=(1.2, 1.5))
        change = out - image
        assert (change <= 0).all() if p_hypo == 1.0 else (change >= 0).all()
        largest = change.abs().flatten(1).amax(1)  # w = 1 at the centre: the drawn offset itself
        assert ((largest >= 1.2 - 1e-5) & (largest <= 1.5 + 1e-5)).all(), largest


@pytest.mark.parametrize("extent", [24, 8])
def test_lesion_size_is_relative_to_the_organ(extent: int) -> None:
    image = torch.zeros(2, 1, 24, 24, 24)
    label = torch.zeros(2, 1, 24, 24, 24, dtype=torch.long)
    label[:, :, :extent, :extent, :extent] = 1
    radius = 0.25 * extent  # a ball whatever the rotation
    for seed in range(3):
        _, new_label = run(image, label, seed=seed, p=1.0, size=(0.25, 0.25), irregularity=0.0, lesion_label=9)
        for i in range(2):
            coords = (new_label[i, 0] == 9).nonzero()
            span = coords.amax(0) - coords.amin(0) + 1
            assert (span <= 2 * radius + 1).all() and coords.shape[0] <= 4.19 * (radius + 0.5) ** 3


def test_dtypes_are_kept() -> None:
    image, label = batch(b=2)
    out, new_label = run(image.double(), label.to(torch.int16), p=1.0, lesion_label=7)
    assert out.dtype == torch.float64 and new_label.dtype == torch.int16 and (new_label == 7).any()
    with pytest.raises(ValueError, match="softness"):
        run(image, label, softness=0.0)


def test_the_recipe_seam_checks_the_kwargs() -> None:
    assert get("transforms", "lesion") is lesion
    recipe = Recipe(name="x", augment=Augmentation(extra=(Spec("lesion", {"p": 0.5}),)))
    assert validate(recipe).augment.extra[0].kwargs == {"p": 0.5}
    bad = Recipe(name="x", augment=Augmentation(extra=(Spec("lesion", {"depth": 0.5}),)))
    with pytest.raises(RecipeError, match=r"augment.extra\[0\]: 'lesion' takes no depth; it takes p, labels, size"):
        validate(bad)
    supplied = Recipe(name="x", augment=Augmentation(extra=(Spec("lesion", {"generator": 0}),)))
    with pytest.raises(RecipeError, match="set by the framework"):
        validate(supplied)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_stay_on_the_device() -> None:
    image, label = batch()
    out, new_label = run(image.cuda().half(), label.cuda(), p=1.0, lesion_label=9)
    assert out.device.type == "cuda" and out.dtype == torch.float16 and new_label.device.type == "cuda"
    assert_inside_one_organ(image.half(), label, out.cpu())
    again, _ = run(image.cuda().half(), label.cuda(), p=1.0, lesion_label=9)
    assert torch.equal(out, again)
