"""The recipe as the contract of a run: overrides recorded and used, the model's recipe read back by predict and
resume, mismatched plans refused, callbacks, per-run folders, the probe timing the training step, recipe regions."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from decathlete import api, registry
from decathlete.infer.predictor import Predictor
from decathlete.io.datasets import load_dataset
from decathlete.labels import LabelScheme
from decathlete.planning.plans import Plans
from decathlete.recipes.base import RecipeError, Spec, get_recipe, saved_recipe
from decathlete.recipes.default import tiny
from decathlete.synthetic import make_synthetic_dataset
from decathlete.train import probe
from decathlete.train.step import TrainStep

SHAPE = (16, 40, 40)
QUICK = {"iterations_per_epoch": 2, "val_iterations": 1, "device": "cpu", "num_workers": 0, "progress": False}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("contract")
    raw = make_synthetic_dataset(root / "raw", n_cases=6, shape=SHAPE)
    big = make_synthetic_dataset(root / "big", n_cases=1, shape=(24, 60, 60), seed=1)
    api.plan(raw, root / "work", recipe="tiny", workers=1, progress=False, configurations=["3d_fullres"])
    api.preprocess(root / "work", ["3d_fullres"], workers=1, progress=False)
    return root / "work", big


@pytest.fixture
def work(data: tuple[Path, Path], tmp_path: Path) -> Path:
    copy = tmp_path / "work"
    shutil.copytree(data[0], copy)
    return copy


@pytest.fixture
def registered_tiny_changed(monkeypatch: pytest.MonkeyPatch):
    """Replace the registered ``tiny`` recipe with other defaults (as a later version of the package might)."""
    def changed() -> object:
        return replace(tiny(), optimizer=Spec("sgd", {"lr": 0.5, "momentum": 0.9}),
                       inference=replace(tiny().inference, tile_weighting=Spec("constant")))

    monkeypatch.setitem(registry._REGISTRY["recipes"], "tiny", changed)


def _big_case(big: Path) -> list[Path]:
    return load_dataset(big).training[0].images


def test_overrides_are_recorded_and_used(work: Path) -> None:
    [summary] = api.train(work, "3d_fullres", 0, epochs=1, overrides=["optimizer.lr=5e-3", "augment.p_rotation=0"],
                          **QUICK)
    recipe = saved_recipe(summary["folder"])
    assert recipe.optimizer.kwargs["lr"] == 5e-3 and recipe.augment.p_rotation == 0.0
    state = torch.load(Path(summary["folder"]) / "checkpoint_final.pth", weights_only=True)["state"]
    assert state["history"]["lr"] == pytest.approx([5e-3 * (1 - 1 / 2) ** 0.9])  # poly over 2 steps, at step 1


def test_a_recipe_for_other_plans_is_refused_with_the_fix(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RecipeError, match=r"made for recipe 'tiny'.*'default' differs in planning.*decathlete "
                                          r"plan .* --recipe default"):
        api.train(work, "3d_fullres", 0, recipe="default", epochs=1, **QUICK)
    with pytest.raises(RecipeError, match="differs in net"):
        api.train(work, "3d_fullres", 0, overrides=["net.block=residual"], epochs=1, **QUICK)
    with pytest.raises(RecipeError, match="differs in planning"):
        api.train(work, "3d_fullres", 0, overrides=["planning.base_features=16"], epochs=1, **QUICK)
    # a recipe that changes only what does not shape the plan trains on it
    monkeypatch.setitem(registry._REGISTRY["recipes"], "tiny_topk",
                        lambda: replace(tiny(), name="tiny_topk", loss=Spec("topk_ce", {"k": 10.0})))
    [summary] = api.train(work, "3d_fullres", 0, recipe="tiny_topk", epochs=1, **QUICK)
    assert Path(summary["folder"]).parent.name == "tiny_topk"


def test_predict_reads_the_model_recipe_back(work: Path, data: tuple[Path, Path], registered_tiny_changed) -> None:
    images = _big_case(data[1])
    registry._REGISTRY["recipes"]["tiny"], changed = tiny, registry._REGISTRY["recipes"]["tiny"]
    api.train(work, "3d_fullres", 0, epochs=1, **QUICK)
    _, before = Predictor(work, device="cpu", whole_volume=False).predict_case(images, return_probabilities=True)
    registry._REGISTRY["recipes"]["tiny"] = changed  # the package's defaults change after training
    predictor = Predictor(work, device="cpu", whole_volume=False)
    assert predictor.recipe.inference.tile_weighting.name == "gaussian"
    _, after = predictor.predict_case(images, return_probabilities=True)
    np.testing.assert_array_equal(after, before)
    constant = Predictor(work, device="cpu", whole_volume=False, overrides=["inference.tile_weighting=constant"])
    _, other = constant.predict_case(images, return_probabilities=True)
    assert np.abs(other.astype(np.float32) - before).max() > 1e-3
    with pytest.raises(RecipeError, match="only change inference"):
        Predictor(work, device="cpu", overrides=["optimizer.lr=1"])


def test_resume_continues_with_the_saved_recipe(work: Path, registered_tiny_changed) -> None:
    registry._REGISTRY["recipes"]["tiny"], changed = tiny, registry._REGISTRY["recipes"]["tiny"]
    api.train(work, "3d_fullres", 0, epochs=1, overrides=["optimizer.lr=5e-3"], **QUICK)
    registry._REGISTRY["recipes"]["tiny"] = changed
    [summary] = api.train(work, "3d_fullres", 0, epochs=2, resume=True, **QUICK)
    assert summary["epochs"] == 2 and saved_recipe(summary["folder"]).optimizer.kwargs["lr"] == 5e-3
    with pytest.raises(ValueError, match="recipe or seed differs.*optimizer"):
        api.train(work, "3d_fullres", 0, epochs=3, resume=True, overrides=["optimizer.lr=1e-3"], **QUICK)


def test_callbacks_see_every_epoch_and_can_stop_the_run(work: Path) -> None:
    reports = []

    def stop_after_second(report) -> bool:  # noqa: ANN001
        reports.append(report)
        return report.epoch == 1

    [summary] = api.train(work, "3d_fullres", 0, epochs=4, callbacks=[stop_after_second], **QUICK)
    assert [r.epoch for r in reports] == [0, 1] and [r.step for r in reports] == [2, 4]
    assert summary["stopped_by_callback"] and summary["epochs"] == 2
    assert (Path(summary["folder"]) / "checkpoint_final.pth").is_file()
    assert len(reports[0].pseudo_dice) == 2 and reports[1].folder == Path(summary["folder"])


def test_runs_of_one_recipe_go_to_their_own_folders(work: Path, tmp_path: Path) -> None:
    [a] = api.train(work, "3d_fullres", 0, epochs=1, model_dir=tmp_path / "trial_0", **QUICK)
    [b] = api.train(work, "3d_fullres", 0, epochs=1, model_dir=tmp_path / "trial_1", seed=1, **QUICK)
    assert a["folder"] == str(tmp_path / "trial_0" / "fold_0") and b["folder"] == str(tmp_path / "trial_1" / "fold_0")
    assert not (work / "models").exists()
    assert Predictor(tmp_path / "trial_1", device="cpu").fold_dirs == [tmp_path / "trial_1" / "fold_0"]


def test_the_budget_probe_times_the_training_step(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = TrainStep.__call__

    def counted(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(type(self.loss).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TrainStep, "__call__", counted)
    plans = Plans.load(work / "plans.json")
    timing = probe.time_step(plans.configuration("3d_fullres"), plans, torch.device("cpu"), get_recipe("tiny"),
                             steps=2, warmup=1)
    assert len(calls) == 3 and timing["step_seconds"] > 0 and timing["forward_seconds"] > 0


def test_recipe_regions_turn_a_label_map_into_sigmoid_regions(data: tuple[Path, Path], tmp_path: Path) -> None:
    raw = Plans.load(data[0] / "plans.json").dataset["root"]
    regions = 'regions={"regions": {"organ": [1, 2], "lesion": [2]}, "class_order": [1, 2]}'
    with pytest.raises(RecipeError, match="region 'bad'"):
        api.plan(raw, tmp_path / "bad", recipe="tiny", workers=1, progress=False,
                 overrides=['regions={"regions": {"bad": [5]}, "class_order": [5]}'])
    plans = api.plan(raw, tmp_path / "work", recipe="tiny", workers=1, progress=False, configurations=["3d_fullres"],
                     overrides=[regions])
    labels = LabelScheme.from_dataset(plans.dataset)
    assert labels.region_based and labels.num_outputs == 2 and labels.output_values == [1, 2]
    assert labels.evaluation_labels() == {"organ": [1, 2], "lesion": [2]}
    api.preprocess(tmp_path / "work", ["3d_fullres"], workers=1, progress=False)
    [summary] = api.train(tmp_path / "work", "3d_fullres", 0, epochs=1, **QUICK)
    assert json.loads((Path(summary["folder"]) / "recipe.json").read_text())["regions"]["class_order"] == [1, 2]
    predictor = Predictor(tmp_path / "work", device="cpu")
    assert predictor.region_based and predictor.num_classes == 2
    label, probabilities = predictor.predict_case(_big_case(data[1]), return_probabilities=True)
    assert set(np.unique(label).tolist()) <= {0, 1, 2} and probabilities.shape[0] == 2


def test_regions_may_name_labels_of_the_dataset(data: tuple[Path, Path], tmp_path: Path) -> None:
    raw = Plans.load(data[0] / "plans.json").dataset["root"]
    by_name = api.plan(raw, tmp_path / "a", recipe="tiny", workers=1, progress=False, configurations=["3d_fullres"],
                       overrides=['regions={"regions": {"all": ["Organ", 2], "lesion": ["lesion"]}, '
                                  '"class_order": ["organ", "lesion"]}'])
    assert by_name.dataset["regions"] == {"all": [1, 2], "lesion": [2]}
    assert by_name.dataset["regions_class_order"] == [1, 2]
    with pytest.raises(RecipeError, match="name the label 'liver'.*its labels: organ, lesion"):
        api.plan(raw, tmp_path / "b", recipe="tiny", workers=1, progress=False,
                 overrides=['regions={"regions": {"x": ["liver"]}, "class_order": ["liver"]}'])


def test_inference_tiles_up_to_the_recipes_maximum(work: Path, data: tuple[Path, Path]) -> None:
    api.train(work, "3d_fullres", 0, epochs=1, **QUICK)
    plain = Predictor(work, device="cpu")
    capped = Predictor(work, device="cpu", overrides=["inference.max_tile=[16, 48, 256]"])
    patch, divisor = plain.config.patch_size, capped.divisor
    assert plain.tile_size([50, 70, 90]) == patch
    expected = [max(p, min(-(-n // d) * d, c // d * d)) for n, p, c, d in zip([50, 70, 90], patch, [16, 48, 256],
                                                                                   divisor)]
    assert capped.tile_size([50, 70, 90]) == expected and expected[2] == -(-90 // divisor[2]) * divisor[2]
    label, _ = capped.predict_case(_big_case(data[1]))
    assert label.shape == (24, 60, 60)


def test_losses_learn_the_class_frequencies_of_the_training_data(work: Path) -> None:
    from decathlete.recipes.build import loss_context

    plans = Plans.load(work / "plans.json")
    context = loss_context(plans.configuration("3d_fullres"), plans)
    counts = [0, 0, 0]
    for case in load_dataset(plans.dataset["root"]).training:
        label = np.asarray(nib.load(case.label).dataobj)
        for value in (0, 1, 2):
            counts[value] += int((label == value).sum())
    assert context.class_voxels == {0: counts[0], 1: counts[1], 2: counts[2]}
    assert context.deep_supervision_weights[-1] == 0 and not context.labels.region_based


def test_resume_of_a_run_saved_before_a_recipe_field_existed(work: Path) -> None:
    [summary] = api.train(work, "3d_fullres", 0, epochs=1, **QUICK)
    latest = Path(summary["folder"]) / "checkpoint_latest.pth"
    saved = torch.load(latest, weights_only=True)
    del saved["settings"]["recipe"]["planning"]["crop_to_nonzero"], saved["settings"]["recipe"]["inference"]
    torch.save(saved, latest)  # as an older version wrote it: those fields have their defaults
    [resumed] = api.train(work, "3d_fullres", 0, epochs=2, resume=True, **QUICK)
    assert resumed["epochs"] == 2
