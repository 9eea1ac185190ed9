"""Typed plans: the JSON contract between planning, preprocessing, training and inference.

Every shape, spacing and stride is in array-axis order (z, y, x) — (y, x) for the in-plane entries of a 2D
configuration — as ``../shared/docs/cli-contract.md`` requires, after the plan's axis transposition: like nnU-Net v2,
the planner moves the coarsest axis first (``Plans.transpose_forward``), so that every later rule that assumes
"axis 0 is the thick one" (anisotropic pooling, the 2D slice axis, dummy-2D augmentation) holds for sagittal and
coronal stacks too. Preprocessing transposes each case forward, inference transposes its prediction back; with
the usual axial data the transposition is the identity. A network is named by registry key plus JSON kwargs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from decathlete.io.atomic import write_json_atomic

# 2: plans carry transpose_forward/backward. An older reader would ignore them and write predictions in the wrong
# axis order, so it must refuse; version-1 plans load with the identity transposition.
PLANS_VERSION = 2
IDENTITY = (0, 1, 2)


def inverse_permutation(order: Sequence[int]) -> list[int]:
    """The permutation that undoes ``order`` (``transpose_backward`` for ``transpose_forward``)."""
    return [int(a) for a in np.argsort(np.asarray(order))]


def check_transpose(order: Sequence[int]) -> list[int]:
    """``order`` as a list of ints, or ValueError when it is not a permutation of the three spatial axes."""
    axes = [int(a) for a in order]
    if sorted(axes) != list(IDENTITY):
        raise ValueError(f"a transposition must be a permutation of (0, 1, 2), got {list(order)}")
    return axes


@dataclass
class NetworkSpec:
    """A registered network and the kwargs to build it (excluding in/out channels, which come from the dataset)."""

    name: str
    kwargs: dict[str, Any]


MEMORY_KINDS = {"gpu": "GPU", "cpu_ram": "RAM"}  # kind -> how `decathlete plan` names it


@dataclass
class MemoryTarget:
    """Which memory the patch and batch were sized to, and so what ``memory_estimate_gb`` is about.

    Attributes:
        kind: ``gpu`` (nnU-Net's estimate: activations under fp16 autocast) or ``cpu_ram`` (fp32 training in this
            process's resident memory, `decathlete.planning.memory`).
        budget_gb: the budget the plan was fitted to, in GiB.
        source: where the budget came from: ``--gpu-memory``, ``recipe`` (a preset's own), or the machine's RAM and
            the share of it planned for (``RAM 23.4 GiB x 0.5``).
    """

    kind: str
    budget_gb: float
    source: str

    def __post_init__(self) -> None:
        if self.kind not in MEMORY_KINDS:
            raise ValueError(f"memory target kind must be one of {', '.join(MEMORY_KINDS)}, got '{self.kind}'")

    @property
    def label(self) -> str:
        """``GPU`` or ``RAM``: what a printed estimate is about."""
        return MEMORY_KINDS[self.kind]


@dataclass
class Configuration:
    """One trainable configuration (``2d``, ``3d_fullres``, ``3d_lowres``, ``3d_cascade_fullres``).

    Attributes:
        spacing: target voxel spacing in mm, (z, y, x), used by preprocessing (3 values for 2D configs too).
        patch_size: network input size, (z, y, x) for 3D and (y, x) for 2D.
        batch_size: samples per optimiser step.
        strides: per stage, downsampling per patch axis; the first stage is all ones.
        kernel_sizes: per stage, convolution kernel per patch axis.
        features_per_stage: encoder width per stage.
        normalization: one spec per channel (``{"scheme": "ct"|"zscore"|"none", ...}``).
        network: registry key + kwargs that build the network (the same description the memory estimate used).
        median_shape: median case shape at ``spacing`` (z, y, x), after cropping to the nonzero region.
        resampling: orders and anisotropy threshold for preprocessing and its inverse.
        memory_estimate_gb: estimated training memory for this patch and batch, of the plans' ``memory_target`` kind.
        parameters: trainable parameter count of the network.
        data_identifier: subfolder name of the preprocessed data (configurations with equal spacing may share it).
        spatial_dims: 2 or 3.
        batch_dice: compute the Dice loss over the whole batch rather than per sample.
        crop_to_nonzero: preprocessing crops each case to its nonzero box (nnU-Net); False keeps whole volumes.
        notes: human-readable remarks of the planner.
        training: set when planned for a time budget (``planning/budget.py``): the budget, the probed device, the
            measured step time, iterations/epochs the trainer uses and the predicted training seconds.
        previous_stage: a cascade stage (nnU-Net's ``3d_cascade_fullres``) names the configuration whose
            cross-validation predictions it takes as extra input channels, one-hot per foreground label
            (`decathlete.data.cascade`); None for a configuration that sees only the images.
    """

    spacing: list[float]
    patch_size: list[int]
    batch_size: int
    strides: list[list[int]]
    kernel_sizes: list[list[int]]
    features_per_stage: list[int]
    normalization: list[dict[str, Any]]
    network: NetworkSpec
    median_shape: list[int]
    resampling: dict[str, Any]
    memory_estimate_gb: float
    parameters: int
    data_identifier: str
    spatial_dims: int
    batch_dice: bool = False
    crop_to_nonzero: bool = True
    notes: list[str] = field(default_factory=list)
    training: dict[str, Any] | None = None
    previous_stage: str | None = None

    @property
    def n_stages(self) -> int:
        return len(self.features_per_stage)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Configuration:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["network"] = NetworkSpec(**d["network"])
        return cls(**kwargs)


@dataclass
class Plans:
    """Everything the later stages need, written to ``WORKDIR/plans.json``.

    Attributes:
        dataset: the dataset summary (root, channels, labels, regions ...).
        fingerprint_summary: the planner-relevant part of the fingerprint.
        planner: registry key of the planner.
        recipe: name of the recipe the plans were made for.
        gpu_memory_gb: the memory budget planned for, in GiB (of the kind ``memory_target`` names).
        configurations: ``2d``, ``3d_fullres``, ``3d_lowres`` ...
        recipe_settings: that recipe, resolved (with its ``--set`` overrides), as JSON; training starts from it.
        transpose_forward: the data's array axes in the order the configurations use (the coarsest target-spacing
            axis first, the others in their order; nnU-Net v2): array ``a`` becomes ``a.transpose(forward)``.
            Identity for plans made before the field existed.
        transpose_backward: its inverse, which maps a prediction back to the data's own axis order.
        memory_target: which memory patch and batch were sized to (GPU or this machine's RAM) and why; plans made
            before the field existed were sized to ``gpu_memory_gb`` of GPU memory.
        budget_choice: for plans made for a time budget, the configuration to train within it and why
            (`decathlete.planning.budget.choose_configuration`); None without a budget.
    """

    dataset: dict[str, Any]
    fingerprint_summary: dict[str, Any]
    planner: str
    recipe: str
    gpu_memory_gb: float
    configurations: dict[str, Configuration]
    version: int = PLANS_VERSION
    recipe_settings: dict[str, Any] | None = None
    transpose_forward: list[int] = field(default_factory=lambda: list(IDENTITY))
    transpose_backward: list[int] = field(default_factory=lambda: list(IDENTITY))
    memory_target: MemoryTarget | None = None
    budget_choice: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.memory_target is None:
            self.memory_target = MemoryTarget("gpu", float(self.gpu_memory_gb), "gpu_memory_gb")
        elif isinstance(self.memory_target, dict):
            self.memory_target = MemoryTarget(**self.memory_target)
        self.transpose_forward = check_transpose(self.transpose_forward)
        self.transpose_backward = check_transpose(self.transpose_backward)
        if self.transpose_backward != inverse_permutation(self.transpose_forward):
            raise ValueError(f"transpose_backward {self.transpose_backward} does not undo transpose_forward "
                             f"{self.transpose_forward}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plans:
        if d.get("version", 0) > PLANS_VERSION:
            raise ValueError(f"plans version {d['version']} is newer than this decathlete reads ({PLANS_VERSION})")
        configs = {name: Configuration.from_dict(c) for name, c in d["configurations"].items()}
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in d.items() if k in known}, "configurations": configs})

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Plans:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `decathlete plan DATASET -o {path.parent}` first")
        return cls.from_dict(json.loads(path.read_text()))

    def configuration(self, name: str) -> Configuration:
        if name not in self.configurations:
            raise KeyError(f"configuration '{name}' is not in the plans; available: {', '.join(self.configurations)}")
        return self.configurations[name]

    def preprocessing_config(self, name: str) -> dict[str, Any]:
        """Configuration ``name`` as the JSON dict `decathlete.preprocess.pipeline` reads, with the plan-wide
        ``transpose_forward``: training's cache and a prediction's input are made from exactly this."""
        return {**json.loads(json.dumps(asdict(self.configuration(name)))),
                "transpose_forward": list(self.transpose_forward)}
