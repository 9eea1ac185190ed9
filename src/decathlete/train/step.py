"""The one training step: augment on the device -> targets -> forward (autocast, channels-last) -> the recipe's loss
-> scaled backward -> gradient clipping -> optimiser step. The trainer runs it every iteration and the budget probe
(`decathlete.train.probe`) times it, so a plan made for a time budget measures exactly what training will run.

A cascade stage's label carries the previous stage's labels as its second channel (`decathlete.data.sampling`); the
step moves them into the input, one-hot and augmented (`decathlete.data.cascade.previous_stage_channels`), after
the spatial augmentation moved them with the label.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from decathlete.augment import AugmentConfig, augment
from decathlete.data.cascade import previous_stage_channels
from decathlete.devices import autocast, in_memory_format
from decathlete.labels import LabelScheme
from decathlete.losses.base import TrainingBatch, TrainingLoss
from decathlete.losses.deep_supervision import downsample_target, ds_factors
from decathlete.nets.base import NetOutput
from decathlete.planning.plans import Configuration, Plans
from decathlete.recipes.base import Recipe
from decathlete.recipes.build import build_augmentation, build_loss, build_transforms


class TrainStep:
    """One optimiser step on a sampled batch, and the un-augmented forward that validation runs.

    Args:
        net: the network as the loop calls it (possibly compiled or wrapped in DDP), on ``device``.
        loss: the recipe's loss, called as ``loss(output, batch)``.
        optimizer: over ``net``'s parameters.
        augmentation: the recipe's augmentation for this configuration.
        labels: the outputs' meaning (targets from label maps).
        config: the configuration (patch size, strides for the deep-supervision grids, dimensionality).
        grad_clip: gradient-norm clip, or None.
        device: where the step runs; CUDA adds fp16 autocast with a gradient scaler.
        transforms: extra batch transforms after the augmentation, ``(image, label, generator) -> (image, label)``.
        previous_stage_values: for a cascade stage, the label values of the previous stage's one-hot channels.
    """

    def __init__(self, net: torch.nn.Module, loss: TrainingLoss, optimizer: torch.optim.Optimizer,
                 augmentation: AugmentConfig, labels: LabelScheme, config: Configuration, grad_clip: float | None,
                 device: torch.device, transforms: Sequence[Callable[..., Any]] = (),
                 previous_stage_values: Sequence[int] | None = None) -> None:
        self.net, self.loss, self.optimizer, self.transforms = net, loss, optimizer, list(transforms)
        self.augmentation, self.labels, self.grad_clip, self.device = augmentation, labels, grad_clip, device
        self.patch_size, self.dims = list(config.patch_size), config.spatial_dims
        self.factors = ds_factors(config.strides)
        self.scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
        self.previous_stage_values = None if previous_stage_values is None else list(previous_stage_values)

    @property
    def label_channels(self) -> int:
        """Channels of the sampled label: 2 for a cascade stage (its previous stage's labels second), else 1."""
        return 1 if self.previous_stage_values is None else 2

    def with_previous_stage(self, image: torch.Tensor, previous: torch.Tensor,
                            generator: torch.Generator | None = None) -> torch.Tensor:
        """The network input: for a cascade stage ``image`` with the previous stage's labels ``previous``
        ``(B, 1, ...)`` appended one-hot (augmented when a ``generator`` is given); else ``image`` itself."""
        if self.previous_stage_values is None:
            return image
        return previous_stage_channels(image, previous, self.previous_stage_values, generator)

    def batch(self, image: torch.Tensor, label: torch.Tensor) -> TrainingBatch:
        """The batch as the loss sees it: targets on every deep-supervision grid."""
        return TrainingBatch(image, label, downsample_target(self.labels.targets(label), self.factors))

    def __call__(self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator,
                 lr: float) -> torch.Tensor:
        """Train on one sampled crop batch (on the device); returns the detached loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        image, label = augment(image, label, self.patch_size, self.augmentation, generator)
        label, previous = label[:, :1], label[:, 1:]
        for transform in self.transforms:
            image, label = transform(image, label, generator)
        batch = self.batch(self.with_previous_stage(image, previous, generator), label)
        with autocast(self.device):
            output = NetOutput.of(self.net(in_memory_format(batch.image, self.device, self.dims)))
            loss = self.loss(output, batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    @torch.no_grad()
    def evaluate(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and full-resolution logits on an un-augmented batch (the network's mode is the caller's)."""
        batch = self.batch(self.with_previous_stage(image, label[:, 1:]), label[:, :1])
        with autocast(self.device):
            output = NetOutput.of(self.net(in_memory_format(batch.image, self.device, self.dims)))
            loss = self.loss(output, batch).float()
        return loss, output.full_resolution


def build_step(recipe: Recipe, config: Configuration, plans: Plans, net: torch.nn.Module,
               optimizer: torch.optim.Optimizer, device: torch.device,
               world_size: int = 1) -> tuple[TrainStep, Sequence[int]]:
    """The recipe's training step for ``net`` and the crop size its augmentation needs from the sampler."""
    augmentation, input_size = build_augmentation(recipe, config)
    loss = build_loss(recipe, config, plans, world_size).to(device)
    labels = LabelScheme.from_dataset(plans.dataset)
    previous = labels.foreground_values if config.previous_stage else None
    step = TrainStep(net, loss, optimizer, augmentation, labels, config, recipe.grad_clip, device,
                     build_transforms(recipe), previous)
    return step, input_size
