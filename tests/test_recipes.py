"""The recipe as a typed contract: JSON round trips, dotted overrides, and errors that name the valid choices."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from decathlete import registry
from decathlete.recipes.base import (
    Inference,
    Planning,
    Recipe,
    RecipeError,
    Regions,
    Spec,
    accepted_kwargs,
    get_recipe,
    resolve_recipe,
    validate,
)


@pytest.mark.parametrize("name", registry.names("recipes"))
def test_every_registered_recipe_round_trips_through_json(name: str) -> None:
    recipe = validate(get_recipe(name))
    data = json.loads(json.dumps(recipe.to_dict()))
    assert Recipe.from_dict(data) == recipe
    assert set(data) == {"name", "net", "loss", "optimizer", "schedule", "epochs", "iterations_per_epoch", "grad_clip",
                         "planner", "planning", "regions", "augment", "sampler", "inference"}


def test_missing_fields_take_defaults_and_unknown_ones_are_named() -> None:
    assert Recipe.from_dict({"name": "x"}) == Recipe(name="x")
    with pytest.raises(RecipeError, match=r"unknown setting\(s\) epoch; valid: name, net, loss"):
        Recipe.from_dict({"name": "x", "epoch": 3})
    with pytest.raises(RecipeError, match="recipe.planning: unknown setting.*base_feature.*valid: target_spacing"):
        Recipe.from_dict({"name": "x", "planning": {"base_feature": 8}})
    with pytest.raises(RecipeError, match="recipe.epochs: expected int"):
        Recipe.from_dict({"name": "x", "epochs": "many"})
    with pytest.raises(RecipeError, match=r"recipe.planning.patch_size_3d: expected 3 values"):
        Recipe.from_dict({"name": "x", "planning": {"patch_size_3d": [64, 64]}})


def test_dotted_overrides_reach_every_kind_of_field() -> None:
    recipe = get_recipe("default").with_overrides([
        "optimizer.lr=3e-4", "augment.p_elastic=0.2", "augment.scale_range=[0.8, 1.2]", "planning.batch_size=1",
        "planning.target_spacing=[2.5, 0.8, 0.8]", "inference.tile_weighting=constant", "inference.step=0.25",
        "grad_clip=null", "epochs=7", "planner=nnunet", "loss.weight_ce=0.5",
        'planning.normalization=["ct", {"name": "zscore", "kwargs": {"use_nonzero_mask": true}}]',
        'regions={"regions": {"whole": [1, 2], "core": [2]}, "class_order": [1, 2]}',
        'sampler={"name": "patch", "kwargs": {"oversample_foreground": 0.5}}'])
    assert recipe.optimizer == Spec("sgd", {"lr": 3e-4, "momentum": 0.99, "nesterov": True, "weight_decay": 3e-5})
    assert recipe.augment.p_elastic == 0.2 and recipe.augment.scale_range == (0.8, 1.2)
    assert recipe.planning.batch_size == 1 and recipe.planning.target_spacing == (2.5, 0.8, 0.8)
    assert recipe.inference == Inference(Spec("constant", {}), 0.25)
    assert recipe.grad_clip is None and recipe.epochs == 7 and recipe.loss.kwargs["weight_ce"] == 0.5
    assert recipe.planning.normalization == (Spec("ct"), Spec("zscore", {"use_nonzero_mask": True}))
    assert recipe.regions == Regions({"whole": (1, 2), "core": (2,)}, (1, 2))
    assert recipe.sampler == Spec("patch", {"oversample_foreground": 0.5})
    assert validate(recipe) is recipe
    assert get_recipe("default").optimizer.kwargs["lr"] == 1e-2  # the registered recipe is untouched


@pytest.mark.parametrize(("assignment", "message"), [
    ("optimiser.lr=1", "unknown recipe setting 'optimiser.lr': a recipe takes name, net, loss, optimizer"),
    ("augment.p_elstic=0.2", "'augment' takes name, extra, p_rotation, rotation_deg"),
    ("inference.sigma=0.1", "'inference' takes tile_weighting, step, mirror_axes, tta"),
    ("planning.batch_size=0", "planning.batch_size must be at least 1"),
    ("planning.slice_axis_spacing_2d=iso", "must be keep, target or in_plane"),
    ("inference.step=1.5", r"inference.step must lie in \(0, 1\]"),
    ("regions.class_order=[1]", "'regions' is not set; set it whole"),
    ("epochs", "--set expects path=value"),
])
def test_bad_overrides_are_refused_with_the_valid_choices(assignment: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        get_recipe("default").with_overrides([assignment])


@pytest.mark.parametrize(("assignment", "message"), [
    ("optimizer.lrr=0.1", "optimizer: 'sgd' takes no lrr; it takes lr, momentum, dampening, weight_decay, nesterov"),
    ("net.strides=[[1, 1, 1]]", "net: strides is set by the framework"),
    ("loss.batchdice=true", "loss: 'dice_ce' takes no batchdice; it takes weight_ce, weight_dice, batch_dice"),
    ("inference.tile_weighting.fraction=0.5", "'gaussian' takes no fraction; it takes sigma_scale"),
    ("optimizer.name=lion", "no optimizer named 'lion' is registered .known: adam, adamw, sgd"),
    ("sampler.name=nope", "no sampler named 'nope'"),
    ('planning.normalization=["ct_typo"]', "no normalizer named 'ct_typo'"),
    ("planner=grid", "no planner named 'grid'"),
])
def test_validation_checks_components_and_their_kwargs(assignment: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        resolve_recipe("default", [assignment])


def test_accepted_kwargs_leave_out_what_the_framework_supplies() -> None:
    assert "params" not in accepted_kwargs("optimizers", "sgd")
    assert accepted_kwargs("tile_weights", "gaussian") == ["sigma_scale"]
    assert accepted_kwargs("normalizers", "ct") == ["clip", "statistics"]
    sampler = accepted_kwargs("samplers", "patch")
    assert "oversample_foreground" in sampler and "case_ids" not in sampler


def test_resolve_applies_values_after_overrides() -> None:
    recipe = resolve_recipe("tiny", ["epochs=3"], iterations_per_epoch=4, epochs=None)
    assert (recipe.epochs, recipe.iterations_per_epoch) == (3, 4)
    assert recipe.planning == Planning(base_features=8, max_features_3d=64, max_features_2d=128, gpu_memory_gb=0.5,
                                       ram_gb=1.5)
    assert recipe.differences(replace(recipe, epochs=9), ("net", "epochs")) == ["epochs"]
