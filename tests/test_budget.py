"""Time-budget planning and training: durations, narrowing rules, the probe, the wall-clock stop and annealing."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from decathlete import api
from decathlete.io.checkpoint import FINAL, load_checkpoint
from decathlete.planning import budget
from decathlete.planning.plans import NetworkSpec, Plans
from decathlete.recipes.build import build_network
from decathlete.synthetic import make_synthetic_dataset
from decathlete.train import schedules
from decathlete.train import trainer as trainer_module
from decathlete.train.clock import TrainingClock, extended_anchor, refit_epochs, schedule_position
from decathlete.train.distributed import World
from decathlete.train.trainer import TrainOptions, train

SHAPE = (16, 40, 40)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("budget")
    data = make_synthetic_dataset(root / "raw", n_cases=6, shape=SHAPE)
    api.plan(data, root / "work", workers=1, progress=False, configurations=["3d_fullres"])
    return root / "work"


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("20m", 1200), ("1h30m", 5400), ("6h", 21600),
                                               ("45", 45), (2.5, 2.5), ("1d", 86400)])
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert budget.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "twenty minutes", "20 min", "-5m", "0"])
def test_parse_duration_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="duration|positive"):
        budget.parse_duration(text)


def test_with_width_scales_features_and_recounts(workdir: Path) -> None:
    plans = Plans.load(workdir / "plans.json")
    config = plans.configuration("3d_fullres")
    assert config.features_per_stage[0] == 32
    narrow = budget.with_width(config, plans, 8, 2)
    assert narrow.features_per_stage == [f // 4 for f in config.features_per_stage]
    assert narrow.batch_size == 2 and narrow.patch_size == config.patch_size
    net = build_network(narrow, plans)
    assert narrow.parameters == sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert narrow.parameters < config.parameters / 10
    assert config.features_per_stage[0] == 32  # the input is not modified


def test_iterations_and_prediction_agree() -> None:
    n = budget.iterations_in(1200, 0.3, 0.1)
    assert budget.predicted_seconds(n, 0.3, 0.1, 1200) <= 1200 < budget.predicted_seconds(n + 1, 0.3, 0.1, 1200)
    assert budget.iterations_in(1e9, 0.01, 0.01) == budget.MAX_ITERATIONS


def _fake_timer(per_sample: dict[int, float]):
    """Step time = per-sample cost of the width x batch; forward = a third of it (a stand-in for a device)."""
    calls = []

    def time_step(config, plans, device, **_):
        t = per_sample[config.features_per_stage[0]] * config.batch_size
        calls.append((config.features_per_stage[0], config.batch_size))
        overrides.append((config.training or {}).get("recipe_overrides"))
        return {"step_seconds": t, "forward_seconds": t / 3}

    overrides: list[dict | None] = []
    time_step.overrides = overrides  # what each measured candidate would train with (rule 6)
    return time_step, calls


def test_fit_picks_widest_width_with_enough_steps_then_grows_batch(workdir: Path) -> None:
    plans = Plans.load(workdir / "plans.json")
    config = plans.configuration("3d_fullres")
    # 600 s budget: 2000 steps need <= ~0.29 s/step at batch 2 -> width 16 (0.2 s) passes, 24 (0.4 s) does not.
    timer, calls = _fake_timer({8: 0.05, 12: 0.08, 16: 0.1, 24: 0.2, 32: 0.4})
    chosen = budget.fit_to_budget(config, plans, 600, torch.device("cpu"), timer, log=lambda _: None)
    t = chosen.training
    assert t["base_features"] == 16 and chosen.features_per_stage[0] == 16
    assert calls[:4] == [(8, 2), (12, 2), (16, 2), (24, 2)]  # narrowest first, stops after the first too slow
    # Batch 2 at 0.2 s leaves ~2800 steps; batch 3 (0.3 s/step) would leave < 2000: stays 2 unless it fits.
    expected_batch = max(b for b in range(2, config.batch_size + 1)
                         if budget.iterations_in(600, 0.1 * b, 0.1 * b / 3) >= budget.MIN_ITERATIONS)
    assert chosen.batch_size == t["batch_size"] == expected_batch
    assert t["iterations"] == t["epochs"] * t["iterations_per_epoch"]
    assert t["iterations"] <= budget.iterations_in(600, t["step_seconds"], t["forward_seconds"])
    assert abs(t["predicted_seconds"] - budget.predicted_seconds(t["iterations"], t["step_seconds"],
                                                                 t["forward_seconds"], 600)) < 0.1
    assert t["predicted_seconds"] <= 600
    assert t["val_iterations"] == budget.validation_batches(600, t["epochs"], t["forward_seconds"])
    assert t["planned_without_budget"]["base_features"] == 32
    assert any("time budget" in n for n in chosen.notes)
    # a schedule shorter than nnU-Net's starts from PyTorch's weights, unless the recipe (hence the plan) names one
    assert chosen.network.kwargs["init"] == "torch"
    named = replace(config, network=NetworkSpec(config.network.name, {**config.network.kwargs, "init": "he"}))
    kept = budget.fit_to_budget(named, plans, 600, torch.device("cpu"), timer, log=lambda _: None)
    assert kept.network.kwargs["init"] == "he"


def test_a_short_schedule_trains_with_adamw_timed_as_trained(workdir: Path) -> None:
    """Rule 6: nnU-Net's SGD becomes AdamW for a schedule shorter than the recipe's; every probe timed that step;
    a recipe with its own optimiser, or a budget that holds the whole schedule, keeps its optimiser."""
    plans = Plans.load(workdir / "plans.json")
    assert plans.recipe_settings["optimizer"] == budget.NNUNET_OPTIMIZER
    config = plans.configuration("3d_fullres")
    timer, _ = _fake_timer({8: 0.05, 12: 0.08, 16: 0.1, 24: 0.2, 32: 0.4})
    chosen = budget.fit_to_budget(config, plans, 600, torch.device("cpu"), timer, log=lambda _: None)
    adamw = {"optimizer": budget.SHORT_SCHEDULE_OPTIMIZER}
    assert chosen.training["recipe_overrides"] == adamw
    assert timer.overrides and all(o == adamw for o in timer.overrides)
    assert any("adamw" in n and "SGD" in n for n in chosen.notes)

    own = replace(plans, recipe_settings={**plans.recipe_settings, "optimizer": {"name": "adam", "kwargs": {}}})
    timer, _ = _fake_timer({8: 0.05, 12: 0.08, 16: 0.1, 24: 0.2, 32: 0.4})
    kept = budget.fit_to_budget(config, own, 600, torch.device("cpu"), timer, log=lambda _: None)
    assert "recipe_overrides" not in kept.training and set(timer.overrides) == {None}

    timer, _ = _fake_timer({w: 1e-4 for w in (8, 12, 16, 24, 32)})
    whole = budget.fit_to_budget(config, plans, 6 * 3600, torch.device("cpu"), timer, log=lambda _: None)
    assert "recipe_overrides" not in whole.training
    assert timer.overrides[-1] is None  # the whole schedule's step is measured again with the recipe's SGD


def test_the_trainer_and_probe_apply_the_planned_overrides(workdir: Path, tmp_path: Path, monkeypatch) -> None:
    """The plan's ``recipe_overrides`` reach the probe's step and the trainer's recipe, before the user's --set;
    a resumed run keeps its saved recipe."""
    from decathlete.recipes import build
    from decathlete.train import probe

    work = tmp_path / "work"
    shutil.copytree(workdir, work)
    plans = Plans.load(work / "plans.json")
    planned = {"recipe_overrides": {"optimizer": budget.SHORT_SCHEDULE_OPTIMIZER}}
    config = replace(plans.configuration("3d_fullres"), training=planned)
    seen = []
    real = probe.build_optimizer
    monkeypatch.setattr(probe, "build_optimizer",
                        lambda recipe, net: seen.append(recipe.optimizer) or real(recipe, net))
    probe.time_step(config, plans, torch.device("cpu"), build.plans_recipe(plans), steps=1, warmup=0)
    assert seen[0].name == "adamw" and seen[0].kwargs["lr"] == 3e-3

    plans.configurations["3d_fullres"] = config
    plans.save(work / "plans.json")
    api.preprocess(work, ["3d_fullres"], workers=1, progress=False)
    options = TrainOptions("3d_fullres", 0, epochs=1, iterations_per_epoch=1, val_iterations=1, device="cpu",
                           num_workers=0, progress=False, overrides=["optimizer.lr=1e-3"])
    summary = train(work, options)
    recipe = json.loads((Path(summary["folder"]) / "recipe.json").read_text())
    assert recipe["optimizer"] == {"name": "adamw", "kwargs": {"lr": 1e-3, "weight_decay": 3e-5}}
    resumed = train(work, replace(options, epochs=2, resume=True, overrides=[]))
    assert json.loads((Path(resumed["folder"]) / "recipe.json").read_text())["optimizer"]["kwargs"]["lr"] == 1e-3


def test_fit_with_a_generous_budget_keeps_the_plan(workdir: Path) -> None:
    plans = Plans.load(workdir / "plans.json")
    config = plans.configuration("3d_fullres")
    timer, _ = _fake_timer({8: 1e-4, 12: 1e-4, 16: 1e-4, 24: 1e-4, 32: 1e-4})
    chosen = budget.fit_to_budget(config, plans, 6 * 3600, torch.device("cpu"), timer, log=lambda _: None)
    assert chosen.features_per_stage == config.features_per_stage and chosen.batch_size == config.batch_size
    assert chosen.parameters == config.parameters
    assert chosen.training["iterations"] == budget.MAX_ITERATIONS
    assert "init" not in chosen.network.kwargs  # nnU-Net's whole schedule: nnU-Net's weights


def test_fit_with_a_hopeless_budget_says_so(workdir: Path) -> None:
    plans = Plans.load(workdir / "plans.json")
    config = plans.configuration("3d_fullres")
    timer, _ = _fake_timer({w: 5.0 for w in (8, 12, 16, 24, 32)})
    with pytest.raises(ValueError, match="cannot hold 10 training steps"):
        budget.fit_to_budget(config, plans, 12, torch.device("cpu"), timer, log=lambda _: None)
    chosen = budget.fit_to_budget(config, plans, 300, torch.device("cpu"), timer, log=lambda _: None)
    assert chosen.features_per_stage[0] == 8 and any("undertrained" in n for n in chosen.notes)


def test_real_probe_and_budget_training_end_to_end(workdir: Path, tmp_path: Path) -> None:
    """Plan for 40 s on this CPU with real step timings, then train: the run ends annealed within the budget."""
    torch.set_num_threads(1)
    work = tmp_path / "work"
    plans = api.plan(Plans.load(workdir / "plans.json").dataset["root"], work, workers=1, progress=False,
                     time_budget="40s", device="cpu", configurations=["3d_fullres"])
    config = plans.configuration("3d_fullres")
    t = config.training
    assert t["budget_seconds"] == 40 and t["device"].startswith("cpu")
    assert all(c["step_seconds"] > 0 for c in t["candidates"])
    assert json.loads((work / "plans.json").read_text())["configurations"]["3d_fullres"]["training"] == t
    api.preprocess(work, ["3d_fullres"], workers=1, progress=False)
    # Cap the run at 8 s, far below what the plan holds, to see the budget stop and the schedule anneal.
    summary = train(work, TrainOptions("3d_fullres", 0, val_iterations=2, device="cpu", num_workers=0,
                                       progress=False, time_budget="8s"))
    assert summary["stopped_by_time_budget"] and summary["steps"] < t["iterations"]
    saved = load_checkpoint(Path(summary["folder"]) / FINAL)
    assert saved["settings"]["time_budget"] == 8 and saved["settings"]["recipe"]["epochs"] == t["epochs"]
    assert saved["state"]["seconds"] < 8 + 5  # the last step and the closing validation may run over a little
    last_lr = saved["state"]["history"]["lr"][-1]
    base_lr = saved["settings"]["recipe"]["optimizer"]["kwargs"]["lr"]
    assert last_lr < base_lr * 0.5, "a run stopped by its budget must end with an annealed learning rate"


def test_clock_progress_and_stop() -> None:
    clock = TrainingClock(None)
    assert clock.schedule_step(7, 100) == 7 and not clock.out_of_time(1e9)
    clock = TrainingClock(100.0, already_s=50.0)  # resumed half way through the budget
    assert clock.progress(10, 1000) == pytest.approx(0.5, abs=0.01)
    assert clock.schedule_step(10, 1000) >= 499
    assert not clock.out_of_time(10) and clock.out_of_time(60)
    assert math.isclose(TrainingClock(10.0, already_s=20.0).progress(0, 10), 1.0)


def test_refit_to_more_epochs_never_raises_the_learning_rate_again() -> None:
    clock = TrainingClock(1e6)  # time progress ~0: the steps lead
    assert clock.progress(500, 1000) == pytest.approx(0.5)
    # the refit doubled the run: 501 of 2000 steps is 25 %, but the schedule already stood at 50 %
    assert clock.progress(501, 2000) == pytest.approx(0.5)
    assert clock.schedule_step(501, 2000) == 1000
    assert clock.progress(1200, 2000) == pytest.approx(0.6)  # and moves on once the steps catch up
    assert TrainingClock(None).progress(501, 2000) == pytest.approx(501 / 2000)  # without a budget: steps alone


def test_epochs_are_refitted_from_measured_epoch_time() -> None:
    clock = TrainingClock(100.0, already_s=40.0)  # 60 s left
    # median epoch 12 s: 60 / 12 = 5 more epochs after the 3 done
    assert clock.epochs_that_fit(3, [10.0, 12.0, 30.0]) == 8
    assert clock.epochs_that_fit(3, [25.0]) == 3 + 2  # 2.4 rounds to 2; the clock stops what overruns
    assert TrainingClock(None).epochs_that_fit(3, [10.0]) is None
    assert TrainingClock(100.0).epochs_that_fit(0, []) is None
    assert TrainingClock(10.0, already_s=20.0).epochs_that_fit(4, [1.0]) == 4  # overdrawn: stop now
    cpu = torch.device("cpu")
    assert refit_epochs(clock, 3, [12.0], planned=9, world=World(), dev=cpu) == 8
    assert refit_epochs(TrainingClock(None), 3, [12.0], planned=9, world=World(), dev=cpu) == 9


def test_trainer_runs_the_refitted_number_of_epochs(workdir: Path, tmp_path: Path, monkeypatch) -> None:
    """A budgeted run planned for 1 epoch whose first epoch shows room for 3 runs 3, annealed over all 3."""
    torch.set_num_threads(1)
    calls = []

    def fake_refit(clock, epochs_done, epoch_seconds, planned, world, dev):
        calls.append((epochs_done, planned, len(epoch_seconds)))
        return 3

    monkeypatch.setattr(trainer_module, "refit_epochs", fake_refit)
    work = tmp_path / "work"
    shutil.copytree(workdir, work)
    api.preprocess(work, ["3d_fullres"], workers=1, progress=False)
    summary = train(work, TrainOptions("3d_fullres", 0, epochs=1, iterations_per_epoch=2, val_iterations=1,
                                       device="cpu", num_workers=0, progress=False, time_budget="1h"))
    assert summary["epochs"] == 3 and summary["steps"] == 6 and not summary["stopped_by_time_budget"]
    assert calls[0] == (1, 1, 1) and [c[0] for c in calls] == [1, 2, 3]
    saved = load_checkpoint(Path(summary["folder"]) / FINAL)
    assert saved["settings"]["recipe"]["epochs"] == 3
    lrs = saved["state"]["history"]["lr"]
    # the last lr of each epoch: poly(0.9) over 2 planned steps, then over the 6 refitted ones
    assert lrs == pytest.approx([1e-2 * (1 - 1 / 2) ** 0.9, 1e-2 * (1 - 3 / 6) ** 0.9, 1e-2 * (1 - 5 / 6) ** 0.9],
                                rel=1e-3)


def test_an_extended_schedule_continues_from_the_last_rate() -> None:
    poly = schedules.poly(0.9)
    anchor = extended_anchor(poly, 4, 4, 12, None)  # finished after 4 steps (last used: 3), now 12
    assert anchor == [3.0, 0.75]
    rates = [poly(schedule_position(s, 12, anchor), 12) for s in range(3, 12)]
    assert rates[0] == pytest.approx(poly(3, 4))  # continuous with the last rate used
    assert all(b < a for a, b in zip(rates, rates[1:])) and rates[-1] > 0
    assert schedule_position(12, 12, anchor) == pytest.approx(12)  # the end of the longer run reaches the end
    exponential = schedules.exponential(0.9, every=2)
    assert extended_anchor(exponential, 4, 4, 12, None) is None  # no total in it: it simply goes on
    assert extended_anchor(poly, 4, 12, 8, None) is None  # shortened: the rate only falls faster
    assert extended_anchor(poly, 5, 12, 12, None) is None  # same length: an exact resume


def test_the_budget_chooses_3d_when_it_holds_enough_steps_else_2d(workdir: Path) -> None:
    """Rule 7 with planned step counts: 3D while it holds MIN_ITERATIONS, 2D when only 2D does, else the most."""
    config = Plans.load(workdir / "plans.json").configuration("3d_fullres")
    flat = replace(config, spatial_dims=2)

    def planned(n3: int, n2: int, lowres: int | None = None) -> dict:
        configs = {"2d": replace(flat, training={"iterations": n2}),
                   "3d_fullres": replace(config, training={"iterations": n3})}
        if lowres is not None:
            configs["3d_lowres"] = replace(config, training={"iterations": lowres})
        return budget.choose_configuration(configs)

    enough = budget.MIN_ITERATIONS
    assert planned(enough, 10 * enough)["configuration"] == "3d_fullres"
    choice = planned(250, 2530)
    assert choice["configuration"] == "2d" and choice["iterations"] == {"2d": 2530, "3d_fullres": 250}
    assert "3d_fullres: 250" in choice["why"]
    assert planned(250, 2530, lowres=enough)["configuration"] == "3d_lowres"
    assert planned(250, 900)["configuration"] == "2d" and "most" in planned(250, 900)["why"]
    assert planned(300, 100)["configuration"] == "3d_fullres"
    assert budget.choose_configuration({"3d_fullres": config}) is None  # planned without a budget
    alone = budget.choose_configuration({"2d": replace(flat, training={"iterations": 2530})})
    assert alone["configuration"] == "2d" and alone["why"] == "holds 2530 iterations, at least 2000"
