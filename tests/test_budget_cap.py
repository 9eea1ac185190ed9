"""A time budget is a cap: validation sized to it, hopeless budgets refused up front, achieved vs planned reported,
and the refit widening back on a machine that turns quiet. Step, forward and epoch times are injected, never timed."""

from __future__ import annotations

import shutil
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from decathlete import api
from decathlete.io.checkpoint import FINAL, load_checkpoint
from decathlete.planning import budget
from decathlete.planning.plans import Plans
from decathlete.synthetic import make_synthetic_dataset
from decathlete.train import clock as clock_module
from decathlete.train import schedules
from decathlete.train import trainer as trainer_module
from decathlete.train.clock import TrainingClock, achieved_vs_planned
from decathlete.train.trainer import TrainOptions, train


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("budget_cap")
    data = make_synthetic_dataset(root / "raw", n_cases=6, shape=(16, 40, 40))
    api.plan(data, root / "work", workers=1, progress=False, configurations=["3d_fullres"])
    api.preprocess(root / "work", ["3d_fullres"], workers=1, progress=False)
    return root / "work"


def _with_training(workdir: Path, tmp_path: Path, training: dict) -> Path:
    """A copy of ``workdir`` whose plan carries the given budget figures (as `fit_to_budget` writes them)."""
    work = tmp_path / "work"
    shutil.copytree(workdir, work)
    plans = Plans.load(work / "plans.json")
    config = replace(plans.configuration("3d_fullres"), training=training)
    replace(plans, configurations={**plans.configurations, "3d_fullres": config}).save(work / "plans.json")
    return work


def test_validation_takes_a_bounded_share_of_the_budget() -> None:
    assert budget.validation_batches(120, 1, 0.5) == 24  # 10 % of 120 s = 12 s = 24 forwards of 0.5 s
    assert budget.validation_batches(120, 4, 0.5) == 6  # the share is over the run: 4 epochs split it
    assert budget.validation_batches(3600, 1, 0.01) == budget.VAL_ITERATIONS  # nnU-Net's 50 at most
    assert budget.validation_batches(3600, 1, 0.01, default=7) == 7
    assert budget.validation_batches(120, 1, 60.0) == 1  # at least one batch, however heavy
    assert budget.validation_batches(120, 1, None) == 1  # unmeasured: one batch, which measures it


@pytest.mark.parametrize(("budget_s", "step_s", "forward_s"), [
    (60, 17.0, 5.3), (60, 0.5, 3.0), (900, 0.35, 0.12), (120, 2.0, 9.0), (15, 0.05, 0.5), (3600, 1.2, 0.4)])
