"""Layer specs: a convolution, norm or activation is named by a string or a ``(name, kwargs)`` pair.

Keeping layer choices as data (the MONAI factory idea) keeps network arguments JSON-serialisable, so plans.json can
describe a network completely without import paths. The names are registry entries of the kinds ``convs``, ``norms``
and ``activations``: a block built with ``make_conv(conv, ...)`` takes another convolution (a factorised one, say)
by changing the spec, and a plugin adds its own with ``register_layer``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

from torch import nn

from decathlete.registry import get, register_layer

LayerSpec = Union[str, tuple[str, dict[str, Any]], list[Any], None]

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


def conv_class(spatial_dims: int, transposed: bool = False) -> type[nn.Module]:
    """The torch convolution class for 2D or 3D."""
    if spatial_dims not in _CONVS:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return (_TRANSPOSED if transposed else _CONVS)[spatial_dims]


@register_layer("convs", "conv")
def standard_conv(spatial_dims: int, c_in: int, c_out: int, kernel: Sequence[int], stride: Sequence[int],
                  bias: bool = False) -> nn.Module:
    """A plain 2D/3D convolution with ``kernel // 2`` padding ("same" size at stride 1)."""
    padding = tuple(int(k) // 2 for k in kernel)
    return conv_class(spatial_dims)(c_in, c_out, tuple(kernel), tuple(stride), padding, bias=bias)


def make_conv(spec: LayerSpec, spatial_dims: int, c_in: int, c_out: int, kernel: Sequence[int],
              stride: Sequence[int], bias: bool = False) -> nn.Module:
    """Build the convolution ``spec`` names (default ``conv``): same-size padding, ``kernel``/``stride`` per axis."""
    name, kwargs = split_spec(spec)
    return get("convs", name or "conv")(spatial_dims, c_in, c_out, kernel, stride, bias=bias, **kwargs)


@register_layer("norms", "instance")
def instance_norm(channels: int, spatial_dims: int, **kwargs: Any) -> nn.Module:
    return (nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d)(channels, **kwargs)


@register_layer("norms", "batch")
def batch_norm(channels: int, spatial_dims: int, **kwargs: Any) -> nn.Module:
    return (nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d)(channels, **kwargs)


@register_layer("norms", "group")
def group_norm(channels: int, spatial_dims: int, groups: int = 8, **kwargs: Any) -> nn.Module:
    """GroupNorm with ``groups`` groups, or the largest count below it that divides ``channels`` (a budget-narrowed
    12-feature stage gets 6)."""
    n = next(g for g in range(min(groups, channels), 0, -1) if channels % g == 0)
    return nn.GroupNorm(n, channels, **kwargs)


@register_layer("norms", "none")
def no_norm(channels: int, spatial_dims: int) -> nn.Module:
    return nn.Identity()


def make_norm(spec: LayerSpec, channels: int, spatial_dims: int) -> nn.Module:
    """Build a normalisation layer; ``group`` takes ``groups`` (default 8), the others the torch kwargs."""
    name, kwargs = split_spec(spec)
    return get("norms", name or "none")(channels, spatial_dims, **kwargs)


@register_layer("activations", "leakyrelu")
def leaky_relu(negative_slope: float = 0.01, inplace: bool = True) -> nn.Module:
    """nnU-Net's slope 0.01, in place."""
    return nn.LeakyReLU(negative_slope=negative_slope, inplace=inplace)


@register_layer("activations", "relu")
def relu(inplace: bool = True) -> nn.Module:
    return nn.ReLU(inplace=inplace)


register_layer("activations", "gelu")(nn.GELU)
register_layer("activations", "prelu")(nn.PReLU)
register_layer("activations", "identity")(nn.Identity)


def make_act(spec: LayerSpec) -> nn.Module:
    """Build an activation (None: identity)."""
    name, kwargs = split_spec(spec)
    return nn.Identity() if name is None else get("activations", name)(**kwargs)


def he_init(module: nn.Module, negative_slope: float = 1e-2) -> None:
    """nnU-Net's ``InitWeights_He``: Kaiming-normal weights (for LeakyReLU's slope) and zero biases for every
    (transposed) convolution; use as ``net.apply(he_init)``. PyTorch's default (Kaiming-uniform with ``a = sqrt(5)``)
    starts with weights ~2.4x smaller in standard deviation."""
    if isinstance(module, (*_CONVS.values(), *_TRANSPOSED.values())):
        nn.init.kaiming_normal_(module.weight, a=negative_slope)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

