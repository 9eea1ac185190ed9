"""HDF5 patch sets (van den Hork 2019): what is written is what the recipe's sampler draws, from disjoint cases, with
the forced share of the sampler's rule; an interrupted write resumes to the same file; ``patch_set`` trains."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from decathlete import registry
from decathlete.cli import main
from decathlete.data import patchset
from decathlete.planning.plans import Plans
from decathlete.recipes import build
from decathlete.recipes.base import Recipe, validate
from synthetic import tiny_workdir

N_TRAIN, N_VAL = 25, 12  # 25: two full blocks of 10 and a short one of 5


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic data planned with the tiny recipe, preprocessed, and fold 0's patch set written."""
    work = tiny_workdir(tmp_path_factory.mktemp("patchset"), n_cases=8)
    patchset.write_patch_set(work, "3d_fullres", 0, N_TRAIN, N_VAL, progress=False)
    return work


pytestmark = pytest.mark.usefixtures("one_thread")


def _files(work: Path) -> dict[str, Path]:
    return {kind: work / "patches" / "3d_fullres" / "fold_0" / f"{kind}.h5" for kind in ("train", "val")}


def _read(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {"image": f["image"][:], "label": f["label"][:], "case_id": f["case_id"].asstr()[:],
                "forced": f["forced"][:]}


def _setting(work: Path) -> tuple[Recipe, object, list[dict], dict[str, tuple[int, ...]]]:
    """Recipe, configuration, splits and crop sizes, read from the work folder's own files."""
    plans = Plans.load(work / "plans.json")
    config = plans.configuration("3d_fullres")
    recipe = Recipe.from_dict(plans.recipe_settings)
    splits = json.loads((work / "splits.json").read_text())
    sizes = {"train": tuple(build.build_augmentation(recipe, config)[1]), "val": tuple(config.patch_size)}
    return recipe, config, splits, sizes


def test_round_trip_equals_the_recipe_sampler(workdir: Path) -> None:
    recipe, config, splits, sizes = _setting(workdir)
    assert recipe.sampler.name == "patch" and sizes["train"] != sizes["val"]  # the two files differ in crop size
    for kind, code, n in (("train", 0, N_TRAIN), ("val", 1, N_VAL)):
        stored = _read(_files(workdir)[kind])
        sampler = build.build_sampler(recipe, config, workdir / "preprocessed" / "3d_fullres", splits[0][kind],
                                      sizes[kind])
        images, labels, ids, forced = [], [], [], []
        for b, start in enumerate(range(0, n, 10)):  # blocks of 10, seeded (seed 0, file code, block index)
            image, label, meta = sampler.sample_batch(min(10, n - start), np.random.default_rng([0, code, b]))
            images.append(image)
            labels.append(label)
            ids += [m["case_id"] for m in meta]
            forced += [m["forced"] for m in meta]
        assert stored["image"].dtype == np.float16 and stored["label"].dtype == np.int8
        assert stored["image"].shape == (n, 1, *sizes[kind])
        np.testing.assert_array_equal(stored["image"], np.concatenate(images).astype(np.float16))
        np.testing.assert_array_equal(stored["label"], np.concatenate(labels))
        assert list(stored["case_id"]) == ids and list(stored["forced"]) == forced
        with h5py.File(_files(workdir)[kind], "r") as f:
            assert f["image"].chunks == (1, 1, *sizes[kind]) and f["image"].compression == "gzip"
            assert json.loads(f.attrs["case_ids"]) == splits[0][kind]
            assert (f.attrs["n_written"], f.attrs["n_total"], f.attrs["fold"]) == (n, n, 0)
            assert list(f.attrs["size"]) == list(sizes[kind]) and f.attrs["configuration"] == "3d_fullres"


def test_train_and_validation_patches_come_from_disjoint_cases(workdir: Path) -> None:
    split = json.loads((workdir / "splits.json").read_text())[0]
    train, val = (set(_read(_files(workdir)[kind])["case_id"]) for kind in ("train", "val"))
    assert train <= set(split["train"]) and val <= set(split["val"])
    assert not train & val and train and val


def test_forced_share_follows_the_positional_rule_per_block(workdir: Path) -> None:
    forced = _read(_files(workdir)["train"])["forced"]
    # Tiny's 0.33: a block of 10 forces its last round(10 * 0.33) = 3; the short last block of 5 keeps
    # round(5 * 0.67) = 3 unforced and forces 2.
    expected = [False] * 7 + [True] * 3 + [False] * 7 + [True] * 3 + [False] * 3 + [True] * 2
    assert list(forced) == expected
    assert forced[:20].mean() == round(10 * 0.33) / 10


class _Stop(Exception):
    pass


def test_interrupted_write_resumes_to_the_same_file(workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    shutil.copytree(workdir, work, ignore=shutil.ignore_patterns("patches", "models"))
    real = patchset.block_rng

    def stop_at_third_block(seed: int, kind: str, block: int) -> np.random.Generator:
        if block == 2:
            raise _Stop
        return real(seed, kind, block)

    monkeypatch.setattr(patchset, "block_rng", stop_at_third_block)
    with pytest.raises(_Stop):
        patchset.write_patch_set(work, "3d_fullres", 0, N_TRAIN, N_VAL, progress=False)
    final = _files(work)["train"]
    partial = final.with_name("train.h5.partial")
    assert not final.exists() and partial.exists()
    with h5py.File(partial, "r") as f:
        assert f.attrs["n_written"] == 20
    monkeypatch.setattr(patchset, "block_rng", real)

    summary = patchset.write_patch_set(work, "3d_fullres", 0, N_TRAIN, N_VAL, progress=False)
    assert summary["train"]["status"] == "resumed" and summary["val"]["status"] == "written"
    assert not partial.exists()
    for kind in ("train", "val"):
        resumed, one_go = _read(_files(work)[kind]), _read(_files(workdir)[kind])
        for key in one_go:
            np.testing.assert_array_equal(resumed[key], one_go[key])
    stamp = final.stat().st_mtime_ns
    again = patchset.write_patch_set(work, "3d_fullres", 0, N_TRAIN, N_VAL, progress=False)
    assert again["train"]["status"] == again["val"]["status"] == "skipped" and final.stat().st_mtime_ns == stamp

    # A partial file of other settings is not continued: it starts over, saying so.
    monkeypatch.setattr(patchset, "block_rng", stop_at_third_block)
    with pytest.raises(_Stop):
        patchset.write_patch_set(work, "3d_fullres", 0, N_TRAIN + 10, N_VAL, progress=False)
    monkeypatch.setattr(patchset, "block_rng", real)
    capsys.readouterr()
    redone = patchset.write_patch_set(work, "3d_fullres", 0, N_TRAIN + 10, N_VAL, seed=1, progress=False)
    assert "starting" in capsys.readouterr().out and redone["train"]["status"] == "written"
    assert redone["train"]["n"] == N_TRAIN + 10


def test_patch_set_sampler(workdir: Path) -> None:
    _, config, splits, sizes = _setting(workdir)
    cases = workdir / "preprocessed" / "3d_fullres"
    sampler_cls = registry.get("samplers", "patch_set")
    train = sampler_cls(case_dir=cases, case_ids=splits[0]["train"][::-1], input_size=sizes["train"],
                        patch_size=config.patch_size, spatial_dims=3, slice_axis=0, ignore_label=None)
    val = sampler_cls(case_dir=cases, case_ids=splits[0]["val"], input_size=sizes["val"],
                      patch_size=config.patch_size)
    assert train.path == _files(workdir)["train"] and val.path == _files(workdir)["val"]

    image, label, meta = train.sample_batch(4, np.random.default_rng(7))
    assert image.shape == (4, 1, *sizes["train"]) and image.dtype == np.float32
    assert label.shape == (4, 1, *sizes["train"]) and label.dtype == np.int16
    stored = _read(_files(workdir)["train"])
    indices = np.random.default_rng(7).integers(N_TRAIN, size=4)  # uniform draws of stored patches
    assert [m["patch_index"] for m in meta] == list(indices)
    np.testing.assert_array_equal(image, stored["image"][indices].astype(np.float32))
    np.testing.assert_array_equal(label, stored["label"][indices])
    assert [m["case_id"] for m in meta] == list(stored["case_id"][indices])
    assert [m["forced"] for m in meta] == list(stored["forced"][indices])
    assert all(m["start"] is None and m["class"] is None and m["slice"] is None for m in meta)
    again = train.sample_batch(4, np.random.default_rng(7))
    np.testing.assert_array_equal(again[0], image)

    clone = pickle.loads(pickle.dumps(train))  # after a read: the open handle must not travel
    np.testing.assert_array_equal(clone.sample_batch(4, np.random.default_rng(7))[1], label)

    with pytest.raises(FileNotFoundError, match="decathlete patches .* -c 3d_fullres -f 1 "):
        sampler_cls(case_dir=cases, case_ids=splits[1]["train"], input_size=sizes["train"])
    with pytest.raises(ValueError, match="other augmentation settings"):
        sampler_cls(case_dir=cases, case_ids=splits[0]["train"], input_size=sizes["val"])


def test_recipe_switches_to_patch_set_with_a_bare_name(workdir: Path) -> None:
    recipe, config, splits, sizes = _setting(workdir)
    switched = validate(recipe.with_overrides(["sampler=patch_set"]))  # the patch sampler's kwargs do not leak
    assert switched.sampler.kwargs == {}
    sampler = build.build_sampler(switched, config, workdir / "preprocessed" / "3d_fullres", splits[0]["val"],
                                  sizes["val"], ignore_label=None)
    assert isinstance(sampler, patchset.PatchSetSampler) and sampler.path == _files(workdir)["val"]


def test_cli_verb(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["patches", "--help"])
    assert exit_info.value.code == 0 and "--set sampler=patch_set" in capsys.readouterr().out
    argv = ["patches", str(workdir), "-c", "3d_fullres", "-f", "0", "--train", str(N_TRAIN), "--val", str(N_VAL)]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    # 8 of 25 training patches forced (3 + 3 + 2), 32 %; already written: skipped.
    assert len(out) == 2 and "25 patches" in out[0] and "32% forced" in out[0] and "skipped" in out[0]
    assert main(["patches", str(workdir), "--train", "0", "--val", "1"]) == 1


def test_training_from_the_patch_set(workdir: Path, tmp_path: Path) -> None:
    argv = ["train", str(workdir), "-c", "3d_fullres", "-f", "0", "--epochs", "1", "--iterations-per-epoch", "2",
            "--val-iterations", "1", "--device", "cpu", "-j", "0", "--set", "sampler=patch_set",
            "-o", str(tmp_path / "models")]
    assert main(argv) == 0
    saved = json.loads((tmp_path / "models" / "fold_0" / "recipe.json").read_text())
    assert saved["sampler"] == {"name": "patch_set", "kwargs": {}}