def test_iterations_and_prediction_charge_the_same_validation(budget_s: float, step_s: float,
                                                                forward_s: float) -> None:
    n = budget.iterations_in(budget_s, step_s, forward_s)
    if n:
        assert budget.predicted_seconds(n, step_s, forward_s, budget_s) <= budget_s
    assert budget.predicted_seconds(n + 1, step_s, forward_s, budget_s) > budget_s
    # validation over the whole run stays within its share, or is a single batch per epoch
    epochs = max(1, -(-n // budget.ITERATIONS_PER_EPOCH))
    v = budget.validation_batches(budget_s, epochs, forward_s)
    assert v == 1 or epochs * v * forward_s <= budget.VAL_SHARE * budget_s


def test_the_reported_plan_no_longer_overruns() -> None:
    """Issue 21: 3 iterations were predicted at 319 s for a 60 s budget (50 validation forwards per epoch)."""
    n = budget.iterations_in(60, 17.0, 5.3)
    assert budget.predicted_seconds(n, 17.0, 5.3, 60) <= 60
    with pytest.raises(ValueError, match=r"cannot hold 10 training steps.*at least 181 s"):
        budget.check_budget_holds(60, 17.0, 5.3, "measured", "plan it narrower")
    budget.check_budget_holds(181, 17.0, 5.3, "measured", "plan it narrower")  # 5 + 170 + 5.3 fits


def test_plan_refuses_a_budget_that_cannot_hold_ten_steps(workdir: Path) -> None:
    plans = Plans.load(workdir / "plans.json")
    config = plans.configuration("3d_fullres")

    def slow(candidate, plans, device):  # every width 2 s/step: 10 steps and a validation need ~25.7 s
        return {"step_seconds": 2.0, "forward_seconds": 0.7}

    with pytest.raises(ValueError, match=r"24 s cannot hold 10 training steps.*--gpu-memory 1.*at least 26 s"):
        budget.fit_to_budget(config, plans, 24, torch.device("cpu"), slow, log=lambda _: None)
    fitted = budget.fit_to_budget(config, plans, 30, torch.device("cpu"), slow, log=lambda _: None)
    assert fitted.training["iterations"] >= 10 and fitted.training["predicted_seconds"] <= 30


def test_train_refuses_up_front_from_the_plans_step_time(workdir: Path, tmp_path: Path) -> None:
    """BraTS' 2 minutes at a plan's heavy step: refused before a fold folder exists, with the estimate and fix (10
    steps of 20 s and a 6 s validation batch: 206 s; the trainer's clock starts after the process's startup)."""
    work = _with_training(workdir, tmp_path, {"step_seconds": 20.0, "forward_seconds": 6.0, "iterations": 250,
                                              "device": "cpu: test", "budget_seconds": 3600})
    with pytest.raises(ValueError, match=r"120 s cannot hold 10 training steps.*~206 s.*decathlete plan .*"
                                         r"--time-budget 2m.*at least 206 s"):
        train(work, TrainOptions("3d_fullres", 0, device="cpu", num_workers=0, progress=False, time_budget="2m"))
    assert not (work / "models").exists()


class _FakeTime:
    """Stands in for the trainer's ``time`` module: each reading is ``tick`` seconds after the last."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


def test_train_without_plan_step_times_refuses_at_its_second_step(workdir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    work = tmp_path / "work"
    shutil.copytree(workdir, work)
    monkeypatch.setattr(trainer_module, "time", _FakeTime(30.0))  # every step reads as 30 s or more
    with pytest.raises(ValueError, match=r"cannot hold 10 training steps.*this run's second step"):
        train(work, TrainOptions("3d_fullres", 0, epochs=1, iterations_per_epoch=3, device="cpu", num_workers=0,
                                 progress=False, time_budget="2m"))


def test_budgeted_run_sizes_validation_and_reports_achieved_vs_planned(workdir: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan's 60 s forward allows 3 of 5 validation batches per epoch (10 % of 3600 s over 2 epochs); the second
    epoch sizes from the measured one; the log ends with steps and s/step against the plan."""
    torch.set_num_threads(1)
    work = _with_training(workdir, tmp_path, {"step_seconds": 0.01, "forward_seconds": 60.0, "iterations": 4,
                                              "device": "cpu: test", "budget_seconds": 3600})
    monkeypatch.setattr(trainer_module, "refit_epochs", lambda *args: 2)  # no recount from real epoch times
    summary = train(work, TrainOptions("3d_fullres", 0, epochs=2, iterations_per_epoch=2, val_iterations=5,
                                       device="cpu", num_workers=0, progress=False, time_budget="1h"))
    saved = load_checkpoint(Path(summary["folder"]) / FINAL)
    assert saved["state"]["history"]["val_batches"] == [3, 5]
    assert saved["settings"]["val_iterations"] == 5
    log = (Path(summary["folder"]) / "training_log.txt").read_text()
    assert "validation: 3 batches per epoch (at most 5; 60.00 s per batch)" in log
    assert "achieved 4 steps of the plan's 4" in log and "against the probe's 0.010 s/step" in log


def test_achieved_vs_planned_says_when_the_machine_looks_busy() -> None:
    planned = {"iterations": 2000, "step_seconds": 0.4}
    quiet = achieved_vs_planned(1900, 0.42, planned)
    assert quiet == ["achieved 1900 steps of the plan's 2000; measured 0.420 s/step against the probe's "
                     "0.400 s/step (1.05x)"]
    busy = achieved_vs_planned(900, 0.6, planned)  # exactly 1.5x: busy
    assert len(busy) == 2 and "looks busy" in busy[1] and "1.5x" in busy[1]
    assert achieved_vs_planned(10, 0.4, None) == [] and achieved_vs_planned(0, None, planned) == []


def _simulate(budget_s: float, epoch_times: list[float]) -> tuple[list[int], list[float], float]:
    """A budgeted run on a fake clock: epoch ``i`` takes ``epoch_times[i]`` (the last repeats); after each epoch
    the refit recounts the total. Returns the totals after each epoch, the end each total foresees (now + the
    epochs left at the recent median), and the seconds at the end, where an epoch the budget cuts short stops at
    the budget, as the trainer's per-step check does."""
    now = [0.0]
    clock = TrainingClock(budget_s, now=lambda: now[0])
    done, totals, foreseen, seconds, total = 0, [], [], [], 10**6
    while done < total and not clock.out_of_time():
        t = epoch_times[min(done, len(epoch_times) - 1)]
        now[0] = min(now[0] + t, budget_s)
        seconds.append(t)
        done += 1
        total = clock.epochs_that_fit(done, seconds)
        totals.append(total)
        foreseen.append(now[0] + (total - done) * statistics.median(seconds[-clock_module.RECENT_EPOCHS:]))
    return totals, foreseen, now[0]


def _within_budget(foreseen: list[float], budget_s: float, epoch_times: list[float]) -> bool:
    """Every refit foresees an end within the budget, up to the half epoch its rounding may add (the trainer's
    per-step check stops that one short)."""
    return all(end <= budget_s + max(epoch_times) / 2 for end in foreseen)


def test_refit_widens_back_when_the_machine_turns_quiet() -> None:
    busy_then_quiet = [40.0] * 4 + [10.0] * 100
    totals, foreseen, end = _simulate(1000, busy_then_quiet)
    assert totals[3] == 4 + 21  # 840 s left at 40 s per epoch
    # two quiet epochs make the recent median 10 s: 820 s left hold 82 more (the median of all six, 40 s: 20)
    assert statistics.median(busy_then_quiet[:6]) == 40.0 and totals[5] == 6 + 82
    assert totals[-1] > totals[3] + 30
    assert _within_budget(foreseen, 1000, busy_then_quiet) and end <= 1000


def test_refit_shrinks_when_the_machine_turns_busy() -> None:
    quiet_then_busy = [10.0] * 5 + [40.0] * 100
    totals, foreseen, end = _simulate(1000, quiet_then_busy)
    assert totals[4] == 5 + 95
    assert totals[-1] < totals[4] - 60  # 870 s left at 40 s per epoch
    assert _within_budget(foreseen, 1000, quiet_then_busy) and end <= 1000


def test_widening_back_never_raises_the_learning_rate() -> None:
    """The total of steps grows with each refit; the clock's progress, hence a poly schedule, never goes back."""
    now = [0.0]
    clock = TrainingClock(1000.0, now=lambda: now[0])
    poly = schedules.poly(0.9)
    rates, step = [], 0
    for total_epochs in (25, 25, 30, 60, 80, 80, 70):  # busy, then quiet and refitted upwards, then a bit busier
        for _ in range(10):
            total = total_epochs * 10
            rates.append(poly(clock.schedule_step(step, total), total))
            step += 1
            now[0] += 1.0
    assert all(b <= a + 1e-12 for a, b in zip(rates, rates[1:]))


def test_recent_epochs_window() -> None:
    assert clock_module.RECENT_EPOCHS == 3
    clock = TrainingClock(100.0, already_s=40.0, now=lambda: 0.0)  # 60 s left
    assert clock.epochs_that_fit(5, [50.0, 50.0, 10.0, 10.0, 12.0]) == 5 + 6  # median of 10, 10, 12
