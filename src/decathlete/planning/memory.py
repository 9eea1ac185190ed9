"""Which memory a plan is sized to: a GPU's (nnU-Net's rule) or, for a plan made for the CPU, this machine's RAM.

nnU-Net sizes patch and batch to GPU memory (`decathlete.planning.rules.memory_gb`: activations under fp16 autocast,
calibrated on nnU-Net's reference points). Training on the CPU runs in fp32 without autocast, with the data loading
in the same process (``num_workers`` 0 on the CPU), and what runs out is the machine's RAM. So a plan made for the
CPU (``plan --device cpu``, or ``auto`` resolving to the CPU when a ``--time-budget`` is given; without either the
plan stays nnU-Net's) is sized to ``RAM_SHARE`` of physical RAM with an estimate of the training process's peak
resident memory:

    peak_rss = base + bytes_per_parameter * parameters + bytes_per_element * batch * elements   (CPU_FIT[dims])

``elements`` are the network's activation elements per sample, the same ``feature_map_elements`` the GPU estimate
uses. The constants are a least-squares fit to the peak RSS of real CPU training steps (the trainer's `TrainStep`:
augmentation, forward, loss, backward, clipping, SGD step) at two or three patch sizes of each of two widths, plus a
wide network on a small patch (which separates the parameter term), in 3D and in 2D; two whole ``decathlete train``
processes on CPU plans (data loading, steps, validation, checkpoints) peaked within 4 % of their estimates:
``benchmarks/cpu_memory_calibration.py``, results in ``benchmarks/results/cpu_memory_calibration.json``.

Why half of physical RAM (``RAM_SHARE``): the estimate covers the training step; the rest of the machine holds what
it does not. The training process also holds the data loader's decompressed cases (a large CT case is 0.5-1 GiB in
float32), validation batches and checkpoint copies of the weights; the OS and its page cache (which keeps the
preprocessed data fast to read) need room; other work shares the machine (a second run, preprocessing, an editor,
other users); the fit is up to 3.5 % off at its points and allocator fragmentation grows over a long run; and
many machines have no swap, so running out kills the run instead of slowing it. Physical RAM, not what is free
now, so the same machine always gets the same plan.
"""

from __future__ import annotations

import math
import os

import torch

from decathlete.planning.plans import MemoryTarget
from decathlete.recipes.base import Recipe

GIB = 1024**3
RAM_SHARE = 0.5
# Per spatial dimensionality: (base GiB, bytes per parameter, bytes per activation element), the least-squares fit
# of benchmarks/results/cpu_memory_calibration.json (torch 2.13 CPU, 2 threads; 3D channels-last), within 3.5 % of
# every measured peak. The base is the interpreter, torch and its allocator pools; a parameter's weight, gradient
# and momentum are 12 bytes (fp32), part of which the fit, over networks whose size grows with the patch, puts in
# the base (the pair of points that differ in the network alone measures 11.6).
CPU_FIT = {3: (0.681, 6.04, 11.68), 2: (0.509, 9.40, 12.29)}
CPU_BASE_GB = max(base for base, _, _ in CPU_FIT.values())


def cpu_ram_gb(parameters: int, elements: int, batch: int, dims: int) -> float:
    """Peak resident memory in GiB of CPU training with ``batch`` samples of ``elements`` activation elements each,
    through a network of ``parameters`` weights (``dims`` spatial axes)."""
    base, per_parameter, per_element = CPU_FIT[dims]
    return base + (per_parameter * parameters + per_element * batch * elements) / GIB


def physical_ram_gb() -> float:
    """This machine's physical RAM in GiB (psutil where installed, else POSIX ``sysconf``)."""
    try:
        import psutil
    except ImportError:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB
    return psutil.virtual_memory().total / GIB


def ram_target(ram_gb: float | None = None, share: float = RAM_SHARE) -> MemoryTarget:
    """A CPU RAM target: ``share`` of ``ram_gb`` (default: this machine's physical RAM)."""
    total = physical_ram_gb() if ram_gb is None else float(ram_gb)
    budget = total * share
    if budget <= CPU_BASE_GB:
        raise ValueError(f"{share:g} of {total:.2f} GiB RAM ({budget:.2f} GiB) does not hold a training process "
                         f"(about {CPU_BASE_GB} GiB before any network)")
    return MemoryTarget("cpu_ram", round(budget, 3), f"RAM {total:.1f} GiB x {share:g}")


def plans_for_cpu(device: str, time_budget: bool) -> bool:
    """Whether ``plan --device DEVICE`` sizes to RAM: an explicit CPU device, or ``auto`` on a machine without CUDA
    when a time budget is given (its step times are measured on the CPU); otherwise nnU-Net's GPU plan."""
    if device == "auto":
        return time_budget and not torch.cuda.is_available()
    try:
        return torch.device(device).type == "cpu"
    except RuntimeError:  # an unknown name is reported where the device is used
        return False


def resolve_target(recipe: Recipe, gpu_memory_gb: float, memory: MemoryTarget | None = None) -> MemoryTarget:
    """What a planner fits to: the CPU RAM target ``memory``, capped at the recipe's ``planning.ram_gb``; or GPU
    memory, the recipe's ``planning.gpu_memory_gb`` (a preset's, nnU-Net's ResEnc L/XL) else ``gpu_memory_gb``."""
    p = recipe.planning
    if memory is not None and memory.kind == "cpu_ram":
        if p.ram_gb is not None and p.ram_gb < memory.budget_gb:
            return MemoryTarget("cpu_ram", float(p.ram_gb), "recipe")
        return memory
    if p.gpu_memory_gb is not None:
        return MemoryTarget("gpu", float(p.gpu_memory_gb), "recipe")
    return memory or MemoryTarget("gpu", float(gpu_memory_gb), "--gpu-memory")


def fits_batch(budget_gb: float, fixed_gb: float, per_sample_gb: float, kind: str) -> int:
    """Samples that fit ``budget_gb`` beside ``fixed_gb``: nnU-Net rounds the GPU batch to the nearest; RAM is a hard
    limit, so a CPU batch rounds down."""
    fits = (budget_gb - fixed_gb) / per_sample_gb
    return round(fits) if kind == "gpu" else math.floor(fits)
