"""Recipe ``rippel2018``: Rippel, Weninger & Merhof 2018, "AutoML segmentation for 3D medical image data:
contribution to the MSD challenge 2018" (text in ``../shared/seeds/rippel2018_automl_msd.txt``).

The method as the paper gives it, on the framework's seams: the ``rippel2018`` planner (median spacing, per-axis depth
from the median shape, patch ``2^(3 + depth)``; `decathlete.planning.rippel2018`), a residual 3D U-Net with instance
norm between convolution and activation and 6 base features, the generalised Dice loss with class weights 1
(`decathlete.losses.overlap`), Adam at 5e-4 decayed x0.984 every 100 steps for 30,000 iterations at batch 4, Gaussian
noise, rotation, scaling and an elastic deformation isotropic in millimetres (preset ``rippel2018``), random windows
from the whole scan mirrored at its borders (sampler ``reflect_patch``, no forced foreground), inference with tiles
as large as the image up to [128, 512, 512], resampling back, and no postprocessing.

Where the paper is ambiguous, resolved here:

* **Generalised Dice over the foreground classes.** With w = 1 and the background included, Sudre's loss reduces to
  one minus the soft voxel accuracy (``sum_l tp_l = sum of correct probabilities`` and ``sum_l (r_l + p_l) = 2N``),
  which is exactly the imbalance the paper chose the loss to resist; leaving the background out makes it one Dice
  pooled over the foreground classes. The sums run over the whole batch (NiftyNet's implementation of Sudre's loss,
  which flattens the batch), so a patch without foreground does not push its sample's predictions to zero alone.
  ``--set loss.include_background=true`` gives the other reading (compared in
  ``benchmarks/results/paper_recipe_ablations_task04.json``).
* **Residual U-Net**: one residual block (two 3x3x3 convolutions, the projection shortcut of nnU-Net's ResEnc) per
  encoder stage, two plain convolutions per decoder stage, leaky ReLU 0.01 (the paper names instance norm after
  Isensee 2017, whose network this activation comes from), strided convolutions down and transposed convolutions up
  (the paper's "upsampling kernels chosen accordingly"), widths doubling from 6 (capped at 320, never reached).
* **Deep supervision**: ``max(depth) - 1`` predictions: every decoder level but the lowest, whose weight in nnU-Net's
  scheme is 0; the others weigh 1, 1/2, 1/4 ... normalised (the paper gives no weights).
* **Normalisation** is not given: nnU-Net's rule by channel name (z-score for MRI, the CT window for CT). No crop to
  the nonzero region ("little-to-no pre-processing": patches are drawn from the whole scan).
* **Augmentation probabilities** are not given ("set globally for all tasks"): nnU-Net's for noise, rotation and
  scaling, 0.2 for the elastic deformation; no mirroring, at training or test time (the paper lists none).
* **Schedule**: 120 epochs of 250 steps = the paper's 30,000 iterations; the decay counts optimiser steps. Under a time
  budget the steps are what the budget holds (never more than 30,000) and the decay keeps its 100-step period.
"""

from __future__ import annotations

from decathlete.recipes.base import UNET_LAYERS, Augmentation, Inference, Planning, Recipe, Spec
from decathlete.registry import register_recipe


@register_recipe("rippel2018")
def rippel2018() -> Recipe:
    """Rippel 2018: per-axis-depth residual U-Net, generalised Dice, Adam (see the module docstring)."""
    return Recipe(
        name="rippel2018",
        net=Spec("unet", {"block": "residual", **UNET_LAYERS}),
        loss=Spec("generalized_dice", {"weight": "uniform", "include_background": False, "batch": True}),
        optimizer=Spec("adam", {"lr": 5e-4}),
        schedule=Spec("exponential", {"gamma": 0.984, "every": 100}),
        epochs=120,
        iterations_per_epoch=250,
        grad_clip=None,
        planner="rippel2018",
        planning=Planning(base_features=6, batch_size=4, min_batch_size=1, n_blocks_per_stage=1,
                          n_conv_per_stage_decoder=2, crop_to_nonzero=False),
        augment=Augmentation(name="rippel2018"),
        sampler=Spec("reflect_patch", {"oversample_foreground": 0.0}),
        inference=Inference(tta=False, max_tile=(128, 512, 512), postprocessing=False),
    )
