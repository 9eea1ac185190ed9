"""Shared pieces of the benchmarks: result records, machine description, alternating repeated measurements.

Every benchmark compares decathlete with the system a user would otherwise pick, on the same data, on the same
machine, in the same run: the two sides alternate (A B A B ...) so that drift in machine load hits both, and the
median of the repeats is reported.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BENCH_VENV = REPO / ".venv-bench"
OUR_PYTHON = REPO / ".venv" / "bin" / "python"
OUR_CLI = REPO / ".venv" / "bin" / "decathlete"


@dataclass
class Record:
    """One benchmark result; ``ratio`` is decathlete / reference (so < 1 is better when ``better`` is "lower")."""

    name: str
    unit: str
    decathlete: float | None
    reference: float | None
    reference_name: str
    better: str
    details: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    repeats: int | None = None  # runs behind the figure; None: the harness's --repeats

    @property
    def ratio(self) -> float | None:
        if self.decathlete is None or not self.reference:
            return None
        return self.decathlete / self.reference

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": None if self.ratio is None else round(self.ratio, 4)}


def machine(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on (with ``device="cuda"`` also the GPU, as torch names it)."""
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    out = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "memory_gb": round(mem_gb, 1),
           "python": platform.python_version(), "system": platform.platform(), "device": device}
    if device.startswith("cuda"):
        import torch

        out["gpu"] = torch.cuda.get_device_name(torch.device(device)) if torch.cuda.is_available() else "unavailable"
    return out


def check_device(device: str) -> str:
    """``cpu`` or ``cuda[:N]``; refuses cuda when this environment's torch sees no GPU (nothing would be measured)."""
    if device == "cpu":
        return device
    if not device.startswith("cuda"):
        raise ValueError(f"--device {device!r}: choose cpu or cuda")
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch {torch.__version__} sees no CUDA GPU (install a CUDA build, e.g. "
                         "make bench TORCH_SPEC=... TORCH_INDEX=https://download.pytorch.org/whl/cu128)")
    return device


def nnunet_device(device: str) -> str:
    """nnU-Net's ``-device`` value (it takes ``cuda``, not ``cuda:N``; the GPU is chosen by CUDA_VISIBLE_DEVICES)."""
    return "cuda" if device.startswith("cuda") else "cpu"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def alternate(sides: dict[str, Callable[[], dict[str, float]]], repeats: int) -> dict[str, list[dict[str, float]]]:
    """Run each side ``repeats`` times, interleaved, and collect the measurements of each run."""
    results: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, run in sides.items():
            results[name].append(run())
    return results


def median_of(runs: list[dict[str, float]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def reference_problem() -> str:
    """Why the reference systems cannot run ("" when their environment is there)."""
    if not (BENCH_VENV / "bin" / "python").exists():
        return f"reference environment {BENCH_VENV} is absent (make bench creates it)"
    return ""


def our_env() -> dict[str, str]:
    """Environment for decathlete's side (its source first on the path)."""
    src = str(REPO / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


def ref_env() -> dict[str, str]:
    """Environment for the reference systems (nothing of decathlete's on the path)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def run_checked(cmd: list[str], env: dict[str, str] | None = None) -> None:
    """Run an untimed preparation command, printing how long it took; raise with its output if it fails."""
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    print(f"   {Path(cmd[0]).name} {' '.join(cmd[1:3])}: {time.perf_counter() - start:.0f} s", flush=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def run_json(cmd: list[str], env: dict[str, str] | None = None) -> Any:
    """Run a worker (or a `decathlete` verb with --json) that prints its result as JSON on its last line; raise with
    its output if it fails."""
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-1500:]}\n"
                           f"{result.stderr[-1500:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def subset_dataset(src: Path, dst: Path, n: int) -> Path:
    """Copy the first ``n`` training cases (outside the repository) so both systems see the same subset."""
    meta = json.loads((src / "dataset.json").read_text())
    meta["training"], meta["test"] = meta["training"][:n], []
    meta["numTraining"], meta["numTest"] = n, 0
    for entry in meta["training"]:
        for key in ("image", "label"):
            target = dst / entry[key]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / entry[key], target)
    (dst / "dataset.json").write_text(json.dumps(meta, indent=2))
    (dst / "imagesTs").mkdir(exist_ok=True)  # nnUNetv2_convert_MSD_dataset asserts that it exists
    return dst


def nnunet_trainer_path(name: str) -> Path:
    """Where a benchmark trainer class ``name`` goes in the reference environment's nnunetv2 package."""
    out = subprocess.run([str(BENCH_VENV / "bin" / "python"), "-c", "import nnunetv2, os; "
                          "print(os.path.dirname(nnunetv2.__file__))"], env=ref_env(), capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise RuntimeError(f"cannot import nnunetv2 in {BENCH_VENV}: {out.stderr[-1000:]}")
    # Top level, not variants/benchmarking/: the lookup by name imports the folder's modules before it walks the
    # subpackages in alphabetical order, and primus/ (before variants/) imports timm -> torchvision, which fails in
    # the CPU reference environment ("operator torchvision::nms does not exist").
    return Path(out.stdout.strip()) / "training" / "nnUNetTrainer" / f"{name}.py"


def remove_trainer(path: Path) -> None:
    path.unlink(missing_ok=True)
    for cached in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
        cached.unlink(missing_ok=True)
