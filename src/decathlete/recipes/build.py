"""Build a run's components from its recipe and plans, all through the registry: network, loss, optimiser, schedule,
augmentation, sampler, normalisation and tile weighting.

Training, the budget probe, prediction and planning all build here, so each component is made one way only.
"""

from __future__ import annotations

import fnmatch
import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from decathlete import registry
from decathlete.augment import AugmentConfig
from decathlete.augment.presets import sampling_size
from decathlete.data.sampling import rank_oversample_fraction
from decathlete.labels import LabelScheme, check_regions
from decathlete.losses.base import LossContext, TrainingLoss
from decathlete.losses.deep_supervision import ds_weights
from decathlete.planning.plans import Configuration, Plans
from decathlete.recipes.base import PLAN_FIELDS, Recipe, RecipeError, Spec, get_recipe


def input_channels(config: Configuration, plans: Plans) -> int:
    """The network's input channels: the dataset's, and for a cascade stage one more per foreground label (its
    previous stage's prediction, one-hot)."""
    n = len(plans.dataset["channel_names"])
    return n + len(LabelScheme.from_dataset(plans.dataset).foreground_values) if config.previous_stage else n


def build_network(config: Configuration, plans: Plans) -> torch.nn.Module:
    """The registered network the plan describes (the same description the memory estimate used)."""
    labels = LabelScheme.from_dataset(plans.dataset)
    return registry.build("nets", config.network.name, in_channels=input_channels(config, plans),
                          num_classes=labels.num_outputs, **config.network.kwargs)


def loss_context(config: Configuration, plans: Plans, world_size: int = 1) -> LossContext:
    """What the recipe's loss learns about the run: outputs, deep-supervision weights, the plan's batch Dice."""
    n_outputs = len(config.strides) - 1
    # Under DDP every head needs a gradient: a tiny weight instead of 0 for the lowest one (nnU-Net's trick).
    weights = ds_weights(n_outputs, last_weight=1e-6 if world_size > 1 else 0.0)
    voxels = {int(v): int(n) for v, n in plans.fingerprint_summary.get("class_voxels", {}).items()}
    return LossContext(LabelScheme.from_dataset(plans.dataset), weights, config.batch_dice, voxels,
                       distributed=world_size > 1)


def build_loss(recipe: Recipe, config: Configuration, plans: Plans, world_size: int = 1) -> TrainingLoss:
    """The recipe's loss as the training step calls it, ``loss(output, batch)`` (`decathlete.losses.base`)."""
    context = loss_context(config, plans, world_size)
    entry = registry.get("losses", recipe.loss.name)
    if isinstance(entry, type) and issubclass(entry, TrainingLoss):
        return entry(**recipe.loss.kwargs, context=context)
    return context.logits_loss(recipe.loss.name, recipe.loss.kwargs)


