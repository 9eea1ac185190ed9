"""CPU thread choice and busy-machine detection for time budgets, with injected step times (never real timing)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from decathlete import api
from decathlete.planning import budget, threads
from decathlete.planning.plans import Plans
from decathlete.synthetic import make_synthetic_dataset
from decathlete.train.trainer import TrainOptions, train


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("threads")
    data = make_synthetic_dataset(root / "raw", n_cases=4, shape=(16, 40, 40))
    api.plan(data, root / "work", workers=1, progress=False, configurations=["3d_fullres"])
    return root / "work"


def _at(table: dict[int, tuple[float, float]]):
    """``measure_at(n)``: step seconds and CPU share per thread count, from ``table``."""
    return lambda n: {"step_seconds": table[n][0], "forward_seconds": 0.1, "cpu_share": table[n][1]}


def test_the_faster_thread_count_wins_and_a_quiet_machine_is_not_busy() -> None:
    choice = threads.choose_threads(_at({1: (0.60, 0.99), 2: (0.35, 0.96)}), [1, 2])
    assert choice == {"threads": 2, "step_seconds": {"1": 0.6, "2": 0.35}, "cpu_share": 0.96, "busy": False}
    assert "busy" not in threads.describe(choice)


def test_a_taken_core_makes_one_thread_faster_and_the_machine_busy() -> None:
    # measured on 2 cores with a nice-19 busy loop: 2 threads 1.01 s/step, 1 thread about half as slow as quiet
    choice = threads.choose_threads(_at({1: (0.62, 0.70), 2: (1.01, 0.55)}), [1, 2])
    assert choice["threads"] == 1 and choice["busy"]
    assert "looks busy" in threads.describe(choice) and "70%" in threads.describe(choice)
    tie = threads.choose_threads(_at({1: (0.5, 0.9), 4: (0.5, 0.9)}), [1, 4])
    assert tie["threads"] == 1  # a tie goes to fewer threads


def test_thread_counts_only_on_a_cpu_with_several() -> None:
    assert threads.thread_counts(torch.device("cpu"), 2) == [1, 2]
    assert threads.thread_counts(torch.device("cpu"), 1) == []
    assert threads.thread_counts(torch.device("cuda"), 8) == []


def test_fit_threads_times_the_narrowest_candidate_at_each_count(workdir: Path, monkeypatch) -> None:
    plans = Plans.load(workdir / "plans.json")
    config = plans.configuration("3d_fullres")
    seen = []

    def measure(candidate, _plans, _device, threads=None):
        seen.append((candidate.features_per_stage[0], candidate.batch_size, threads,
                     (candidate.training or {}).get("recipe_overrides")))
        return {"step_seconds": {1: 0.4, 2: 0.3}[threads], "forward_seconds": 0.1, "cpu_share": 0.5}

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    choice = threads.fit_threads(config, plans, torch.device("cpu"), measure, log=lambda _: None)
    adamw = {"optimizer": budget.SHORT_SCHEDULE_OPTIMIZER}
    assert seen == [(8, 2, 1, adamw), (8, 2, 2, adamw)]
    assert choice["threads"] == 2 and choice["busy"]
    assert threads.fit_threads(config, plans, torch.device("cuda"), measure) is None
    fitted = replace(config, training={"iterations": 100})
    recorded = threads.with_threads(fitted, choice)
    assert recorded.training["threads"] == choice and any("busy machine" in n for n in recorded.notes)
    assert threads.with_threads(config, choice) is config  # no budget, nothing to record


def test_torch_threads_restores_the_count() -> None:
    before = torch.get_num_threads()
    with threads.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with threads.torch_threads(None):
        assert torch.get_num_threads() == before


def test_the_trainer_trains_with_the_planned_threads(workdir: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(workdir, work)
    plans = Plans.load(work / "plans.json")
    choice = {"threads": 1, "step_seconds": {"1": 0.1, "2": 0.2}, "cpu_share": 0.6, "busy": True}
    plans.configurations["3d_fullres"] = replace(plans.configuration("3d_fullres"), training={"threads": choice})
    plans.save(work / "plans.json")
    api.preprocess(work, ["3d_fullres"], workers=1, progress=False)
    seen = []
    before = torch.get_num_threads()
    summary = train(work, TrainOptions("3d_fullres", 0, epochs=1, iterations_per_epoch=1, val_iterations=1,
                                       device="cpu", num_workers=0, progress=False),
                    callbacks=[lambda report: seen.append(torch.get_num_threads())])
    assert seen == [1] and torch.get_num_threads() == before
    assert "1 torch thread(s)" in (Path(summary["folder"]) / "training_log.txt").read_text()


def test_the_fitted_network_is_timed_again_and_refitted_when_the_other_count_wins(workdir: Path,
                                                                                monkeypatch) -> None:
    """A narrow step faster on 1 thread, the fitted wide one faster on 2: fitted again at 2 threads, recorded."""
    plans = Plans.load(workdir / "plans.json")
    config = plans.configuration("3d_fullres")
    current = {"threads": 2}  # torch's thread count, as the plan sets and restores it
    monkeypatch.setattr(torch, "get_num_threads", lambda: current["threads"])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: current.update(threads=n))
    seen = []

    def measure(candidate, _plans, _device, threads=None, **_):
        width, threads = candidate.features_per_stage[0], threads or current["threads"]
        seen.append((width, candidate.batch_size, threads))
        per_sample = {1: 0.01 * width, 2: 0.004 * width + 0.05}[threads]  # 2 threads win from width 12 on
        return {"step_seconds": per_sample * candidate.batch_size, "forward_seconds": 0.01, "cpu_share": 0.95}

    fitted = threads.fit_with_threads(config, plans, 3600, torch.device("cpu"), measure, log=lambda _: None)
    assert seen[:2] == [(8, 2, 1), (8, 2, 2)]  # the narrowest: 1 thread wins (0.16 s against 0.164 s)
    assert fitted.training["threads"]["threads"] == 2 and fitted.features_per_stage[0] > 8
    first_fit = [w for w, b, n in seen[2:] if n == 1]
    assert first_fit and all(n == 2 for _, _, n in seen[2 + len(first_fit) + 2:])  # refitted at 2 threads
    assert current["threads"] == 2  # restored

    def narrow_wins(candidate, _plans, _device, threads=None, **_):
        threads = threads or current["threads"]
        return {"step_seconds": {1: 1.0, 2: 2.0}[threads] * candidate.batch_size, "forward_seconds": 0.01,
                "cpu_share": 0.9}

    slow = threads.fit_with_threads(config, plans, 300, torch.device("cpu"), narrow_wins, log=lambda _: None)
    assert slow.training["threads"]["threads"] == 1 and slow.features_per_stage[0] == 8
