"""Two really trained configurations end to end through the command line: ``crossval --save-probabilities``, ``best``,
and ``predict -c 2d 3d_fullres``, whose probabilities are the mean of each configuration's own and whose label map is
their argmax, on exactly the input's grid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from decathlete import api
from decathlete.cli import main
from decathlete.infer.ensemble import ensemble_folder, label_map
from decathlete.infer.outputs import load_probability_file
from decathlete.infer.postprocess import apply_postprocessing, load_postprocessing
from decathlete.infer.provenance import PROVENANCE_FILE
from decathlete.io.images import read_label
from decathlete.synthetic import make_synthetic_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
CASES = ["synth_000", "synth_001", "synth_002", "synth_003"]
SPLITS = [{"train": CASES[:2], "val": CASES[2:]}, {"train": CASES[2:], "val": CASES[:2]}]
QUICK = {"epochs": 1, "iterations_per_epoch": 2, "val_iterations": 1, "device": "cpu", "num_workers": 0,
         "progress": False}
CONFIGS = ["2d", "3d_fullres"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four cases, two folds of 2d and of 3d_fullres trained for two steps each (one thread: before `one_thread`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ensemble")
    raw = make_synthetic_dataset(root / "raw", n_cases=4, shape=(16, 40, 40))
    api.plan(raw, root / "work", recipe="tiny", workers=1, progress=False, configurations=CONFIGS)
    api.preprocess(root / "work", CONFIGS, workers=1, progress=False)
    (root / "work" / "splits.json").write_text(json.dumps(SPLITS))
    for config in CONFIGS:
        api.train(root / "work", config, "every", **QUICK)
    torch.set_num_threads(threads)
    return root / "work"


def test_crossval_best_and_an_ensemble_prediction(work: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for config in CONFIGS:
        assert main(["crossval", str(work), "-c", config, "--save-probabilities", "--no-tta", "--device", "cpu"]) == 0
        root = work / "models" / config / "tiny"
        assert json.loads((root / "crossval" / "result.json").read_text())["probabilities_saved"] is True
        for fold, split in enumerate(SPLITS):
            for case in split["val"]:
                with np.load(root / f"fold_{fold}" / "validation" / f"{case}.npz") as saved:
                    seg = read_label(root / f"fold_{fold}" / "validation" / f"{case}.nii.gz")[0]
                    assert saved["probabilities"].dtype == np.float16
                    assert saved["probabilities"].shape == (3, *seg.shape)
    # resuming: a case whose probabilities are missing is predicted again, the others are kept
    lost = work / "models" / "2d" / "tiny" / "fold_0" / "validation" / f"{SPLITS[0]['val'][0]}.npz"
    kept = lost.with_name(f"{SPLITS[0]['val'][1]}.npz")
    lost.unlink()
    stamp = kept.stat().st_mtime_ns
    assert main(["crossval", str(work), "-c", "2d", "--save-probabilities", "--no-tta", "--device", "cpu"]) == 0
    assert lost.is_file() and kept.stat().st_mtime_ns == stamp
    capsys.readouterr()
    assert main(["best", str(work)]) == 0
    out = capsys.readouterr().out
    best = json.loads((work / "best.json").read_text())
    assert [c["name"] for c in best["candidates"]] == ["2d", "3d_fullres", "2d+3d_fullres"]
    assert best["cases"] == CASES and f"predict with: {best['command']}" in out
    chosen = " ".join(best["chosen"]["configurations"])
    assert best["command"] == f"decathlete predict -i IN -o OUT -m {work} -c {chosen}"

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(work.parent / "raw" / "imagesTr" / "synth_000.nii.gz", images)
    single = {}
    for config in CONFIGS:
        api.predict(images, tmp_path / config, work, config, tta=False, save_probabilities=True, device="cpu",
                    progress=False)
        single[config] = load_probability_file(tmp_path / config / "synth_000.npz")
    argv = ["predict", "-i", str(images), "-o", str(tmp_path / "both"), "-m", str(work), "-c", *CONFIGS,
            "--save-probabilities", "--no-tta", "--device", "cpu"]
    assert main(argv) == 0
    assert "ensemble of 2d + 3d_fullres (probabilities averaged); postprocessing: " in capsys.readouterr().out
    mean = (single["2d"][0] + single["3d_fullres"][0]) / 2
    probabilities, values = load_probability_file(tmp_path / "both" / "synth_000.npz")
    assert values == single["2d"][1] == [0, 1, 2]
    np.testing.assert_allclose(probabilities, mean, atol=1e-3)  # float16
    folder = ensemble_folder(work, CONFIGS)
    spec = load_postprocessing(folder) if folder is not None else None  # best chose it if the pair won
    seg = read_label(tmp_path / "both" / "synth_000.nii.gz")[0]
    assert (seg == apply_postprocessing(label_map(mean, values, False), spec)).all()
    written, given = nib.load(tmp_path / "both" / "synth_000.nii.gz"), nib.load(images / "synth_000.nii.gz")
    assert written.shape == given.shape and np.array_equal(written.affine, given.affine)
    again = api.predict(images, tmp_path / "both", work, CONFIGS, tta=False, device="cpu", progress=False)
    assert (again["n_done"], again["n_skipped"]) == (0, 1) and (tmp_path / "both" / PROVENANCE_FILE).is_file()
    assert again["folds"] == ["2d/fold_0", "2d/fold_1", "3d_fullres/fold_0", "3d_fullres/fold_1"]
    assert again["postprocessing"] == (str(folder / "postprocessing.json") if spec else None)
    with pytest.raises(FileExistsError, match="another model or settings"):  # another ensemble's outputs
        api.predict(images, tmp_path / "both", work, CONFIGS, tta=False, device="cpu", progress=False,
                    postprocess=False, folds=[0])