def build_optimizer(recipe: Recipe, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The recipe's optimiser over the model's parameters."""
    return registry.build("optimizers", recipe.optimizer.name, params=model.parameters(), **recipe.optimizer.kwargs)


def build_schedule(recipe: Recipe) -> Callable[[int, int], float]:
    """The recipe's learning-rate schedule: ``(step, total) -> factor`` of the optimiser's base ``lr``."""
    return registry.build("schedules", recipe.schedule.name, **recipe.schedule.kwargs)


def base_learning_rate(recipe: Recipe) -> float:
    return float(recipe.optimizer.kwargs.get("lr", 1e-2))


def build_augmentation(recipe: Recipe, config: Configuration) -> tuple[AugmentConfig, tuple[int, ...]]:
    """The recipe's augmentation for this configuration (preset + overrides) and the crop size it needs; channels
    the plan normalises inside the nonzero mask are re-masked after augmentation (``mask_channels``)."""
    base = registry.build("augmentations", recipe.augment.name, configuration=config)
    masked = tuple(c for c, spec in enumerate(getattr(config, "normalization", None) or [])
                   if spec.get("use_nonzero_mask"))
    base = replace(base, mask_channels=masked)
    overrides = {k: v for k, v in asdict(recipe.augment).items() if k not in ("name", "extra") and v is not None}
    augmentation = replace(base, **overrides)
    return augmentation, sampling_size(augmentation, config.patch_size)


def build_transforms(recipe: Recipe) -> list[Callable[..., Any]]:
    """The recipe's extra batch transforms, ``(image, label, generator) -> (image, label)``, in order."""
    return [partial(registry.get("transforms", spec.name), **spec.kwargs) for spec in recipe.augment.extra]


def mirror_axes(recipe: Recipe, config: Configuration) -> tuple[int, ...]:
    """Test-time mirroring axes: the recipe's, or the patch axes mirrored in training (nnU-Net: all of them)."""
    if recipe.inference.mirror_axes is not None:
        return tuple(recipe.inference.mirror_axes)
    augmentation, _ = build_augmentation(recipe, config)
    if augmentation.p_mirror <= 0:
        return ()
    return tuple(range(config.spatial_dims)) if augmentation.mirror_axes is None else tuple(augmentation.mirror_axes)


def build_sampler(recipe: Recipe, config: Configuration, cases_dir: Path, case_ids: Sequence[str],
                  input_size: Sequence[int], rank: int = 0, world_size: int = 1,
                  ignore_label: int | None = None, previous_stage: Path | None = None) -> Any:
    """The recipe's patch sampler over ``case_ids`` of the preprocessed folder, crops of ``input_size``.

    Under DDP (``world_size`` > 1) a sampler taking ``oversample_foreground`` gets this rank's share of the forced
    samples, so that the global batch (the plan's ``batch_size``) has the recipe's fraction
    (`rank_oversample_fraction`). A sampler taking ``ignore_label`` gets the dataset's (`LabelScheme.ignore_label`),
    which it never targets. A cascade stage's sampler gets the folder of its previous stage's labels
    (`decathlete.data.cascade`); one that cannot take it is refused.
    """
    kwargs = dict(recipe.sampler.kwargs)
    entry = registry.get("samplers", recipe.sampler.name)
    parameters = inspect.signature(entry).parameters
    fraction = parameters.get("oversample_foreground")
    if world_size > 1 and fraction is not None:
        wanted = float(kwargs.get("oversample_foreground", fraction.default))
        kwargs["oversample_foreground"] = rank_oversample_fraction(wanted, config.batch_size, world_size, rank)
    if ignore_label is not None and "ignore_label" in parameters:
        kwargs["ignore_label"] = ignore_label
    if previous_stage is not None:
        if "previous_stage" not in parameters:
            raise RecipeError(f"recipe '{recipe.name}' samples with '{recipe.sampler.name}', which cannot read a "
                              "cascade's previous stage (no previous_stage argument); train the cascade with a "
                              "recipe whose sampler is a PatchSampler")
        kwargs["previous_stage"] = previous_stage
    return entry(case_dir=cases_dir, case_ids=list(case_ids), input_size=input_size, patch_size=config.patch_size,
                 spatial_dims=config.spatial_dims, slice_axis=int(config.resampling.get("slice_axis", 0)), **kwargs)


def build_tile_weights(recipe: Recipe) -> Callable[[Sequence[int]], torch.Tensor]:
    """The recipe's tile weighting, ``patch_size -> weight map``."""
    spec = recipe.inference.tile_weighting
    return partial(registry.get("tile_weights", spec.name), **spec.kwargs)


def _by_channel_name(name: str) -> Spec:
    """nnU-Net's rule: ``CT`` channels get CT normalisation, ``noNorm`` none, everything else a z-score (names are
    matched case-insensitively, as nnU-Net does)."""
    name = name.strip().lower()
    return Spec("none") if name in ("nonorm", "none") else Spec("ct") if name == "ct" else Spec("zscore")


def build_normalization(recipe: Recipe, fingerprint: dict[str, Any],
                        dataset: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One normalisation spec per channel for plans.json: the recipe's schemes, or nnU-Net's rule by channel name.

    A scheme's ``plan`` gets the channel's fingerprint statistics, the fingerprint, the recipe's kwargs, and, when
    it takes a ``dataset`` argument, the dataset summary (its ``root`` and cases, to measure what the fingerprint
    does not hold).
    """
    channels = fingerprint["foreground_intensity"]
    chosen = recipe.planning.normalization
    if chosen and len(chosen) not in (1, len(channels)):
        raise RecipeError(f"planning.normalization names {len(chosen)} schemes for {len(channels)} channels: give "
                          "one for all channels or one per channel")
    specs = []
    for c, stats in enumerate(channels):
        spec = (chosen[0] if len(chosen) == 1 else chosen[c]) if chosen else _by_channel_name(stats["name"])
        plan = registry.get("normalizers", spec.name).plan
        extra = {"dataset": dataset} if "dataset" in inspect.signature(plan).parameters else {}
        specs.append(plan(stats, fingerprint, **spec.kwargs, **extra))
    return specs


def _label_values(member: int | str, dataset: dict[str, Any], recipe: str) -> list[int]:
    """The label values a region member names: a value; a label name of dataset.json (case-insensitive); or a
    shell-style pattern over the foreground label names (``"*"`` every one, ``"enhancing*"``, ``"*edema*"``)."""
    if isinstance(member, int):
        return [member]
    labels = {str(k).strip().lower(): v for k, v in dataset.get("labels", {}).items()
              if isinstance(v, int) and v != 0 and str(k).strip().lower() != "ignore"}
    key = member.strip().lower()
    found = [labels[key]] if key in labels else [v for k, v in labels.items() if fnmatch.fnmatchcase(k, key)]
    if not found:
        raise RecipeError(f"recipe '{recipe}' regions name the label '{member}', which matches no label of "
                          f"{dataset.get('name')} (its labels: {', '.join(labels) or 'none'}); use its name, a "
                          f"pattern or a value, or set the regions explicitly: --set 'regions={{\"regions\": "
                          f"{{\"NAME\": [VALUES]}}, \"class_order\": [VALUES]}}'")
    return sorted(int(v) for v in found)


def resolve_region(members: Sequence[int | str], dataset: dict[str, Any], recipe: str) -> list[int]:
    """A region's label values: the union of its members minus those of ``"!"``-prefixed members (``["*",
    "!*edema*"]``: every foreground label but edema)."""
    wanted, excluded = set(), set()
    for member in members:
        if isinstance(member, str) and member.startswith("!"):
            excluded.update(_label_values(member[1:], dataset, recipe))
        else:
            wanted.update(_label_values(member, dataset, recipe))
    return sorted(wanted - excluded)


def _painted_label(member: int | str, dataset: dict[str, Any], recipe: str) -> int:
    values = _label_values(member, dataset, recipe)
    if len(values) != 1:
        raise RecipeError(f"recipe '{recipe}' paints '{member}', which matches the labels {values} of "
                          f"{dataset.get('name')}: a class_order entry must name exactly one label")
    return values[0]


def with_recipe_regions(dataset: dict[str, Any], recipe: Recipe) -> dict[str, Any]:
    """The dataset summary with the recipe's regions (they win over a dataset.json's), checked against its labels."""
    if recipe.regions is None:
        return dataset
    regions = {name: resolve_region(values, dataset, recipe.name) for name, values in recipe.regions.regions.items()}
    if recipe.regions.class_order is None:
        later = [set().union(*list(regions.values())[i + 1:]) for i in range(len(regions))]
        order = [min(set(values) - after, default=min(values, default=0)) for values, after in
                 zip(regions.values(), later)]
    else:
        order = [_painted_label(v, dataset, recipe.name) for v in recipe.regions.class_order]
    problems = check_regions(regions, order, dataset["label_values"])
    if problems:
        raise RecipeError(f"recipe '{recipe.name}' regions do not fit {dataset.get('name')}: {'; '.join(problems)}")
    return {**dataset, "regions": {k: list(v) for k, v in regions.items()}, "regions_class_order": list(order),
            "regions_source": f"recipe {recipe.name}"}


def plans_recipe(plans: Plans, name: str | None = None) -> Recipe:
    """The recipe ``name`` as the plans resolved it when they were made for it (overrides included), else the
    registered one (None: the plans' own)."""
    if plans.recipe_settings is not None and name in (None, plans.recipe):
        return Recipe.from_dict(plans.recipe_settings)
    return get_recipe(name or plans.recipe)


def planned_overrides(config: Configuration) -> list[str]:
    """The recipe overrides a budget plan made for its short schedule (``training["recipe_overrides"]``, e.g. the
    optimiser of rule 6 in `decathlete.planning.budget`), as ``path=value`` assignments: the probe times the step
    with them and the trainer applies them before the user's own ``--set``."""
    planned = (config.training or {}).get("recipe_overrides", {})
    return [f"{path}={json.dumps(value)}" for path, value in planned.items()]


def with_planned_overrides(recipe: Recipe, config: Configuration) -> Recipe:
    """``recipe`` with `planned_overrides` applied."""
    overrides = planned_overrides(config)
    return recipe.with_overrides(overrides) if overrides else recipe


def plan_free_kwargs(network: str) -> tuple[str, ...]:
    """The network's kwargs that do not shape the plan (`decathlete.nets.base`): a recipe may change them."""
    return tuple(getattr(registry.get("nets", network), "plan_free_kwargs", ()))


def _planned_part(recipe: Recipe) -> Recipe:
    """The recipe without the network kwargs a recipe may change on an existing plan."""
    free = plan_free_kwargs(recipe.net.name)
    return replace(recipe, net=Spec(recipe.net.name, {k: v for k, v in recipe.net.kwargs.items() if k not in free}))


def trained_configuration(recipe: Recipe, config: Configuration) -> Configuration:
    """The planned configuration with the recipe's plan-free network kwargs (dropout, activation ...) applied: what the
    trainer builds and records in the model's ``plans.json``, so that ``predict`` builds the same network."""
    free = plan_free_kwargs(config.network.name)
    wanted = json.loads(json.dumps(recipe.net.kwargs))
    changes = {k: v for k, v in wanted.items() if k in free and config.network.kwargs.get(k) != v}
    if not changes:
        return config
    return replace(config, network=replace(config.network, kwargs={**config.network.kwargs, **changes}))


def check_against_plans(recipe: Recipe, plans: Plans, config: Configuration, workdir: str | Path) -> None:
    """Refuse a recipe that would train on plans made for another network, planner, planning or regions (the
    network's plan-free kwargs aside).

    Raises:
        RecipeError: naming what differs and the command that re-plans for this recipe.
    """
    differing = []
    if plans.recipe_settings is not None:
        planned_recipe = _planned_part(Recipe.from_dict(plans.recipe_settings))
        differing = _planned_part(recipe).differences(planned_recipe, PLAN_FIELDS)
    planned = config.network
    free = plan_free_kwargs(planned.name) if planned.name == recipe.net.name else ()
    wanted = {k: v for k, v in json.loads(json.dumps(recipe.net.kwargs)).items() if k not in free}
    if planned.name != recipe.net.name or any(planned.kwargs.get(k) != v for k, v in wanted.items()):
        differing = sorted({*differing, "net"})
    if differing:
        raise RecipeError(
            f"the plans in {workdir} were made for recipe '{plans.recipe}' (network {planned.name}); recipe "
            f"'{recipe.name}' differs in {', '.join(differing)}. Plan for it first: decathlete plan "
            f"{plans.dataset.get('root', 'DATASET')} -o NEW_WORKDIR --recipe {recipe.name} (with the same --set "
            f"options), then preprocess and train there")
