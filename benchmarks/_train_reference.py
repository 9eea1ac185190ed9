"""Reference side of ``bench_train``'s training-step benchmark, and the step loop both sides share.

Runs inside the reference environment (``.venv-bench``: nnunetv2 + dynamic_network_architectures), never in
decathlete's:

    .venv-bench/bin/python benchmarks/_train_reference.py --json --arch ARCH.json --warmup 2 --iterations 5

``ARCH.json`` is the architecture of a 3d_fullres plan (stages, widths, kernel sizes, strides, input channels,
classes, batch and patch size), written by ``bench_train``. The network is
``dynamic_network_architectures.architectures.unet.PlainConvUNet`` with the keyword arguments nnU-Net v2's planner
writes into its plans for a plain U-Net (``conv_bias=True``, ``InstanceNorm3d(eps=1e-5, affine=True)``,
``LeakyReLU(inplace=True)``, two convolutions per encoder and decoder stage, ``deep_supervision=True``), initialised as
``get_network_from_plans`` does (``network.apply(network.initialize)``).

``step_loop`` is the timed part on *both* sides (``bench_train --step-worker`` imports it for decathlete's network):
random input of the plan's (batch, channels, *patch), random labels, downsampled for every deep-supervision output by
taking every k-th voxel; each step is ``zero_grad`` + forward + the sum of the cross-entropy losses of the outputs +
backward + ``SGD(lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)`` step (the optimiser both systems use).
It only needs torch.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def ds_factors(strides: list[list[int]], n_outputs: int) -> list[list[int]]:
    """Downsampling factor per axis of each deep-supervision output (full resolution first)."""
    factors, current = [], [1] * len(strides[0])
    for i in range(n_outputs):
        if i > 0:
            current = [c * s for c, s in zip(current, strides[i])]
        factors.append(list(current))
    return factors


def step_loop(net: Any, arch: dict[str, Any], warmup: int, iterations: int, threads: int, seed: int = 0,
              device: str = "cpu") -> dict[str, Any]:
    """Time ``warmup`` + ``iterations`` training steps of ``net`` (deep supervision on); returns per-step seconds.

    fp32 on every device (the same arithmetic on both sides); on CUDA each step ends with a synchronisation so that
    its time covers the kernels it launched.
    """
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(seed)
    batch, patch = int(arch["batch_size"]), [int(p) for p in arch["patch_size"]]
    image = torch.randn((batch, int(arch["in_channels"]), *patch), generator=generator).to(device)
    label = torch.randint(0, int(arch["num_classes"]), (batch, *patch), generator=generator).to(device)
    net.to(device).train()
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    with torch.no_grad():
        n_outputs = len(net(image[:1]))
    targets = [label[(slice(None), *(slice(None, None, f) for f in factor))].contiguous()
               for factor in ds_factors(arch["strides"], n_outputs)]
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)

    def step() -> float:
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        outputs = net(image)
        loss = sum(F.cross_entropy(out, target) for out, target in zip(outputs, targets))
        loss.backward()
        optimizer.step()
        sync()
        elapsed = time.perf_counter() - t0
        assert all(o.shape[2:] == t.shape[1:] for o, t in zip(outputs, targets)), [o.shape for o in outputs]
        return elapsed

    for _ in range(warmup):
        step()
    times = [step() for _ in range(iterations)]
    return {"per_step_s": times, "iterations_per_second": iterations / sum(times),
            "median_step_s": sorted(times)[len(times) // 2], "torch_threads": torch.get_num_threads(),
            "parameters": sum(p.numel() for p in net.parameters() if p.requires_grad),
            "deep_supervision_outputs": n_outputs, "torch": torch.__version__}


def build_reference(arch: dict[str, Any]) -> Any:
    """``PlainConvUNet`` with the kwargs of nnU-Net v2's plain 3d_fullres plans."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    n_stages = len(arch["features_per_stage"])
    net = PlainConvUNet(
        input_channels=int(arch["in_channels"]), n_stages=n_stages, features_per_stage=arch["features_per_stage"],
        conv_op=torch.nn.Conv3d, kernel_sizes=arch["kernel_sizes"], strides=arch["strides"],
        n_conv_per_stage=[2] * n_stages, num_classes=int(arch["num_classes"]),
        n_conv_per_stage_decoder=[2] * (n_stages - 1), conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None, dropout_op_kwargs=None,
        nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)
    net.apply(net.initialize)
    return net


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--arch", type=Path, required=True)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from importlib.metadata import version

    import torch

    arch = json.loads(args.arch.read_text())
    torch.manual_seed(args.seed)
    out = step_loop(build_reference(arch), arch, args.warmup, args.iterations, args.threads, args.seed, args.device)
    out["network"] = f"dynamic_network_architectures {version('dynamic_network_architectures')} PlainConvUNet"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
