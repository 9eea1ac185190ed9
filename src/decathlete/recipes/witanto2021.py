"""Recipe ``flare21_2d``: Witanto et al. 2021, nnU-Net 2D for fast, low-memory abdominal organ segmentation
(MICCAI FLARE21; text in ``../shared/seeds/witanto2021_flare21_nnunet2d.txt``).

The method as the paper gives it, on the framework's seams: nnU-Net's 2D U-Net (instance norm, leaky ReLU 0.01, 32
base features, He initialisation, 3x3 kernels) on z-isotropic volumes (planner ``flare21_2d``,
`decathlete.planning.flare21`), CT clipped to the foreground's 0.5/99.5 percentiles and z-scored with the clipped
foreground's global mean and std (normaliser ``ct`` with ``statistics="clipped"``), Dice + cross-entropy with deep
supervision, SGD with Nesterov momentum 0.99 from lr 0.01 with poly decay for 1000 epochs of 250 mini-batches,
nnU-Net's augmentations plus simulated lesions pasted into the organs (transform ``lesion``,
`decathlete.augment.lesion`), a third of each batch forced to hold foreground, no cropping and no postprocessing.

Where the paper is ambiguous or does not fit the framework, resolved here:

* **Patch and batch**: the paper's 512 x 512 at batch 12 is what nnU-Net's 2D memory rule gives on 0.8 mm abdominal
  CT with 8 GB; the rule is kept rather than the numbers, so other data (Task106: 4.7 mm, ~128 x 128 slices) get a
  patch that fits them, and ``plan --time-budget`` narrows the network on a CPU.
* **Deep supervision "on all decoder layers except the two lowest resolution layers"** is nnU-Net's scheme: the
  bottleneck has no output and the lowest decoder output weighs 0 (`decathlete.losses.deep_supervision`).
* **Isotropic spacing** is the in-plane spacing, and the slice axis the acquisition axis (the planner's docstring);
  new slices are interpolated linearly, not repeated.
* **Global normalisation**: "0.5 and 99.5 percentiles of the foreground voxels were clipped ... Following the
  clipping, the global mean and standard deviation was calculated": the percentiles are nnU-Net's (the fingerprint's
  foreground sample), the mean and std those of every clipped foreground voxel of the training set. nnU-Net's own
  CT normalisation takes the unclipped foreground's.
* **Disease simulation**: the authors edited 50 of their 361 training cases offline with in-house software; here a
  lesion is pasted online into one organ of a sample with probability 0.15 (about the paper's 50 / 361), after
  nnU-Net's augmentation, on the training device. The lesion keeps the organ's label (FLARE labels lesions as part
  of their organ); ``--set 'augment.extra=[{"name": "lesion", "kwargs": {"lesion_label": N}}]'`` writes a label.
* **Inference**: "we did not use any patch-based strategy": each slice is predicted whole (tiles as large as the
  slice, ``inference.max_tile``), and without mirroring, which the paper does not name and which would cost four
  forward passes per slice in a method chosen for its speed (``--set inference.tta=true`` adds it back).
* **Cross-validation**: the paper trained its final model on all cases and chose it on the challenge's validation
  set; the framework's folds and ``crossval`` are kept for measurement.
"""

from __future__ import annotations

from decathlete.recipes.base import Augmentation, Inference, Planning, Recipe, Spec
from decathlete.registry import register_recipe

LESION_PROBABILITY = 0.15  # ~ the paper's 50 edited cases of 361


@register_recipe("flare21_2d")
def flare21_2d() -> Recipe:
    """Witanto 2021: nnU-Net 2D on z-isotropic CT, global CT normalisation, simulated lesions (module docstring)."""
    return Recipe(
        name="flare21_2d",
        planner="flare21_2d",
        planning=Planning(crop_to_nonzero=False, normalization=(Spec("ct", {"statistics": "clipped"}),)),
        augment=Augmentation(name="nnunet", extra=(Spec("lesion", {"p": LESION_PROBABILITY}),)),
        inference=Inference(tta=False, max_tile=(4096, 4096), postprocessing=False),
    )
