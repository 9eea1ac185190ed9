"""Which memory a plan is sized to: nnU-Net's GPU budget by default, a share of RAM for a CPU plan, and ``tiny``'s
own small budgets; recorded in plans.json and printed by ``decathlete plan``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from decathlete import cli, registry
from decathlete.planning import memory, rules
from decathlete.planning.budget import with_width
from decathlete.planning.plans import MemoryTarget, Plans
from decathlete.recipes.base import get_recipe
from decathlete.synthetic import make_synthetic_dataset
from test_planning import fake_fingerprint

DATASET = {"name": "fake", "channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2},
           "label_values": [0, 1, 2]}
LARGE = fake_fingerprint((140, 170, 140), (1.0, 1.0, 1.0), n_cases=100)  # brain-MR-like, whole image > any patch


def _estimate(config, kind: str, batch: int) -> float:
    return rules.memory_gb(config.network.name, config.network.kwargs, config.patch_size, batch, 1, 3, kind)


def test_cpu_plan_fits_the_ram_share_and_is_smaller_than_the_gpu_plan() -> None:
    target = memory.ram_target(ram_gb=4.0)  # injected: a 4 GiB machine
    assert (target.kind, target.budget_gb, target.source) == ("cpu_ram", 2.0, "RAM 4.0 GiB x 0.5")
    gpu = rules.plan_nnunet(LARGE, DATASET, get_recipe("default")).configurations["3d_fullres"]
    plans = rules.plan_nnunet(LARGE, DATASET, get_recipe("default"), memory=target)
    cpu = plans.configurations["3d_fullres"]
    assert plans.memory_target == target and plans.gpu_memory_gb == 2.0
    assert math.prod(cpu.patch_size) < math.prod(gpu.patch_size)
    # the recorded figure is the CPU estimate of the planned network, written out by hand
    net = registry.get("nets", cpu.network.name)
    elements = net.feature_map_elements(cpu.patch_size, 1, 3, **cpu.network.kwargs)
    base, per_parameter, per_element = memory.CPU_FIT[3]
    by_hand = base + (per_parameter * cpu.parameters + per_element * cpu.batch_size * elements) / 1024**3
    assert cpu.memory_estimate_gb == pytest.approx(by_hand, abs=1e-3)
    assert cpu.batch_size >= 2 and cpu.memory_estimate_gb <= 2.0
    assert _estimate(cpu, "cpu_ram", cpu.batch_size + 1) > 2.0  # the batch is the largest that fits
    for config in plans.configurations.values():
        assert config.memory_estimate_gb <= 2.0


def test_a_ram_share_too_small_for_the_process_is_an_error() -> None:
    with pytest.raises(ValueError, match="does not hold a training process"):
        memory.ram_target(ram_gb=0.4)


def test_which_devices_size_to_ram(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory.torch.cuda, "is_available", lambda: False)
    assert memory.plans_for_cpu("cpu", time_budget=False) and memory.plans_for_cpu("cpu", time_budget=True)
    assert not memory.plans_for_cpu("auto", time_budget=False)  # the default plan stays nnU-Net's
    assert memory.plans_for_cpu("auto", time_budget=True)
    assert not memory.plans_for_cpu("cuda", time_budget=True)
    monkeypatch.setattr(memory.torch.cuda, "is_available", lambda: True)
    assert not memory.plans_for_cpu("auto", time_budget=True)


def test_default_plan_is_sized_to_the_gpu_budget() -> None:
    plans = rules.plan_nnunet(LARGE, DATASET, get_recipe("default"), gpu_memory_gb=8)
    assert plans.memory_target == MemoryTarget("gpu", 8.0, "--gpu-memory")
    preset = rules.plan_nnunet(LARGE, DATASET, get_recipe("resenc_l"), memory=memory.ram_target(ram_gb=4.0))
    assert preset.memory_target.kind == "cpu_ram"  # a GPU preset does not override a CPU plan's RAM
    assert rules.plan_nnunet(LARGE, DATASET, get_recipe("resenc_l")).memory_target == MemoryTarget("gpu", 24.0,
                                                                                                   "recipe")


def test_tiny_stays_small_on_large_images() -> None:
    tiny = get_recipe("tiny")
    default = rules.plan_nnunet(LARGE, DATASET, get_recipe("default")).configurations["3d_fullres"]
    gpu = rules.plan_nnunet(LARGE, DATASET, tiny).configurations["3d_fullres"]
    assert gpu.patch_size == [80, 96, 80] and gpu.batch_size == 2  # before its own budget: 144x176x144 (the image)
    assert math.prod(gpu.patch_size) < math.prod(default.patch_size) / 3
    big_machine = rules.plan_nnunet(LARGE, DATASET, tiny, memory=memory.ram_target(ram_gb=256.0))
    cpu = big_machine.configurations["3d_fullres"]
    assert big_machine.memory_target == MemoryTarget("cpu_ram", tiny.planning.ram_gb, "recipe")
    assert cpu.memory_estimate_gb <= tiny.planning.ram_gb and math.prod(cpu.patch_size) <= 96**3
    # a dataset whose whole image fits keeps the plan it had (hippocampus: nnU-Net's 40x56x40, batch 9)
    hippo = rules.plan_nnunet(fake_fingerprint((36, 50, 35), (1.0, 1.0, 1.0), n_cases=260), DATASET, tiny)
    assert (hippo.configurations["3d_fullres"].patch_size, hippo.configurations["3d_fullres"].batch_size) == \
        ([40, 56, 40], 9)


def test_budget_narrowing_keeps_the_cpu_estimate() -> None:
    plans = rules.plan_nnunet(LARGE, DATASET, get_recipe("default"), memory=memory.ram_target(ram_gb=4.0))
    narrowed = with_width(plans.configurations["3d_fullres"], plans, 8, 2)
    assert narrowed.memory_estimate_gb == pytest.approx(_estimate(narrowed, "cpu_ram", 2), abs=1e-3)


def test_plans_round_trip_the_memory_target_and_old_plans_load() -> None:
    plans = rules.plan_nnunet(LARGE, DATASET, get_recipe("default"), memory=memory.ram_target(ram_gb=4.0))
    data = json.loads(json.dumps(plans.to_dict()))
    assert data["memory_target"] == {"kind": "cpu_ram", "budget_gb": 2.0, "source": "RAM 4.0 GiB x 0.5"}
    assert Plans.from_dict(data).memory_target == plans.memory_target
    del data["memory_target"]
    data["gpu_memory_gb"] = 8.0
    old = Plans.from_dict(data)  # written before the field existed: sized to gpu_memory_gb of GPU memory
    assert (old.memory_target.kind, old.memory_target.budget_gb, old.memory_target.label) == ("gpu", 8.0, "GPU")
    with pytest.raises(ValueError, match="kind"):
        MemoryTarget("tpu", 1.0, "x")


def test_plan_prints_which_memory_the_estimate_is_about(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(memory, "physical_ram_gb", lambda: 8.0)  # the machine fact, injected
    raw = make_synthetic_dataset(tmp_path / "raw", n_cases=3, shape=(16, 40, 40))
    for extra, kind in (([], "GPU"), (["--device", "cpu"], "RAM")):
        assert cli.main(["plan", str(raw), "-o", str(tmp_path / kind), "-j", "1", "-c", "3d_fullres", *extra]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("3d_fullres"))
        assert f" GiB {kind}  " in line
    assert Plans.load(tmp_path / "RAM" / "plans.json").memory_target.source == "RAM 8.0 GiB x 0.5"
