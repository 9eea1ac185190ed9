"""The worked plugin of examples/plugin: registered from outside the package, it plans, preprocesses, trains and
predicts through the command line, and its network, loss, sampler and tile weighting are the ones that run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from decathlete import registry
from decathlete.io.images import read_geometry, read_label
from decathlete.synthetic import make_synthetic_dataset

PLUGIN_PATH = Path(__file__).resolve().parents[1] / "examples" / "plugin"
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(PLUGIN_PATH), str(Path(__file__).resolve().parents[1] / "src")])}


def _cli(*args: str, plugin: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "decathlete.cli", *(["--plugin", "decathlete_example_plugin"] if plugin else []),
           *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, errors="replace", timeout=600)


@pytest.fixture(scope="module")
def plugin():  # noqa: ANN201
    sys.path.insert(0, str(PLUGIN_PATH))
    registry.load_plugin("decathlete_example_plugin")
    yield sys.modules["decathlete_example_plugin"]
    sys.path.remove(str(PLUGIN_PATH))
    registry._PLUGINS.remove("decathlete_example_plugin")  # later tests' worker processes must not look for it


def test_plugin_runs_end_to_end_from_the_command_line(tmp_path: Path) -> None:
    raw = make_synthetic_dataset(tmp_path / "raw", n_cases=6, shape=(16, 40, 40))
    new = make_synthetic_dataset(tmp_path / "new", n_cases=1, shape=(24, 60, 60), seed=1)
    work = tmp_path / "work"
    for args in (["plan", str(raw), "-o", str(work), "--recipe", "example_aux", "-c", "3d_fullres", "-j", "1"],
                 ["preprocess", str(work), "-j", "1"],
                 ["train", str(work), "--epochs", "2", "--iterations-per-epoch", "3", "--val-iterations", "1",
                  "--device", "cpu", "--set", "optimizer.lr=0.005"]):
        result = _cli(*args)
        assert result.returncode == 0, result.stderr[-3000:]
    plans = json.loads((work / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["network"]["name"] == "unet_reconstruct"
    fold = work / "models" / "3d_fullres" / "example_aux" / "fold_0"
    recipe = json.loads((fold / "recipe.json").read_text())
    assert recipe["optimizer"]["kwargs"]["lr"] == 0.005 and recipe["sampler"]["name"] == "foreground_weighted"
    assert json.loads((fold / "run.json").read_text())["plugins"] == ["decathlete_example_plugin"]
    # predict without --plugin: the model folder names its plugin, which is imported again from it
    result = _cli("predict", "-i", str(new / "imagesTr"), "-o", str(tmp_path / "pred"), "-m", str(work), "--device",
                  "cpu", plugin=False)
    assert result.returncode == 0, result.stderr[-3000:]
    label, geometry = read_label(tmp_path / "pred" / "synth_000.nii.gz")
    assert geometry.same_grid(read_geometry(new / "imagesTr" / "synth_000.nii.gz")[0]) == []
    assert set(np.unique(label).tolist()) <= {0, 1, 2}
    refused = _cli("predict", "-i", str(new / "imagesTr"), "-o", str(tmp_path / "p2"), "-m", str(work), "--set",
                   "loss.weight=1")
    assert refused.returncode == 1 and "only change inference" in refused.stderr
    listed = _cli("list").stdout
    assert "unet_reconstruct" in listed and "pyramid" in listed and "foreground_weighted" in listed


def test_plugin_components_are_the_ones_that_run(plugin, tmp_path: Path) -> None:  # noqa: ANN001
    from decathlete import api
    from decathlete.infer.predictor import Predictor
    from decathlete.losses.base import TrainingBatch
    from decathlete.nets.base import NetOutput
    from decathlete.planning.plans import Plans
    from decathlete.recipes.base import get_recipe
    from decathlete.recipes.build import build_loss, build_network, build_sampler

    raw = make_synthetic_dataset(tmp_path / "raw", n_cases=4, shape=(16, 40, 40))
    plans = api.plan(raw, tmp_path / "work", recipe="example_aux", workers=1, progress=False,
                     configurations=["3d_fullres"])
    api.preprocess(tmp_path / "work", workers=1, progress=False)
    config, recipe = plans.configuration("3d_fullres"), get_recipe("example_aux")
    net = build_network(config, plans).train()
    image = torch.randn(2, 1, *config.patch_size)
    output = net(image)
    assert isinstance(output, NetOutput) and output.aux["reconstruction"].shape == image.shape
    net.eval()
    assert isinstance(net(image), list | torch.Tensor)
    loss = build_loss(recipe, config, plans)
    batch = TrainingBatch(image, torch.zeros(2, 1, *config.patch_size, dtype=torch.long), [])
    batch.targets = [torch.zeros(2, 1, *config.patch_size, dtype=torch.long)[..., ::f[0], ::f[1], ::f[2]]
                     for f in np.cumprod(config.strides, axis=0)[:-1]]
    segmentation = loss.segmentation(output, batch)
    expected = segmentation + 0.1 * torch.mean((output.aux["reconstruction"] - image) ** 2)
    torch.testing.assert_close(loss(output, batch), expected)
    # the sampler draws cases by foreground size
    cases = tmp_path / "work" / "preprocessed" / config.data_identifier
    ids = sorted(p.name[:-5] for p in cases.glob("*.json"))
    sampler = build_sampler(recipe, config, cases, ids, config.patch_size)
    sizes = np.array([sum(n for v, n in json.loads((cases / f"{i}.json").read_text())["label_voxels"].items()
                          if int(v) > 0) for i in ids], dtype=float)
    np.testing.assert_allclose(sampler.weights, sizes / sizes.sum())
    drawn = [sampler.choose_case(np.random.default_rng(s)) for s in range(2000)]
    observed = np.array([drawn.count(i) for i in ids]) / len(drawn)
    np.testing.assert_allclose(observed, sampler.weights, atol=0.04)
    # and inference weights tiles with the plugin's pyramid
    api.train(tmp_path / "work", "3d_fullres", 0, epochs=1, iterations_per_epoch=1, val_iterations=1, device="cpu",
              num_workers=0, progress=False)
    predictor = Predictor(tmp_path / "work", device="cpu")
    pyramid = predictor.tile_weights([5, 4])
    assert pyramid.shape == (5, 4) and pyramid[2].max() == pyramid.max() and pyramid.min() > 0
    assert Plans.load(tmp_path / "work" / "plans.json").recipe == "example_aux"
