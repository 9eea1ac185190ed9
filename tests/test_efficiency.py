"""The efficiency report of ``predict`` (``OUT/efficiency.json``): FLOPs by hand, the patch counter, peak memory,
merging runs, and ``--nsd-tolerance LABEL=MM`` parsing. The report of a real prediction is checked end to end in
``test_flare21.py``."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from decathlete.evaluate import parse_tolerances
from decathlete.infer.efficiency import EfficiencyMeter, PeakMemory, count_flops, count_parameters, phase
from decathlete.metrics.efficiency import EFFICIENCY_FILE, describe, efficiency_of, summarise, write_efficiency


def test_flops_of_one_convolution_by_hand() -> None:
    """A 3x3x3 convolution, 2 -> 3 channels, on a 4^3 input with padding 1: every one of the 64 x 3 outputs takes
    2 x 27 multiply-adds, two FLOPs each; the bias is not counted (as torch's counter)."""
    assert count_flops(lambda: nn.Conv3d(2, 3, 3, padding=1), 2, (4, 4, 4)) == 2 * 64 * 3 * 2 * 27
    # a strided 2D convolution: 3 x 3 outputs of 5 channels, each 4 x 2 x 2 multiply-adds
    assert count_flops(lambda: nn.Conv2d(4, 5, 2, stride=2), 4, (6, 6)) == 2 * 9 * 5 * 4 * 4


def test_flops_cost_no_arithmetic_and_parameters_are_counted() -> None:
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.InstanceNorm2d(8), nn.LeakyReLU(), nn.Conv2d(8, 2, 1))
    assert count_parameters(net) == (8 * 9 + 8) + (2 * 8 + 2)
    # a 4096^2 input would need ~4 GB of activations: on the meta device nothing is allocated
    assert count_flops(lambda: nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 2, 1)), 1, (4096, 4096)) \
        == 2 * 4096**2 * (8 * 9 + 2 * 8)


def test_the_meter_counts_every_network_input_and_its_flops() -> None:
    net = nn.Conv2d(1, 2, 3, padding=1).eval()
    meter = EfficiencyMeter([net], lambda: nn.Conv2d(1, 2, 3, padding=1), 1, (8, 8), torch.device("cpu"))
    record: dict = {}
    with meter.case(record) as seconds, torch.no_grad(), phase(seconds, "network"):
        net(torch.zeros(3, 1, 8, 8))
        net(torch.zeros(2, 1, 16, 8))
    assert record["patches"] == 5 and record["input_shapes"] == {"16x8": 2, "8x8": 3}
    assert record["flops"] == 3 * (2 * 64 * 2 * 9) + 2 * (2 * 128 * 2 * 9)
    assert 0 < record["network_seconds"] <= record["seconds"] and record["preprocess_seconds"] == 0
    assert not net._forward_pre_hooks  # the hooks are gone after the case
    run = meter.run_record(model="m")
    assert run["flops_per_patch"] == 2 * 64 * 2 * 9 and run["parameters"] == 2 * 9 + 2 and run["model"] == "m"


def test_cpu_peak_memory_is_per_case() -> None:
    """A case that raises the process's peak gets it exactly; a later, smaller case gets its own (sampled) peak, not
    the earlier one; the process's peak counter is never reset (``/usr/bin/time`` still sees the true one)."""
    memory = PeakMemory(torch.device("cpu"))
    if memory.kind != "cpu_peak_rss":
        pytest.skip(f"no /proc/self/statm to sample the resident set ({memory.kind})")
    memory.start()
    block = np.ones(256 * 2**20 // 8)  # 256 MiB, touched: above anything this test process held before
    big = memory.stop()
    del block
    memory.start()
    block = np.ones(32 * 2**20 // 8)
    time.sleep(0.1)  # the sampler reads the resident set every 10 ms
    small = memory.stop()
    del block
    assert big - small > 150 and small > 32
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 >= big


def _case(seconds: float, peak: float, patches: int = 4) -> dict:
    return {"seconds": seconds, "preprocess_seconds": seconds / 4, "network_seconds": seconds / 2,
            "export_seconds": seconds / 4, "peak_memory_mib": peak, "patches": patches, "flops": 10 * patches}


def test_summaries_merge_runs_and_describe(tmp_path: Path) -> None:
    run = {"device": "cpu", "parameters": 2_500_000, "flops_per_patch": 3e9}
    write_efficiency(tmp_path, run, {"a": _case(2.0, 100.0), "b": _case(4.0, 300.0)})
    record = write_efficiency(tmp_path, {**run, "device": "cuda:0"}, {"b": _case(1.0, 50.0), "c": _case(3.0, 70.0)})
    assert sorted(record["cases"]) == ["a", "b", "c"] and record["cases"]["b"]["seconds"] == 1.0
    assert record["earlier_runs"][0]["cases"] == ["a"] and record["earlier_runs"][0]["device"] == "cpu"
    assert record["summary"]["mean_seconds"] == pytest.approx(2.0) and record["summary"]["max_peak_memory_mib"] == 100
    assert json.loads((tmp_path / EFFICIENCY_FILE).read_text()) == record
    line = describe(record)
    assert "3 case(s), 2.00 s/case" in line and "peak GPU 100 MiB" in line and "2.50 M parameters" in line
    assert "3.00 GFLOPs per patch" in line and "4 patches per case" in line
    scored = efficiency_of(tmp_path, ["a", "c", "z"])
    assert scored["summary"]["n_cases"] == 2 and scored["summary"]["mean_seconds"] == pytest.approx(2.5)
    assert scored["cases_without_record"] == ["z"]
    assert efficiency_of(tmp_path / "nowhere", ["a"]) is None
    assert summarise({}) == {"n_cases": 0}


def test_nsd_tolerances_from_the_command_line() -> None:
    labels = {"Brainstem": 1, "Mandible": 7, "both": [1, 7]}
    assert parse_tolerances(["2"], labels) == 2.0
    assert parse_tolerances(["mandible=3", "1=0.5"], labels) == {"Mandible": 3.0, "Brainstem": 0.5}
    assert parse_tolerances(["2", "Mandible=3"], labels) == {"*": 2.0, "Mandible": 3.0}
    assert parse_tolerances(["7=1.5"], None) == {"7": 1.5}
    with pytest.raises(ValueError, match="names the label 'Larynx'"):
        parse_tolerances(["Larynx=2"], labels)
    with pytest.raises(ValueError, match="MM or LABEL=MM"):
        parse_tolerances(["Mandible:2"], labels)
    with pytest.raises(ValueError, match="twice"):
        parse_tolerances(["1", "2"], labels)
