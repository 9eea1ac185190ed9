"""The recipe: everything about a method that does not depend on the data, as one typed, frozen record.

A recipe names registry components (network, loss, optimiser, schedule, planner, normalisation, augmentation preset,
sampler, tile weighting) with JSON kwargs and sets typed values (epochs, clip, planner overrides, regions, every
augmentation probability and range, inference settings). The planner fills in what depends on the data. A recipe
is written as JSON next to every model (``recipe.json``) and read back by ``predict``, ``crossval`` and ``--resume``,
so a model folder never depends on the current defaults of the registered recipe it came from.

Overrides use dotted names, on every verb that takes a recipe: ``--set optimizer.lr=3e-4 --set augment.p_elastic=0.2
--set planning.batch_size=1 --set inference.tile_weighting=constant``. The value is JSON (``3e-4``, ``[1, 10]``,
``null``, ``{"name": "adam", "kwargs": {"lr": 1e-3}}``) or else a plain string; ``--set-file FILE`` reads a JSON
object of such fields and values (`read_override_file`). A component field (a `Spec`) takes
``<field>.name``, ``<field>.kwargs`` or any other key as one of its kwargs; a bare string replaces it by that
component with its defaults. Unknown keys and wrong types are errors naming the valid ones: recipe fields are checked
here, kwargs against the registered component's signature and annotations (`validate`).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, make_dataclass, replace
from pathlib import Path
from typing import Any

from decathlete.augment.pipeline import AugmentConfig
from decathlete.recipes.schema import RecipeError, Spec, assign, fits, from_data, parse_value, type_name
from decathlete.registry import get


@dataclass(frozen=True)
class Planning:
    """Planner overrides; ``None`` leaves the choice to the planner. Shapes and spacings in the planned axis order:
    array order (z, y, x) after the plan's ``transpose_forward`` (the coarsest axis first; for axial data the same).

    Attributes:
        target_spacing: voxel spacing in mm of ``3d_fullres`` (and, in plane, of ``2d``) instead of the rule's.
        patch_size_3d: fixed 3D patch (z, y, x); the topology is planned for it, and the batch unless fixed too.
        patch_size_2d: fixed 2D patch (the two in-plane axes, in array order).
        batch_size: fixed batch size (1 allowed) instead of the memory rule's.
        min_batch_size: the smallest batch the memory rule may choose (nnU-Net: 2).
        normalization: intensity normalisation, one `Spec` per channel or a single one for every channel
            (registry kind ``normalizers``: ``ct``, ``zscore``, ``none`` ...); None = by channel name (nnU-Net).
        slice_axis_spacing_2d: 2D configurations: ``keep`` each case's own spacing along the slice axis (nnU-Net),
            resample it to the ``target`` spacing's value, or to the ``in_plane`` spacing (isotropic volumes).
        base_features: features of the first stage (doubled per stage up to the cap).
        max_features_3d, max_features_2d: the caps.
        n_blocks_per_stage: encoder blocks per stage (an int, or a list repeated/truncated to the stage count).
        n_conv_per_stage_decoder: convolutions per decoder stage.
        gpu_memory_gb: a preset's own GPU memory budget (wins over ``plan --gpu-memory``).
        ram_gb: a preset's own RAM budget for plans made for the CPU (``plan --device cpu``): the smaller of it and
            the machine's share of RAM (`decathlete.planning.memory`).
        max_dataset_covered: cap on the batch as a fraction of the dataset's voxels (nnU-Net: 0.05).
        crop_to_nonzero: crop every case to its nonzero box (nnU-Net); False plans and preprocesses whole volumes.
        max_stages: the deepest topology: at most this many stages (``max_stages - 1`` downsamplings) however large
            the patch; None = as deep as the patch allows (nnU-Net). SegResNet's four levels: 4.
        budget_crop: a time budget may shrink the patch when even the narrowest network leaves too few steps
            (`decathlete.planning.budget`); False keeps the planned patch (nnU-Net's).
    """

    target_spacing: tuple[float, float, float] | None = None
    patch_size_3d: tuple[int, int, int] | None = None
    patch_size_2d: tuple[int, int] | None = None
    batch_size: int | None = None
    min_batch_size: int = 2
    normalization: tuple[Spec, ...] | None = None
    slice_axis_spacing_2d: str = "keep"
    base_features: int = 32
    max_features_3d: int = 320
    max_features_2d: int = 512
    n_blocks_per_stage: int | tuple[int, ...] = 2
    n_conv_per_stage_decoder: int = 2
    gpu_memory_gb: float | None = None
    ram_gb: float | None = None
    max_dataset_covered: float = 0.05
    crop_to_nonzero: bool = True
    max_stages: int | None = None
    budget_crop: bool = False

    def __post_init__(self) -> None:
        if self.slice_axis_spacing_2d not in ("keep", "target", "in_plane"):
            raise RecipeError(f"planning.slice_axis_spacing_2d must be keep, target or in_plane, "
                              f"got '{self.slice_axis_spacing_2d}'")
        if self.max_stages is not None and self.max_stages < 2:
            raise RecipeError(f"planning.max_stages must be at least 2 (one downsampling), got {self.max_stages}")
        if self.ram_gb is not None and self.ram_gb <= 0:
            raise RecipeError(f"planning.ram_gb must be positive, got {self.ram_gb}")
        for name in ("batch_size", "min_batch_size", "base_features"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RecipeError(f"planning.{name} must be at least 1, got {value}")
        if self.gpu_memory_gb is not None and self.gpu_memory_gb <= 0:
            raise RecipeError(f"planning.gpu_memory_gb must be a positive number of GiB, got {self.gpu_memory_gb}")


@dataclass(frozen=True)
class Regions:
    """Nested regions trained with one sigmoid output each (nnU-Net's region-based training).

    Attributes:
        regions: region name -> the labels it unites, in output order, e.g. BraTS (MSD labels 1 edema,
            2 non-enhancing, 3 enhancing): whole tumour (1, 2, 3), tumour core (2, 3), enhancing tumour (3,). A member
            is a label value, a label name of dataset.json (case-insensitive), a shell-style pattern over the
            foreground label names (``"*"``, ``"enhancing*"``), or one of those after ``"!"`` to leave its labels out
            (tumour core ``("*", "!*edema*")``), so one recipe fits several numberings.
        class_order: per region, the label painted where it is predicted (a value, name or pattern matching exactly
            one label); later regions paint over earlier ones. None: each region paints the lowest label it holds
            that no later region holds (BraTS: edema, then the core's first label, then enhancing).
    """

    regions: dict[str, tuple[int | str, ...]]
    class_order: tuple[int | str, ...] | None = None


def _augment_fields() -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(AugmentConfig)
    return [(f.name, hints[f.name] | None, dataclasses.field(default=None)) for f in fields(AugmentConfig)]


# Every field of `AugmentConfig`, None = the preset's value, plus the preset's registry key ``name`` and ``extra``.
Augmentation = make_dataclass("Augmentation", [("name", str, dataclasses.field(default="nnunet")),
                                               ("extra", tuple[Spec, ...], dataclasses.field(default=())),
                                               *_augment_fields()], frozen=True)
Augmentation.__module__ = __name__
Augmentation.__doc__ = ("Augmentation: a preset (registry kind ``augmentations``, ``nnunet`` = nnU-Net's settings for "
                        "the configuration), overrides of any `AugmentConfig` field (None = the preset's value), and "
                        "``extra`` batch transforms (registry kind ``transforms``) applied after them, in order.")


@dataclass(frozen=True)
class Inference:
    """How a model predicts.

    Attributes:
        tile_weighting: weight map of a sliding-window tile (registry kind ``tile_weights``: ``gaussian`` with
            ``sigma_scale``, ``constant``, ``center`` with ``fraction``).
        step: tile distance as a fraction of the patch (0.5 = half overlap).
        mirror_axes: patch axes mirrored for test-time augmentation; None = the axes mirrored in training.
        tta: mirroring test-time augmentation on by default.
        max_tile: tiles as large as the image (rounded up to what the network's pooling needs), up to this size per
            patch axis, never smaller than the training patch (Rippel 2018: [128, 512, 512]); None = the patch.
        postprocessing: ``crossval`` may choose nnU-Net's largest-component postprocessing where it helps; False
            applies none (Rippel 2018), the candidates are still reported.
    """

    tile_weighting: Spec = Spec("gaussian", {"sigma_scale": 0.125})
    step: float = 0.5
    mirror_axes: tuple[int, ...] | None = None
    tta: bool = True
    max_tile: tuple[int, ...] | None = None
    postprocessing: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.step <= 1:
            raise RecipeError(f"inference.step must lie in (0, 1], got {self.step}")


# Layer choices written into plans.json as data (name + kwargs), nnU-Net's conv-InstanceNorm-LeakyReLU.
UNET_LAYERS = {"norm": ["instance", {"affine": True, "eps": 1e-5}], "act": ["leakyrelu", {"negative_slope": 0.01}]}


@dataclass(frozen=True)
class Recipe:
    """Everything about a method that does not depend on the data (see the module docstring).

    Attributes:
        name: registry key of the recipe; names the model folder ``models/<config>/<name>``.
        net: network registry key + fixed kwargs (``block``, ``norm``, ``conv`` ...); the planner adds the topology.
        loss: loss registry key + kwargs: a loss on logits (wrapped for deep supervision) or a `TrainingLoss`
            that sees the network output and the batch (`decathlete.losses.base`).
        optimizer: optimiser registry key + kwargs (``lr`` is the base of the schedule).
        schedule: learning-rate schedule registry key + kwargs.
        epochs: training epochs.
        iterations_per_epoch: optimiser steps per epoch.
        grad_clip: gradient-norm clip; None = no clipping.
        planner: planner registry key.
        planning: typed planner overrides.
        regions: nested sigmoid regions to train instead of the dataset's label map classes; None = the dataset's.
        augment: augmentation preset + overrides.
        sampler: patch sampler registry key + kwargs (``oversample_foreground`` ...).
        inference: tile weighting, step, mirror axes.
    """

    name: str
    net: Spec = Spec("unet", {"block": "plain", **UNET_LAYERS})
    loss: Spec = Spec("dice_ce", {"include_background": False})  # batch_dice: the plan's, unless set
    optimizer: Spec = Spec("sgd", {"lr": 1e-2, "momentum": 0.99, "nesterov": True, "weight_decay": 3e-5})
    schedule: Spec = Spec("poly", {"power": 0.9})
    epochs: int = 1000
    iterations_per_epoch: int = 250
    grad_clip: float | None = 12.0
    planner: str = "nnunet"
    planning: Planning = Planning()
    regions: Regions | None = None
    augment: Augmentation = Augmentation()  # type: ignore[valid-type]
    sampler: Spec = Spec("patch", {"oversample_foreground": 0.33})
    inference: Inference = Inference()

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.iterations_per_epoch < 1:
            raise RecipeError(f"epochs and iterations_per_epoch must be at least 1, got {self.epochs} and "
                              f"{self.iterations_per_epoch}")

    def to_dict(self) -> dict[str, Any]:
        """The recipe as JSON-ready data (tuples become lists), as written to ``recipe.json``."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """Read a recipe back from JSON data; missing fields take their defaults, unknown ones are an error."""
        return from_data(cls, data, "recipe")

    def with_overrides(self, assignments: Sequence[str]) -> Recipe:
        """This recipe with dotted ``path=value`` assignments applied (see the module docstring)."""
        data = self.to_dict()
        for assignment in assignments:
            path, sep, text = assignment.partition("=")
            if not sep or not path.strip():
                raise RecipeError(f"--set expects path=value (e.g. optimizer.lr=3e-4), got '{assignment}'")
            assign(data, Recipe, path.strip().split("."), parse_value(text), path.strip(), "")
        return Recipe.from_dict(data)

    def differences(self, other: Recipe, keys: Sequence[str]) -> list[str]:
        """The top-level fields among ``keys`` whose values differ between the two recipes."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [k for k in keys if mine[k] != theirs[k]]


def read_override_file(path: str | Path) -> list[str]:
    """The overrides of a JSON file mapping dotted recipe fields to values (``{"optimizer.lr": 3e-3}``, what
    ``decathlete search`` writes as ``best_overrides.json``), as ``path=value`` assignments in the file's order.

    Raises:
        RecipeError: the file is missing, is not JSON, or is not an object of dotted names.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RecipeError(f"cannot read the override file {path}: {err}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and k.strip() for k in data):
        raise RecipeError(f"{path}: an override file is a JSON object of dotted recipe fields and values, e.g. "
                          '{"optimizer.lr": 3e-3, "augment.p_rotation": 0.1}')
    return assignments(data)


def assignments(values: Mapping[str, Any]) -> list[str]:
    """``path=value`` overrides (JSON values) of a mapping of dotted recipe fields to values, in its order."""
    return [f"{path}={json.dumps(value)}" for path, value in values.items()]


# Fields that shape the plan: a model's recipe must agree with the plans it trains on in all of them.
PLAN_FIELDS = ("net", "planner", "planning", "regions")


# Parameters the framework passes to a component of each registry kind: a recipe may not set them.
SUPPLIED = {
    "nets": ("in_channels", "num_classes", "spatial_dims", "features_per_stage", "kernel_sizes", "strides",
             "n_blocks_per_stage", "n_conv_per_stage_decoder"),
    "losses": ("context",),
    "optimizers": ("params",),
    "schedules": (),
    "samplers": ("case_dir", "case_ids", "input_size", "patch_size", "spatial_dims", "slice_axis", "ignore_label"),
    "tile_weights": ("patch_size",),
    "transforms": ("image", "label", "generator"),
    "normalizers": ("stats", "fingerprint", "dataset"),
}


def _components(recipe: Recipe) -> list[tuple[str, str, Spec]]:
    """(path, registry kind, spec) of every component the recipe names."""
    found = [("net", "nets", recipe.net), ("loss", "losses", recipe.loss), ("optimizer", "optimizers",
             recipe.optimizer), ("schedule", "schedules", recipe.schedule), ("sampler", "samplers", recipe.sampler),
             ("inference.tile_weighting", "tile_weights", recipe.inference.tile_weighting)]
    for i, spec in enumerate(recipe.planning.normalization or ()):
        found.append((f"planning.normalization[{i}]", "normalizers", spec))
    for i, spec in enumerate(recipe.augment.extra):
        found.append((f"augment.extra[{i}]", "transforms", spec))
    return found


def _parameters(kind: str, name: str) -> list[inspect.Parameter] | None:
    """The component's parameters, annotations resolved where they can be (None: no signature to read)."""
    target = get(kind, name)
    if kind == "normalizers":
        target = target.plan
    try:
        try:
            return list(inspect.signature(target, eval_str=True).parameters.values())
        except NameError:  # an annotation naming what its module imports only for type checkers
            return list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return None


def accepted_kwargs(kind: str, name: str) -> list[str] | None:
    """Keyword arguments a recipe may give the component (None: any, it takes ``**kwargs``)."""
    params = _parameters(kind, name)
    if params is None or any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name not in SUPPLIED.get(kind, ()) and p.name != "self"]


# Kwarg values the framework replaces before the component sees them: a loss's ``weight`` by name becomes one weight
# per class (`decathlete.losses.base.LossContext.logits_loss`).
REPLACED_VALUES = {("losses", "weight"): ("inverse_frequency",)}


def _expected_type(param: inspect.Parameter) -> Any:
    """The annotation; without one, the default's type (any number for a numeric default), else anything."""
    if param.annotation is not param.empty:
        return param.annotation
    default = type(param.default)
    return float if default in (int, float) else default if default in (bool, str) else Any


def _check_kwarg_types(path: str, kind: str, spec: Spec) -> None:
    """A kwarg of the wrong type fails here, naming it, rather than deep inside the component (torch's SGD compares
    ``lr < 0.0``); the expected type is the parameter's annotation, else its default's."""
    for param in _parameters(kind, spec.name) or []:
        if param.name not in spec.kwargs:
            continue
        expected = _expected_type(param)
        value = spec.kwargs[param.name]
        if value not in REPLACED_VALUES.get((kind, param.name), ()) and fits(expected, value) is False:
            raise RecipeError(f"{path}.{param.name}: '{spec.name}' takes {type_name(expected)} for {param.name}, "
                              f"got {json.dumps(value, default=str)}")


def _check_probabilities(augment: Any) -> None:
    for f in fields(augment):
        value = getattr(augment, f.name)
        if f.name.startswith("p_") and value is not None and not 0 <= value <= 1:
            raise RecipeError(f"augment.{f.name} is a probability: it must lie in [0, 1], got {value}")


def validate(recipe: Recipe) -> Recipe:
    """Check that every component is registered and takes the kwargs given, of the types it declares, and that every
    augmentation probability lies in [0, 1]; returns the recipe.

    Raises:
        RecipeError: naming the field, and the registered names or the accepted kwargs.
    """
    try:
        get("planners", recipe.planner)
        get("augmentations", recipe.augment.name)
    except KeyError as err:
        raise RecipeError(str(err).strip("'\"")) from None
    for path, kind, spec in _components(recipe):
        try:
            accepted = accepted_kwargs(kind, spec.name)
        except KeyError as err:
            raise RecipeError(f"{path}: {str(err).strip(chr(34))}") from None
        supplied = [k for k in spec.kwargs if k in SUPPLIED.get(kind, ())]
        if supplied:
            raise RecipeError(f"{path}: {', '.join(supplied)} {'is' if len(supplied) == 1 else 'are'} set by the "
                              f"framework, not the recipe (the planner's topology: see the planning.* settings)")
        unknown = [] if accepted is None else [k for k in spec.kwargs if k not in accepted]
        if unknown:
            raise RecipeError(f"{path}: '{spec.name}' takes no {', '.join(unknown)}; it takes "
                              f"{', '.join(accepted) or 'no settings'}")
        _check_kwarg_types(path, kind, spec)
    _check_probabilities(recipe.augment)
    return recipe


RECIPE_FILE = "recipe.json"  # the resolved recipe, next to every trained model


def saved_recipe(folder: str | Path) -> Recipe | None:
    """The resolved recipe a model folder was trained with (its ``recipe.json``), or None when it has none."""
    path = Path(folder) / RECIPE_FILE
    return Recipe.from_dict(json.loads(path.read_text())) if path.is_file() else None


def get_recipe(name: str) -> Recipe:
    """Build the registered recipe ``name``."""
    recipe = get("recipes", name)()
    if not isinstance(recipe, Recipe):
        raise RecipeError(f"recipe '{name}' returned {type(recipe).__name__}, not a Recipe")
    return recipe


def resolve_recipe(name: str, overrides: Sequence[str] = (), **values: Any) -> Recipe:
    """The registered recipe ``name`` with dotted ``overrides`` and top-level ``values`` applied, validated."""
    recipe = get_recipe(name).with_overrides(overrides)
    values = {k: v for k, v in values.items() if v is not None}
    return validate(replace(recipe, **values) if values else recipe)
