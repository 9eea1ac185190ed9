"""Layer factories: a norm, activation or convolution is named by a string or a ``(name, kwargs)`` pair.

Keeping layer choices as data (the MONAI factory idea) keeps network arguments JSON-serialisable, so plans.json can
describe a network completely without import paths.
"""

from __future__ import annotations

from typing import Any, Union

from torch import nn

LayerSpec = Union[str, tuple[str, dict[str, Any]], list[Any], None]

_NORMS = {
    "instance": {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d},
    "batch": {2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
}
_ACTS = {"leakyrelu": nn.LeakyReLU, "relu": nn.ReLU, "gelu": nn.GELU, "prelu": nn.PReLU, "identity": nn.Identity}
_CONVS = {2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def split_spec(spec: LayerSpec) -> tuple[str | None, dict[str, Any]]:
    """Return ``(name, kwargs)`` for a name, a ``(name, kwargs)`` pair (a JSON list after a round trip) or None."""
    if spec is None:
        return None, {}
    if isinstance(spec, str):
        return spec.lower(), {}
    name, kwargs = spec
    return str(name).lower(), dict(kwargs or {})


def make_norm(spec: LayerSpec, channels: int, spatial_dims: int) -> nn.Module:
    """Build a normalisation layer; ``group`` takes ``groups`` (default 8), the others the torch kwargs."""
    name, kwargs = split_spec(spec)
    if name is None or name == "none":
        return nn.Identity()
    if name == "group":
        groups = kwargs.pop("groups", 8)
        return nn.GroupNorm(min(groups, channels), channels, **kwargs)
    if name not in _NORMS:
        raise KeyError(f"unknown norm '{name}'; choose one of group, none, {', '.join(sorted(_NORMS))}")
    return _NORMS[name][spatial_dims](channels, **kwargs)


def make_act(spec: LayerSpec) -> nn.Module:
    """Build an activation; LeakyReLU defaults to nnU-Net's slope 0.01 and runs in place."""
    name, kwargs = split_spec(spec)
    if name is None:
        return nn.Identity()
    if name not in _ACTS:
        raise KeyError(f"unknown activation '{name}'; choose one of {', '.join(sorted(_ACTS))}")
    if name == "leakyrelu":
        kwargs = {"negative_slope": 0.01, "inplace": True, **kwargs}
    elif name == "relu":
        kwargs = {"inplace": True, **kwargs}
    return _ACTS[name](**kwargs)


def conv_class(spatial_dims: int, transposed: bool = False) -> type[nn.Module]:
    """The torch convolution class for 2D or 3D."""
    if spatial_dims not in _CONVS:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return (_TRANSPOSED if transposed else _CONVS)[spatial_dims]
