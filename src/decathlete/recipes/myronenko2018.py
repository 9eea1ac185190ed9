"""Recipe ``segresnet_vae``: Myronenko 2018, "3D MRI brain tumor segmentation using autoencoder regularization"
(BraTS 2018 winner, https://arxiv.org/abs/1810.11654).

The method as the paper gives it, on the framework's seams: SegResNet with the VAE branch (``nets/segresnet.py``), the
squared-denominator soft Dice summed over three nested sigmoid regions plus 0.1 x L2 reconstruction plus 0.1 x KL
(``losses/vae.py``), Adam at 1e-4 with L2 weight decay 1e-5 and polynomial decay (power 0.9), batch 1, per-channel
z-scores over the nonzero (brain) voxels, augmentation by a per-channel intensity shift (+-0.1 std) and scale
(0.9-1.1) and a flip of every axis with probability 0.5 only, and 8-flip mirroring at test time.

Where the paper is ambiguous or does not fit the framework, resolved here:

* **Regions** are mapped from the dataset's label *names*, since BraTS numberings differ (BraTS 2015: 1 necrosis,
  2 edema, 3 non-enhancing, 4 enhancing; BraTS 2018+: 1 NCR/NET, 2 edema, 4 -> 3 enhancing; MSD: 1 edema,
  2 non-enhancing, 3 enhancing): whole tumour = every foreground label, tumour core = every one but edema
  (``*edema*``), enhancing = ``enhancing*``. Export paints edema, then the core's lowest label, then enhancing. In
  the BraTS 2015 numbering necrosis and non-enhancing tumour are both "core, not enhancing", which no region tells
  apart, so both come back as necrosis (1); every region, and so the challenge's scores, is unchanged. A dataset
  whose names do not match gets an error naming its labels and the ``--set regions=...`` override.
* **Crop**: 160x192x128 was chosen to hold most of a 240x240x155 brain volume with batch 1 on a 32 GB V100. We keep
  that intent rather than the numbers: nnU-Net's patch rule, clipped to the median size of the brain (cropped to
  its nonzero box), fitted to 32 GB, batch fixed at 1; under ``--time-budget`` the planner narrows the width and,
  as this recipe allows (``planning.budget_crop``), the crop, and keeps batch 1.
* **Levels**: four (``planning.max_stages``), blocks (1, 2, 2, 4) down and 1 up, widths 32-256; the planner still
  chooses strides and kernels per axis, which on isotropic brain MRI are the paper's 2 and 3 everywhere.
* **Epochs**: 300 of 285 steps (the paper's epoch is one pass over its 285 training cases at batch 1), so the schedule
  has the paper's 85,500 steps; our sampler draws cases at random instead of once each per epoch. The decay is
  applied per step, the continuous form of the paper's per-epoch formula.
* **Weight decay** is Adam's L2 term on every parameter (the paper names the convolution kernels only).
* **Sampling**: the paper's crop holds most of the brain, so every crop holds tumour and background. For the budget's
  smaller crops each crop is centred on tumour with nnU-Net's probability 1/3, drawn per crop
  (``probabilistic_oversampling``): nnU-Net's positional rule forces the last ``round(B * 0.33)`` crops of a batch,
  which is none at batch 1, and the Dice-only loss learns little from crops without tumour (see
  ``benchmarks/results/segresnet_vae_task101.json``, arms ``segresnet_vae*``).
* **Intensity shift/scale** is applied inside the brain only, so the background stays 0 as at inference (the
  paper's TensorFlow code shifted whole channels of images whose background is 0 too).
* **Ensembles**: ``predict`` averages the probabilities of every trained fold (the paper averaged 10 models trained
  from scratch); ensembles of several seeds of one fold wait for the ensembling command (issue 20).
"""

from __future__ import annotations

from decathlete.recipes.base import Augmentation, Inference, Planning, Recipe, Regions, Spec
from decathlete.registry import register_recipe

BRATS_REGIONS = Regions(regions={"whole tumour": ("*",), "tumour core": ("*", "!*edema*"),
                                 "enhancing tumour": ("enhancing*",)})


@register_recipe("segresnet_vae")
def segresnet_vae() -> Recipe:
    """Myronenko 2018: SegResNet + VAE regularisation, region-based BraTS training (see the module docstring)."""
    return Recipe(
        name="segresnet_vae",
        net=Spec("segresnet", {"vae": True, "latent": 128, "dropout": 0.2}),
        loss=Spec("dice_vae", {"weight_l2": 0.1, "weight_kl": 0.1}),
        optimizer=Spec("adam", {"lr": 1e-4, "weight_decay": 1e-5}),
        schedule=Spec("poly", {"power": 0.9}),
        epochs=300,
        iterations_per_epoch=285,
        grad_clip=None,
        planning=Planning(base_features=32, max_features_3d=256, max_features_2d=256, n_blocks_per_stage=(1, 2, 2, 4),
                          n_conv_per_stage_decoder=1, max_stages=4, batch_size=1, min_batch_size=1, gpu_memory_gb=32,
                          normalization=(Spec("zscore", {"use_nonzero_mask": True}),), budget_crop=True),
        regions=BRATS_REGIONS,
        augment=Augmentation(name="mirror_only", extra=(Spec("shift_scale", {"shift": 0.1, "scale": [0.9, 1.1]}),)),
        sampler=Spec("patch", {"oversample_foreground": 0.33, "probabilistic_oversampling": True}),
        inference=Inference(tta=True),
    )
