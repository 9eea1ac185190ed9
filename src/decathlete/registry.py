"""One registry for every pluggable component: networks, layers, losses, recipes, planners, samplers, schedules,
optimisers, augmentation presets, normalisation schemes and inference tile weightings.

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
         "normalizers", "augmentations", "transforms", "samplers", "tile_weights")

_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {kind: {} for kind in KINDS}
_PLUGINS: list[str] = []

# Modules of the package that register built-in components; imported lazily so `import decathlete` stays cheap.
_BUILTIN_MODULES = {
    "recipes": ("decathlete.recipes.default",),
    "nets": ("decathlete.nets.unet",),
    "convs": ("decathlete.nets.layers",),
    "norms": ("decathlete.nets.layers",),
    "activations": ("decathlete.nets.layers",),
    "losses": ("decathlete.losses.dice", "decathlete.losses.ce", "decathlete.losses.compound",
               "decathlete.losses.deep_supervision"),
    "optimizers": ("decathlete.train.optimizers",),
    "schedules": ("decathlete.train.schedules",),
    "planners": ("decathlete.planning.rules",),
    "normalizers": ("decathlete.preprocess.normalization",),
    "augmentations": ("decathlete.augment.presets",),
    "transforms": ("decathlete.augment.presets",),
    "samplers": ("decathlete.data.sampling",),
    "tile_weights": ("decathlete.infer.tile_weights",),
}


def _register(kind: str, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorator(obj: Callable[..., Any]) -> Callable[..., Any]:
        table = _REGISTRY[kind]
        if name in table and table[name] is not obj:
            warnings.warn(f"{kind[:-1]} '{name}' registered twice; the later one wins", stacklevel=2)
        table[name] = obj
        return obj

    return decorator


def register_net(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a network class or builder under ``name``."""
    return _register("nets", name)


def register_loss(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a loss class or builder under ``name``."""
    return _register("losses", name)


def register_recipe(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a recipe factory (returns a ``Recipe``) under ``name``."""
    return _register("recipes", name)


def register_planner(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a planner function ``(fingerprint, dataset, options) -> Plans`` under ``name``."""
    return _register("planners", name)


def register_sampler(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a patch sampler class under ``name`` (see `decathlete.data.sampling.PatchSampler` for the protocol)."""
    return _register("samplers", name)


def register_schedule(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a learning-rate schedule factory ``(**kwargs) -> (step, total) -> factor`` under ``name``."""
    return _register("schedules", name)


def register_optimizer(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register an optimiser class or factory ``(params, **kwargs) -> torch.optim.Optimizer`` under ``name``."""
    return _register("optimizers", name)


def register_normalizer(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register an intensity normalisation scheme (``plan`` + ``apply``, see `decathlete.preprocess.normalization`)."""
    return _register("normalizers", name)


def register_augmentation(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register an augmentation preset ``(configuration) -> AugmentConfig`` under ``name``."""
    return _register("augmentations", name)


def register_transform(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register an extra batch transform ``(image, label, generator, **kwargs) -> (image, label)`` under ``name``."""
    return _register("transforms", name)


def register_tile_weights(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register an inference tile weighting ``(patch_size, **kwargs) -> weight map tensor`` under ``name``."""
    return _register("tile_weights", name)


def register_layer(kind: str, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
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
        raise KeyError(f"no {kind[:-1]} named '{name}' is registered (known: {known}); load a plugin with --plugin")
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
