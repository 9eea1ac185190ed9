"""``decathlete search``: spaces checked before any work, the samplers, plan-free network settings, and real searches
on a tiny synthetic work folder (killed with SIGKILL and resumed; two workers sharing one SQLite study)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from decathlete import api
from decathlete.cli import main
from decathlete.infer.predictor import Predictor
from decathlete.planning.plans import Plans
from decathlete.recipes import build
from decathlete.recipes.base import RecipeError, get_recipe, saved_recipe
from decathlete.search.samplers import RandomAroundBestSampler, random_around_best, tpe
from decathlete.search.space import SpaceError, current_values, load_space, parse_space
from decathlete.search.study import SearchError, SearchOptions, prepare
from decathlete.synthetic import make_synthetic_dataset
from synthetic import tiny_workdir

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "search"
LR_ROTATION = {"optimizer.lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
               "augment.p_rotation": {"type": "float", "low": 0.0, "high": 0.5}}
CLI = [sys.executable, "-m", "decathlete.cli"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("search")
    (root / "space.json").write_text(json.dumps(LR_ROTATION))
    return tiny_workdir(root, n_cases=6)


def _space_file(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "space.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(("data", "message"), [
    ({"optimizer.lrr": {"type": "float", "low": 1e-3, "high": 1e-1}}, r"'optimizer.lrr'.*'sgd' takes no lrr"),
    ({"augment.p_rotatio": {"type": "float", "low": 0, "high": 0.5}}, r"unknown recipe setting 'augment.p_rotatio'"),
    ({"optimizer.lr": {"type": "float", "low": 0.1, "high": 0.01}}, r"\[0.1, 0.01\] is empty"),
    ({"optimizer.lr": {"type": "float", "low": 0.01, "high": 0.01}}, r"empty or a single point"),
    ({"optimizer.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, r"log range must stay above 0"),
    ({"optimizer.lr": {"type": "float", "low": 1e-3, "high": 0.1, "lg": True}}, r"not lg"),
    ({"optimizer.lr": {"type": "uniform", "low": 1e-3, "high": 0.1}}, r"expected \{\"type\""),
    ({"net.block": {"type": "categorical", "choices": ["plain"]}}, r"at least two values"),
    ({"epochs": {"type": "float", "low": 1.5, "high": 3.5}}, r"'epochs'.*expected int"),
    ({"optimizer.lr": {"type": "fixed", "value": 0.1}}, r"nothing to search"),
    ([1, 2], r"non-empty JSON object"),
])
def test_a_bad_space_is_refused_with_the_entry_named(tmp_path: Path, data: object, message: str) -> None:
    with pytest.raises(SpaceError, match=message):
        load_space(_space_file(tmp_path, data), get_recipe("default"))


def test_the_example_spaces_fit_their_recipes() -> None:
    for name, recipe in (("pancreas2019_weighted_ce", "pancreas2019"), ("pancreas2019_topk", "pancreas2019"),
                         ("factorized_iou_random_around_best", "factorized_iou"), ("default_lr_rotation", "default")):
        assert load_space(EXAMPLES / f"{name}.json", get_recipe(recipe)).parameters


def test_a_trial_becomes_overrides_fixed_entries_first() -> None:
    space = load_space(EXAMPLES / "pancreas2019_topk.json", get_recipe("pancreas2019"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    drawn = space.suggest(study.ask())
    assert set(drawn) == {"loss.k", "loss.weight[1]", "loss.weight[2]"}
    overrides = space.overrides(drawn)
    assert overrides[0] == 'loss.name="topk_ce"' and overrides[1].startswith("loss.k=")
    recipe = get_recipe("pancreas2019").with_overrides(overrides)
    assert recipe.loss.name == "topk_ce" and recipe.loss.kwargs["k"] in (5.0, 10.0)
    weight = recipe.loss.kwargs["weight"]
    assert weight[0] == 1.0 and 2 <= weight[1] <= 25 and 5 <= weight[2] <= 50
    # a categorical choice that is not a scalar (a layer spec) goes through Optuna as JSON and comes back whole
    act = parse_space({"net.act": {"type": "categorical", "choices": ["relu", ["leakyrelu", {"negative_slope": 0.1}]]}})
    values = {json.dumps(act.suggest(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=s)).ask())
                         ["net.act"]) for s in range(8)}
    assert values == {'"relu"', '["leakyrelu", {"negative_slope": 0.1}]'}


def test_the_baseline_is_the_recipe_s_own_values(work: Path) -> None:
    setup = prepare(work, SearchOptions(space=work.parent / "space.json"))
    defaults = {"augment.p_rotation": 0.2}
    assert current_values(setup.space, setup.recipe.to_dict(), defaults) == {"optimizer.lr": 0.01,
                                                                             "augment.p_rotation": 0.2}
    assert setup.space.encode({"optimizer.lr": 0.5}) == {}  # outside the range: drawn instead


def _study_with(params: dict, distributions: dict, value: float | None = None) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    if value is not None:
        study.add_trial(create_trial(params=params, distributions=distributions, value=value))
    return study


def test_random_around_best_draws_within_a_factor_of_ten_of_the_best() -> None:
    dists = {"lr": FloatDistribution(1e-6, 1.0, log=True), "p": FloatDistribution(0.0, 0.5),
             "n": IntDistribution(1, 40), "act": CategoricalDistribution(["relu", "elu", "gelu"])}
    study = _study_with({"lr": 1e-3, "p": 0.0, "n": 8, "act": "elu"}, dists, value=0.5)
    study.add_trial(create_trial(params={"lr": 0.5, "p": 0.4, "n": 40, "act": "relu"}, distributions=dists,
                                 value=0.1))  # worse: not the centre
    sampler = RandomAroundBestSampler(seed=0)
    trial = study.ask()._cached_frozen_trial
    draws = {name: [sampler.sample_independent(study, trial, name, d) for _ in range(400)] for name, d in dists.items()}
    lr = np.array(draws["lr"])
    assert lr.min() >= 1e-4 and lr.max() <= 1e-2
    assert 0.4 < np.mean(lr > 1e-3) < 0.6  # log-uniform around the best: half above, half below
    assert max(draws["p"]) > 0.25  # best value 0: no multiplicative neighbourhood, the whole range
    n = np.array(draws["n"])
    assert n.dtype.kind == "i" and n.min() >= 1 and n.max() <= 40 and n.max() > 30  # [0.8, 80] clipped to [1, 40]
    keep = np.mean(np.array(draws["act"]) == "elu")
    assert 0.58 < keep < 0.75  # kept with probability 1/2, else any of three: 2/3 in all
    # nothing finished yet: uniform over the range
    empty = _study_with({}, {})
    first = [sampler.sample_independent(empty, empty.ask()._cached_frozen_trial, "lr", dists["lr"]) for _ in range(50)]
    assert min(first) < 1e-4 and max(first) > 1e-2


def test_each_trial_number_has_its_own_draw_whichever_worker_runs_it() -> None:
    for make in (tpe, random_around_best):
        draws = {}
        for worker in ("a", "b"):
            study = optuna.create_study(sampler=make(seed=7, startup_trials=10))
            draws[worker] = [study.ask().suggest_float("x", 0.0, 1.0) for _ in range(3)]
        assert draws["a"] == draws["b"]  # trial k draws the same in every process: reproducible
        assert len(set(draws["a"])) == 3  # and differs from trial to trial: workers sharing a study never repeat


def test_dropout_trains_on_an_existing_plan_and_predict_builds_it(tmp_path: Path) -> None:
    raw = make_synthetic_dataset(tmp_path / "raw", n_cases=4, shape=(16, 40, 40))
    work = tmp_path / "work"
    api.plan(raw, work, recipe="factorized_iou", workers=1, progress=False, configurations=["3d_fullres"],
             overrides=["planning.base_features=4"])
    api.preprocess(work, ["3d_fullres"], workers=1, progress=False)
    plans = Plans.load(work / "plans.json")
    config = plans.configuration("3d_fullres")
    recipe = get_recipe("factorized_iou").with_overrides(["planning.base_features=4", "net.dropout=0.3"])
    build.check_against_plans(recipe, plans, config, work)  # dropout does not shape the plan
    assert build.trained_configuration(recipe, config).network.kwargs["dropout"] == 0.3
    with pytest.raises(RecipeError, match="differs in net"):
        build.check_against_plans(recipe.with_overrides(["net.deep_supervision=true"]), plans, config, work)
    [summary] = api.train(work, "3d_fullres", 0, overrides=["net.dropout=0.3"], epochs=1, iterations_per_epoch=1,
                          val_iterations=1, device="cpu", num_workers=0, progress=False)
    folder = Path(summary["folder"])
    assert Plans.load(folder / "plans.json").configuration("3d_fullres").network.kwargs["dropout"] == 0.3
    assert saved_recipe(folder).net.kwargs["dropout"] == 0.3
    predictor = Predictor(folder.parent, "3d_fullres", [0], device="cpu")
    blocks = [m for m in predictor.networks[0].modules() if isinstance(m, torch.nn.Dropout3d | torch.nn.Dropout)]
    assert blocks and {m.p for m in blocks} >= {0.3}


def test_a_space_that_changes_the_plan_or_a_bad_storage_fails_before_any_training(work: Path, tmp_path: Path) -> None:
    space = _space_file(tmp_path, {"planning.base_features": {"type": "int", "low": 4, "high": 16}})
    with pytest.raises(SpaceError, match="cannot change what shapes the plan.*differs in planning"):
        prepare(work, SearchOptions(space=space))
    code = main(["search", str(work), "--space", str(work.parent / "space.json"), "--storage", "nosuchdb://x/y",
                 "--study", "bad-storage", "--device", "cpu"])
    assert code == 1 and not (work / "search" / "bad-storage").exists()
    with pytest.raises(SearchError, match="cannot open the search storage 'nosuchdb://x/y'"):
        api.search(work, work.parent / "space.json", storage="nosuchdb://x/y")


def _search(work: Path, study: str, trials: int, *extra: str) -> list[str]:
    return [*CLI, "search", str(work), "--space", str(work.parent / "space.json"), "--trials", str(trials),
            "--trial-budget", "3s", "--val-iterations", "1", "--device", "cpu", "--study", study, *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _trials(work: Path, study: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=f"sqlite:///{work / 'search' / 'search.db'}").trials


@pytest.mark.slow
def test_a_search_killed_during_a_trial_resumes_and_writes_its_outputs(work: Path, tmp_path: Path) -> None:
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(_search(work, "killed", 3), stdout=log, stderr=subprocess.STDOUT, env=_env())
    running = work / "search" / "killed" / "trial_0001" / "fold_0"
    deadline = time.monotonic() + 120
    while not running.is_dir() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    assert first.poll() is None, (tmp_path / "first.log").read_text(errors="replace")[-2000:]
    first.send_signal(signal.SIGKILL)
    first.wait()
    [interrupted] = [t for t in _trials(work, "killed") if t.state == TrialState.RUNNING]
    done = subprocess.run(_search(work, "killed", 3), capture_output=True, text=True, encoding="utf-8",
                          errors="replace", env=_env())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"trial {interrupted.number} was interrupted" in done.stdout
    trials = _trials(work, "killed")
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3 and not [t for t in trials if t.state == TrialState.RUNNING]
    [failed] = [t for t in trials if t.state == TrialState.FAIL]
    assert failed.number == interrupted.number and "interrupted" in failed.user_attrs["note"]
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == failed.number]
    assert retry.params == failed.params and retry.state == TrialState.COMPLETE  # run again, counted once
    assert trials[0].user_attrs.get("baseline") and trials[0].params == {"optimizer.lr": 0.01,
                                                                         "augment.p_rotation": 0.2}
    out = work / "search" / "killed"
    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    overrides = json.loads((out / "best_overrides.json").read_text())
    assert overrides == {"optimizer.lr": best.params["optimizer.lr"],
                         "augment.p_rotation": best.params["augment.p_rotation"]}
    rows = (out / "trials.csv").read_text().splitlines()
    assert len(rows) == 1 + len(trials) and rows[0].startswith("number,state,value")
    assert (out / "history.png").read_bytes()[:4] == b"\x89PNG" and (out / "importance.png").is_file()
    assert (out / "report.html").read_text().count("data:image/png") == 2
    summary = json.loads((out / "search.json").read_text())
    assert summary["best"]["trial"] == best.number and summary["best"]["value"] == pytest.approx(best.value)
    # the best values train through --set-file; another space under the same study name is refused
    assert main(["train", str(work), "-c", "3d_fullres", "-f", "0", "--set-file", str(out / "best_overrides.json"),
                 "--epochs", "1", "--iterations-per-epoch", "1", "--val-iterations", "1", "--device", "cpu",
                 "-o", str(tmp_path / "best")]) == 0
    assert saved_recipe(tmp_path / "best" / "fold_0").optimizer.kwargs["lr"] == best.params["optimizer.lr"]
    other = _space_file(tmp_path, {"optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}})
    with pytest.raises(SearchError, match="other settings \\(space differ\\).*--study NEW_NAME"):
        prepare_and_open(work, other, "killed")


def prepare_and_open(work: Path, space: Path, study: str) -> None:
    from decathlete.search.study import open_storage, open_study

    setup = prepare(work, SearchOptions(space=space, study=study, trial_budget="3s"))
    open_study(setup, open_storage(setup.storage_url))


@pytest.mark.slow
def test_two_workers_share_one_study_without_duplicating_or_losing_a_trial(work: Path, tmp_path: Path) -> None:
    logs = [(tmp_path / f"worker{i}.log").open("w") for i in range(2)]
    workers = [subprocess.Popen(_search(work, "shared", 4, "--pruner", "none"), stdout=log,
                                stderr=subprocess.STDOUT, env=_env()) for log in logs]
    codes = [w.wait(timeout=300) for w in workers]
    assert codes == [0, 0], [(tmp_path / f"worker{i}.log").read_text(errors="replace")[-2000:] for i in range(2)]
    trials = _trials(work, "shared")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 4
    assert len({t.user_attrs["folder"] for t in trials}) == 4
    assert {t.user_attrs["worker"]["pid"] for t in trials} == {w.pid for w in workers}
    for t in trials:
        assert (Path(t.user_attrs["folder"]) / "fold_0" / "checkpoint_final.pth").is_file()
        assert (Path(t.user_attrs["folder"]) / "fold_0" / "validation" / "summary.json").is_file()
