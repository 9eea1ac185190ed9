"""The network protocol: what the planner, the training step and the predictor ask of every registered network.

* **Construction** ``Net(in_channels, num_classes, **kwargs)``; the kwargs are the plan's ``network.kwargs`` (JSON).
  Networks planned by the ``nnunet`` planner also take its topology: ``spatial_dims``, ``features_per_stage``,
  ``kernel_sizes``, ``strides`` (per stage, per axis, array order), ``n_blocks_per_stage`` and
  ``n_conv_per_stage_decoder``; one whose class sets ``plan_patch_size = True`` also gets the training patch as
  ``train_patch_size`` (a VAE branch's dense layer is sized for it; inference may run at any size).
* **Training forward** returns the logits, either one tensor ``(B, K, *spatial)`` or the deep-supervision list (full
  resolution first), or a `NetOutput` of those logits plus a dict of auxiliary tensors (a VAE's reconstruction, mean
  and log-variance). `NetOutput.of` turns each of the three into a `NetOutput`, so the loop sees one type.
* **Inference forward** (after `set_deep_supervision(False)`, in eval mode) returns the full-resolution logits.
* **Memory**: ``feature_map_elements(patch_size, in_channels, num_classes, **kwargs)`` counts the activation elements
  of one sample, which the planner turns into bytes (``planning/rules.py``), and ``parameter_count`` the trainable
  parameters. `SegmentationNet` measures both on the meta device (no memory, no arithmetic), so a new network plans
  correctly without writing either; a network may replace them with a closed form (the U-Net does, and a test checks
  the two agree).
* **Plan-free kwargs**: a class lists in ``plan_free_kwargs`` the kwargs that do not shape the plan (dropout,
  activation): a recipe override of them (``--set net.dropout=0.4``, a search trial) trains on the existing plan, and
  the model's own ``plans.json`` records the values it was built with. Every other kwarg is planned: changing it
  means planning again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn


class NetOutput(NamedTuple):
    """A training forward's result: logits (tensor or deep-supervision list, full resolution first) + auxiliaries."""

    logits: torch.Tensor | list[torch.Tensor]
    aux: dict[str, torch.Tensor]

    @classmethod
    def of(cls, raw: Any) -> NetOutput:
        """``raw`` as a `NetOutput`: a tensor or a list of tensors are logits without auxiliaries."""
        if isinstance(raw, NetOutput):
            return raw
        if isinstance(raw, tuple):
            raw = list(raw)
        return cls(raw, {})

    @property
    def full_resolution(self) -> torch.Tensor:
        """The full-resolution logits."""
        return self.logits[0] if isinstance(self.logits, list) else self.logits


_COUNTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


class SegmentationNet(nn.Module):
    """Base class of registered networks: the protocol of the module docstring with generic implementations."""

    deep_supervision: bool = False
    plan_patch_size: bool = False
    plan_free_kwargs: tuple[str, ...] = ()

    def set_deep_supervision(self, enabled: bool) -> None:
        """Return the deep-supervision list (True, training) or the full-resolution logits only (False)."""
        self.deep_supervision = enabled

    @classmethod
    def parameter_count(cls, in_channels: int, num_classes: int, **kwargs: Any) -> int:
        """Trainable parameters of the network the kwargs describe (built on the meta device: no memory used)."""
        with torch.device("meta"):
            net = cls(in_channels, num_classes, **kwargs)
        return sum(p.numel() for p in net.parameters() if p.requires_grad)

    @classmethod
    def feature_map_elements(cls, patch_size: Sequence[int], in_channels: int, num_classes: int,
                             **kwargs: Any) -> int:
        """Activation elements of one training sample: the summed outputs of every convolution and dense layer.

        Measured by a training-mode forward on the meta device with hooks; norms, activations and concatenations
        scale with these, which the planner's bytes-per-element calibration absorbs.
        """
        with torch.device("meta"):
            net = cls(in_channels, num_classes, **kwargs)
        total = 0

        def count(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            nonlocal total
            total += output.numel()

        for module in net.modules():
            if isinstance(module, _COUNTED):
                module.register_forward_hook(count)
        net.train()
        with torch.no_grad():
            net(torch.empty((1, in_channels, *patch_size), device="meta"))
        return int(total)


def check_topology(dims: int, n_stages: int, kernel_sizes: Sequence[Sequence[int]],
                   strides: Sequence[Sequence[int]]) -> None:
    """Refuse a plan topology a network cannot be built from: 2 or 3 axes, one kernel and one stride per stage, each
    with an entry per axis, and a first stage at full resolution.

    Raises:
        ValueError: naming what does not fit.
    """
    if dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {dims}")
    if n_stages < 1 or len(kernel_sizes) != n_stages or len(strides) != n_stages:
        raise ValueError(f"{n_stages} stages need as many kernel sizes and strides, "
                         f"got {len(kernel_sizes)} and {len(strides)}")
    if any(len(k) != dims for k in kernel_sizes) or any(len(s) != dims for s in strides):
        raise ValueError(f"every kernel size and stride needs {dims} axes")
    if any(int(s) != 1 for s in strides[0]):
        raise ValueError(f"the first stage runs at full resolution: its strides must be 1, got {list(strides[0])}")


def set_deep_supervision(net: nn.Module, enabled: bool) -> None:
    """Switch deep supervision of ``net`` (a no-op for networks without it)."""
    if hasattr(net, "set_deep_supervision"):
        net.set_deep_supervision(enabled)
