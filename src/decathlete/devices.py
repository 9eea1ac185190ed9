"""Where tensors run and in what layout: device choice, channels-last and mixed precision, for training and inference.

CUDA gets fp16 autocast and channels-last; on the CPU 3D networks run channels-last too (measured with
``benchmarks/cpu_speedups.py``, results in ``benchmarks/results/cpu_speedups.json``) and bf16 stays off.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one (or for a CUDA index torch does not see) is an
    error naming the device, not a silent CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device '{device}': use cpu, cuda, cuda:N or auto") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} was asked for but torch sees no CUDA device; use --device cpu")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()  # checked here: torch itself fails only at the first tensor moved there
        raise ValueError(f"--device {device}: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return chosen


def memory_format(dev: torch.device, dims: int) -> torch.memory_format:
    """Channels-last for networks and their inputs on CUDA, and for 3D on the CPU too (training and prediction)."""
    if dev.type == "cuda" or dims == 3:
        return torch.channels_last_3d if dims == 3 else torch.channels_last
    return torch.contiguous_format


def in_memory_format(image: torch.Tensor, dev: torch.device, dims: int) -> torch.Tensor:
    """``image`` in the layout the network on ``dev`` runs in."""
    return image.contiguous(memory_format=memory_format(dev, dims))


def autocast(dev: torch.device) -> AbstractContextManager:
    """fp16 autocast on CUDA; a no-op elsewhere."""
    return torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda")
