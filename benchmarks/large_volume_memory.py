"""Peak memory of ``decathlete predict`` on a 512x512x600 CT-sized volume with a 14-class model (decathlete alone).

    .venv/bin/python benchmarks/large_volume_memory.py [--out benchmarks/results/large_volume_memory.json]

What it shows: the inverse of preprocessing runs class by class with a running argmax, so predicting a large
many-class volume needs memory for the sliding-window accumulator at the model's spacing plus a few single-class
volumes at the input's resolution, never a float ``K x Z x Y x X`` stack at the input's resolution (8.8 GB here).

Setup (all generated in a temporary folder, nothing from ../shared): four small synthetic training cases
(16x64x64 at 2.5x1.6x1.6 mm) whose dataset.json declares 14 labels; ``plan --recipe tiny`` + ``preprocess`` +
``train`` for one iteration give a 14-class model (its weights do not matter for memory); the test volume is a
synthetic CT-like int16 image of 600x512x512 voxels (z, y, x) at 1.0x0.8x0.8 mm, so prediction resamples it to the
model's 2.5x1.6x1.6 mm and the 14 probability maps back. The figure is the peak RSS summed over the ``decathlete
predict --no-tta --device cpu`` process tree (``peak_rss.measure``), one run. A stress test of the resampling path
with many classes, decathlete alone; the side-by-side comparison with nnU-Net is ``memory_large_volume`` in
``make bench`` (``bench_memory.py``: 6 classes, no resampling, both systems' own plans).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, git_commit, machine, now, our_env  # noqa: E402
from peak_rss import measure  # noqa: E402

CLI = REPO / ".venv" / "bin" / "decathlete"
PYTHON = REPO / ".venv" / "bin" / "python"
SHAPE, SPACING, CLASSES = (600, 512, 512), (1.0, 0.8, 0.8), 14

_MAKE_VOLUME = """
import sys, numpy as np, nibabel as nib
from decathlete.synthetic import synthetic_case
shape, spacing = (600, 512, 512), (1.0, 0.8, 0.8)
image, _ = synthetic_case(np.random.default_rng(1), shape, spacing)
ct = np.clip(image * 4 - 1000, -1024, 3000).astype(np.int16)
del image
nib.save(nib.Nifti1Image(ct.transpose(2, 1, 0), np.diag([*spacing[::-1], 1.0])), sys.argv[1])
"""


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, env=our_env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "large_volume_memory.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="decathlete-large-volume-") as tmp_name:
        tmp = Path(tmp_name)
        _run([str(PYTHON), "-c", "import sys, json; from decathlete.synthetic import make_synthetic_dataset as m; "
              "p = m(sys.argv[1], n_cases=4, shape=(16, 64, 64), spacing=(2.5, 1.6, 1.6)); "
              "d = json.loads((p / 'dataset.json').read_text()); "
              f"d['labels'] = {{'0': 'background', **{{str(k): f'structure_{{k}}' for k in range(1, {CLASSES})}}}}; "
              "(p / 'dataset.json').write_text(json.dumps(d))", str(tmp / "raw")])
        work = tmp / "work"
        _run([str(CLI), "plan", str(tmp / "raw"), "-o", str(work), "--recipe", "tiny", "-c", "3d_fullres", "-j", "1"])
        _run([str(CLI), "preprocess", str(work), "-j", "1"])
        _run([str(CLI), "train", str(work), "-f", "0", "--epochs", "1", "--iterations-per-epoch", "1",
              "--val-iterations", "1", "--device", "cpu"])
        (tmp / "in").mkdir()
        _run([str(PYTHON), "-c", _MAKE_VOLUME, str(tmp / "in" / "ct.nii.gz")])
        cmd = [str(CLI), "predict", "-i", str(tmp / "in"), "-o", str(tmp / "out"), "-m", str(work), "--no-tta",
               "--device", "cpu"]
        result = measure(cmd, env=our_env())
        if result["returncode"] != 0 or not (tmp / "out" / "ct.nii.gz").is_file():
            raise SystemExit(f"predict failed ({result['returncode']})")
        plans = json.loads((work / "plans.json").read_text())["configurations"]["3d_fullres"]
    voxels = SHAPE[0] * SHAPE[1] * SHAPE[2]
    record = {"name": "predict_peak_rss_large_volume_14_classes", "unit": "MB",
              "decathlete": round(result["peak_rss_mb"], 1), "wall_seconds": round(result["wall_s"], 1),
              "input_shape_zyx": SHAPE, "input_spacing_zyx": SPACING, "classes": CLASSES,
              "model_spacing_zyx": plans["spacing"], "model_patch": plans["patch_size"],
              "float32_full_stack_mb": round(CLASSES * voxels * 4 / 1e6, 1),
              "input_int16_mb": round(voxels * 2 / 1e6, 1),
              "note": "decathlete predict --no-tta --device cpu, peak RSS summed over the process tree, one run; "
                      "the reference column is absent: the nnU-Net side is not implemented yet",
              "machine": machine(), "date": now(), "git_commit": git_commit()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
