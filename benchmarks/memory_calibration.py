"""Check the planner's memory estimate against measured peak GPU memory of real training steps.

For a few planned configurations (fake fingerprints spanning isotropic, anisotropic, 2D and large-image cases),
build the planned network, run forward + backward + SGD steps with AMP at the planned patch and batch size, and
compare ``torch.cuda.max_memory_allocated`` with ``memory_estimate_gb``. Needs CUDA; prints JSON.

    python benchmarks/memory_calibration.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from decathlete import registry  # noqa: E402
from decathlete.planning import rules  # noqa: E402
from decathlete.recipes.base import get_recipe  # noqa: E402
from test_planning import fake_fingerprint  # noqa: E402

CASES = {
    "hippocampus_like": ((36, 50, 35), (1.0, 1.0, 1.0), 200),
    "ct_abdomen_like": ((200, 400, 400), (2.5, 0.8, 0.8), 40),
    "isotropic_large": ((256, 256, 256), (1.0, 1.0, 1.0), 40),
    "brain_like": ((140, 170, 140), (1.0, 1.0, 1.0), 400),
}


def measure(config, n_in: int, n_out: int, steps: int = 3) -> float:
    kwargs = config.network.kwargs
    net = registry.build("nets", config.network.name, in_channels=n_in, num_classes=n_out, **kwargs).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    x = torch.randn(config.batch_size, n_in, *config.patch_size, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.float16):
            outputs = net(x)
            outputs = outputs if isinstance(outputs, list) else [outputs]
            loss = sum(o.float().mean() for o in outputs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1024**3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for name, (shape, spacing, n) in CASES.items():
        for recipe in ("default", "resenc_m"):
            plans = rules.plan_nnunet(fake_fingerprint(shape, spacing, n_cases=n), {"name": name}, get_recipe(recipe))
            for cname, config in plans.configurations.items():
                measured = measure(config, 1, 3)
                estimate = config.memory_estimate_gb
                rows.append({"case": name, "recipe": recipe, "config": cname, "patch": config.patch_size,
                             "batch": config.batch_size, "estimate_gb": estimate,
                             "measured_gb": round(measured, 3), "ratio": round(measured / estimate, 3)})
                print(json.dumps(rows[-1]), flush=True)
                torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
