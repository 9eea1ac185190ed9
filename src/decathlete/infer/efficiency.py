"""What a prediction run cost: ``OUT/efficiency.json`` next to every prediction folder.

FLARE ranks by accuracy *and* by running time and GPU memory; a user choosing between recipes needs both. For every
case predicted the predictor records:

* wall seconds per phase: ``preprocess`` (read, transpose, crop, resample, normalise), ``network`` (sliding window,
  mirroring, fold ensemble) and ``export`` (resampling back, postprocessing, writing);
* peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset per case); on the CPU the peak resident set of
  the process during the case (`PeakMemory`), recorded with which it is;
* the network inputs it ran (``patches``: tiles x mirrors x folds, counted by a forward hook, so whatever the sliding
  window decided) and their FLOPs.

The run records the networks' parameter count and the FLOPs of one training-size patch. FLOPs are counted by
``torch.utils.flop_counter`` (two per multiply-add; convolutions and matrix products, not normalisation or
activations) on a copy of the network on the ``meta`` device, so counting costs no arithmetic on any machine.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from decathlete.metrics.efficiency import PHASES

_STATM = Path("/proc/self/statm")


def count_parameters(net: torch.nn.Module) -> int:
    """Trainable and frozen parameters of ``net``."""
    return sum(p.numel() for p in net.parameters())


def count_flops(build: Callable[[], torch.nn.Module], in_channels: int, shape: Sequence[int]) -> int:
    """FLOPs of one forward pass of a ``(1, in_channels, *shape)`` input through the network ``build()`` makes,
    counted on the meta device (``build`` runs inside ``torch.device("meta")``)."""
    with torch.device("meta"):
        net = build().eval()
        x = torch.empty((1, in_channels, *[int(s) for s in shape]))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    return int(counter.get_total_flops())


class PeakMemory:
    """The peak memory of one case, between `start` and `stop`: CUDA allocations on a GPU, the resident set on the CPU.

    On the CPU the process's own peak counter (``getrusage``) is exact but can only grow, and resetting it (Linux's
    ``clear_refs``) would falsify what ``/usr/bin/time`` and other tools report for the process. So a case's peak is
    that counter when the case raised it, and otherwise the largest resident set seen by a thread that reads
    ``/proc/self/statm`` every ``interval`` seconds (where there is no ``/proc``, the process's peak so far).
    """

    def __init__(self, device: torch.device, interval: float = 0.01) -> None:
        self.device, self.interval = device, interval
        if device.type == "cuda":
            self.kind = "cuda_max_memory_allocated"
        else:
            self.kind = "cpu_peak_rss" if _STATM.is_file() else "cpu_peak_rss_since_start"
        self._before, self._sampled, self._stop, self._thread = 0.0, 0.0, threading.Event(), None

    def start(self) -> None:
        """Start measuring a case."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self._before, self._sampled = _process_peak_mib(), 0.0
        if self.kind == "cpu_peak_rss":
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        page_mib = os.sysconf("SC_PAGE_SIZE") / 2**20
        while True:
            self._sampled = max(self._sampled, int(_STATM.read_text().split()[1]) * page_mib)
            if self._stop.wait(self.interval):
                return

    def stop(self) -> float:
        """The case's peak (MiB)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        after = _process_peak_mib()
        if self.kind != "cpu_peak_rss" or after > self._before:
            return max(after, self._sampled)
        return self._sampled


def _process_peak_mib() -> float:
    """The process's peak resident set so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class EfficiencyMeter:
    """Records the cost of each case a predictor runs (module docstring).

    Args:
        networks: the networks the predictor runs (their inputs are counted by forward pre-hooks).
        build: makes one more such network (for FLOP counting on the meta device).
        in_channels: input channels.
        patch_size: the training patch, whose FLOPs the run reports.
        device: the compute device.
    """

    def __init__(self, networks: Sequence[torch.nn.Module], build: Callable[[], torch.nn.Module], in_channels: int,
                 patch_size: Sequence[int], device: torch.device) -> None:
        self.networks, self.build, self.in_channels = list(networks), build, in_channels
        self.patch_size = [int(s) for s in patch_size]
        self.memory = PeakMemory(device)
        self.device = device
        self.inputs: Counter[tuple[int, ...]] = Counter()
        self._flops: dict[tuple[int, ...], int | None] = {}

    def _count(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        self.inputs[tuple(int(s) for s in x.shape[2:])] += int(x.shape[0])

    def flops(self, shape: Sequence[int]) -> int | None:
        """FLOPs of one input of ``shape`` (cached; None when the network cannot run on the meta device)."""
        key = tuple(int(s) for s in shape)
        if key not in self._flops:
            try:
                self._flops[key] = count_flops(self.build, self.in_channels, key)
            except (RuntimeError, NotImplementedError, TypeError, ValueError):
                self._flops[key] = None
        return self._flops[key]

    @contextmanager
    def case(self, record: dict[str, Any]) -> Iterator[dict[str, float]]:
        """Measure one case: yields a dict of phase seconds for `phase` to fill; fills ``record`` on exit."""
        self.inputs.clear()
        seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        handles = [net.register_forward_pre_hook(self._count) for net in self.networks]
        self.memory.start()
        start = time.perf_counter()
        try:
            yield seconds
        finally:
            for handle in handles:
                handle.remove()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            total = time.perf_counter() - start  # before counting FLOPs, which is the meter's cost, not the case's
            peak = self.memory.stop()
        per_input = {shape: self.flops(shape) for shape in self.inputs}
        known = all(f is not None for f in per_input.values())
        record.update({"seconds": round(total, 4),
                       **{f"{k}_seconds": round(v, 4) for k, v in seconds.items()},
                       "peak_memory_mib": round(peak, 1),
                       "patches": sum(self.inputs.values()),
                       "input_shapes": {"x".join(map(str, s)): n for s, n in sorted(self.inputs.items())},
                       "flops": sum(n * (per_input[s] or 0) for s, n in self.inputs.items()) if known else None})

    def run_record(self, **about: Any) -> dict[str, Any]:
        """What the run is: device, parameters, FLOPs per training patch, and ``about`` (model, folds ...)."""
        return {"device": str(self.device), "torch_threads": torch.get_num_threads(),
                "memory_kind": self.memory.kind,
                "parameters": count_parameters(self.networks[0]) if self.networks else 0,
                "networks": len(self.networks), "patch_size": self.patch_size,
                "flops_per_patch": self.flops(self.patch_size), **about}


@contextmanager
def phase(seconds: dict[str, float] | None, name: str) -> Iterator[None]:
    """Add the wall seconds of the block to ``seconds[name]`` (nothing when ``seconds`` is None)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if seconds is not None:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
