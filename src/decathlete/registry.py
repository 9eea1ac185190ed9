"""One registry for every pluggable component: networks, layers, losses, recipes, planners, samplers, schedules,
optimisers, augmentation presets, normalisation schemes, inference tile weightings and hyperparameter-search
samplers.

A component registers itself with a decorator when its module is imported (the timm pattern), so nothing
scans folders and nothing reads environment variables. Plans store the registry *key* plus JSON kwargs,
never an import path. A user's own package registers the same way and is loaded with ``--plugin PKG``.
"""

from __future__ import annotations

import fnmatch
import importlib
import warnings
from collections.abc import Callable
from typing import Any

KINDS = ("recipes", "nets", "convs", "norms", "activations", "losses", "optimizers", "schedules", "planners",
         "normalizers", "augmentations", "transforms", "samplers", "tile_weights", "search_samplers")

_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {kind: {} for kind in KINDS}
_PLUGINS: list[str] = []

# Modules of the package that register built-in components; imported lazily so `import decathlete` stays cheap.
_BUILTIN_MODULES = {
    "recipes": ("decathlete.recipes.default", "decathlete.recipes.myronenko2018", "decathlete.recipes.rippel2018",
                "decathlete.recipes.avetisian", "decathlete.recipes.vandenhork2019", "decathlete.recipes.witanto2021"),
    "nets": ("decathlete.nets.unet", "decathlete.nets.segresnet", "decathlete.nets.factorized",
             "decathlete.nets.isensee2017"),
    "convs": ("decathlete.nets.layers",),
    "norms": ("decathlete.nets.layers",),
    "activations": ("decathlete.nets.layers",),
    "losses": ("decathlete.losses.dice", "decathlete.losses.ce", "decathlete.losses.compound",
               "decathlete.losses.deep_supervision", "decathlete.losses.vae", "decathlete.losses.overlap"),
    "optimizers": ("decathlete.train.optimizers",),
    "schedules": ("decathlete.train.schedules",),
    "planners": ("decathlete.planning.rules", "decathlete.planning.rippel2018", "decathlete.planning.flare21"),
    "normalizers": ("decathlete.preprocess.normalization",),
    "augmentations": ("decathlete.augment.presets", "decathlete.augment.extra"),
    "transforms": ("decathlete.augment.extra", "decathlete.augment.lesion"),
    "samplers": ("decathlete.data.sampling", "decathlete.data.border_sampling", "decathlete.data.patchset"),
    "tile_weights": ("decathlete.infer.tile_weights",),
    "search_samplers": ("decathlete.search.samplers",),
}


def _register(kind: str, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Record the decorated object as ``name`` of ``kind`` (a second registration of a name wins, with a warning)."""

    def decorator(obj: Callable[..., Any]) -> Callable[..., Any]:
        table = _REGISTRY[kind]
        if name in table and table[name] is not obj:
            warnings.warn(f"{kind[:-1]} '{name}' registered twice; the later one wins", stacklevel=2)
        table[name] = obj
        return obj

    return decorator


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _registrar(kind: str, what: str) -> Callable[[str], Decorator]:
    """The ``register_<kind>(name)`` decorator factory of one kind."""

    def register(name: str) -> Decorator:
        return _register(kind, name)

    register.__doc__ = f"Register {what} under ``name``."
    return register


register_recipe = _registrar("recipes", "a recipe factory (returns a ``Recipe``)")
register_net = _registrar("nets", "a network class (see `decathlete.nets.base` for the protocol)")
register_loss = _registrar("losses", "a loss class or builder (see `decathlete.losses.base`)")
register_optimizer = _registrar("optimizers", "an optimiser class or factory ``(params, **kwargs)``")
register_schedule = _registrar("schedules", "a learning-rate schedule ``(**kwargs) -> (step, total) -> factor``")
register_planner = _registrar("planners", "a planner ``(fingerprint, dataset, recipe, gpu_memory_gb, memory=None) "
                                          "-> Plans`` (``memory``: a CPU plan's RAM target, optional)")
register_normalizer = _registrar("normalizers", "a normalisation scheme (``plan`` + ``apply``, "
                                                "see `decathlete.preprocess.normalization`)")
register_augmentation = _registrar("augmentations", "an augmentation preset ``(configuration) -> AugmentConfig``")
register_transform = _registrar("transforms", "an extra batch transform "
                                              "``(image, label, generator, **kwargs) -> (image, label)``")
register_sampler = _registrar("samplers", "a patch sampler class (see `decathlete.data.sampling.PatchSampler`)")
register_tile_weights = _registrar("tile_weights", "an inference tile weighting ``(patch_size, **kwargs) -> weights``")
register_search_sampler = _registrar("search_samplers", "a hyperparameter-search sampler "
                                                        "``(seed, startup_trials) -> optuna.samplers.BaseSampler``")


def register_layer(kind: str, name: str) -> Decorator:
    """Register a layer builder of ``kind`` ``convs``, ``norms`` or ``activations`` (see `decathlete.nets.layers`)."""
    if kind not in ("convs", "norms", "activations"):
        raise KeyError(f"layer kind must be convs, norms or activations, got '{kind}'")
    return _register(kind, name)


def _load_builtins(kind: str) -> None:
    for module in _BUILTIN_MODULES[kind]:
        importlib.import_module(module)


def load_plugin(package: str) -> None:
    """Import a user package so that its decorators register its components.

    Raises:
        ImportError: with the package name, when it cannot be imported.
    """
    try:
        importlib.import_module(package)
    except ImportError as err:
        raise ImportError(f"cannot import plugin '{package}': {err}. Is it installed in this environment?") from err
    if package not in _PLUGINS:
        _PLUGINS.append(package)


def loaded_plugins() -> list[str]:
    """Plugin packages loaded in this process (recorded with each model so `predict` can load them again)."""
    return list(_PLUGINS)


def get(kind: str, name: str) -> Callable[..., Any]:
    """Return the component registered as ``name`` of ``kind``.

    Raises:
        KeyError: naming the known alternatives, when ``name`` is not registered.
    """
    if kind not in _REGISTRY:
        raise KeyError(f"unknown registry kind '{kind}'; choose one of {', '.join(KINDS)}")
    _load_builtins(kind)
    table = _REGISTRY[kind]
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        singular = kind[:-2] if kind.endswith("sses") else kind[:-1]  # losses -> loss
        raise KeyError(f"no {singular} named '{name}' is registered (known: {known}); load a plugin with --plugin")
    return table[name]


def build(kind: str, name: str, **kwargs: Any) -> Any:
    """Look up ``name`` and call it with ``kwargs``."""
    return get(kind, name)(**kwargs)


def names(kind: str, pattern: str = "*") -> list[str]:
    """Registered names of ``kind`` matching a shell-style wildcard, sorted."""
    _load_builtins(kind)
    return sorted(n for n in _REGISTRY[kind] if fnmatch.fnmatch(n, pattern))


def unregister(kind: str, name: str) -> None:
    """Remove ``name`` of ``kind`` (tests that register throw-away components clean up with it)."""
    _REGISTRY[kind].pop(name, None)
