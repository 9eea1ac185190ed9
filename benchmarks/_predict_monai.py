"""The MONAI side of ``bench_predict``: a plain MONAI inference script, run in the reference environment.

For each image of ``--images``: load with nibabel, z-score the image (what nnU-Net's plan does for MRI), run
``monai.inferers.sliding_window_inference(roi_size=patch, overlap=0.5, mode="gaussian", sw_batch_size=1)`` (MONAI's
defaults apart from overlap and mode, as the issue prescribes) with the same network as the other sides
(``dynamic_network_architectures``' ``PlainConvUNet`` with the plan's stages, deep supervision off), optionally
averaging the logits of all 8 mirrorings (``--tta``), argmax, and write the label map with the input's affine.
The weights are the network's initialisation (the benchmark measures time and memory, not accuracy).
"""

import argparse
import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference

from _train_reference import build_reference


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arch", type=Path, required=True)
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    arch = json.loads(args.arch.read_text())
    torch.manual_seed(0)
    net = build_reference(arch)
    net.decoder.deep_supervision = False
    net.eval().to(args.device)
    patch = tuple(arch["patch_size"])  # (z, y, x): the arrays below are transposed to that order
    flips = [axes for n in range(4) for axes in itertools.combinations((2, 3, 4), n)] if args.tta else [()]
    args.out.mkdir(parents=True, exist_ok=True)
    for path in sorted(args.images.glob("*.nii.gz")):
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32).transpose(2, 1, 0)
        data = (data - data.mean()) / max(float(data.std()), 1e-8)
        x = torch.from_numpy(np.ascontiguousarray(data))[None, None].to(args.device)
        with torch.inference_mode():
            logits = None
            for axes in flips:
                inp = torch.flip(x, axes) if axes else x
                out = sliding_window_inference(inp, patch, 1, net, overlap=0.5, mode="gaussian")
                out = torch.flip(out, axes) if axes else out
                logits = out if logits is None else logits + out
        label = logits[0].argmax(0).cpu().numpy().astype(np.uint8).transpose(2, 1, 0)
        nib.save(nib.Nifti1Image(label, img.affine, img.header), str(args.out / path.name))


if __name__ == "__main__":
    main()
