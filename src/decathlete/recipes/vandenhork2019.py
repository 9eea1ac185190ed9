"""Recipe ``pancreas2019``: van den Hork et al. 2019, the 3D U-Net for pancreas and tumour in CT (Medical
Segmentation Decathlon; text in ``../shared/seeds/vandenhork_pancreas_3dunet.txt``).

The method as the paper gives it, on the framework's seams: Isensee et al. 2017's network
(`decathlete.nets.isensee2017`: base 16, five levels, dropout 0.6 and leaky ReLU, the paper's search result), CT
clipped to HU [-100, 200] then z-scored with the clipped training data's mean and std, stored in the plan
(normaliser ``ct_window``), a fixed spacing of 0.8 x 0.8 x 2.5 mm (x, y, z), patches of 128 x 128 x 64 (x, y, z) at
batch 2 with cases drawn in proportion to their voxels and thin scans padded with their edge values (sampler
``size_weighted``), class-weighted cross-entropy, and Adam at 1e-3 decayed x0.985 per epoch.

Where the paper is ambiguous or does not fit the framework, resolved here:

* **Width**: "The network uses twice as many filters as the network of [4]" describes Isensee's network against
  Kayalibay et al.'s, not a change the authors made; Isensee trained with base 16 (16-256), which this recipe keeps
  (``planning.base_features``; ``--set planning.base_features=32`` doubles it).
* **Array order**: spacing (z, y, x) = (2.5, 0.8, 0.8) and patch (z, y, x) = (64, 128, 128) in the plan.
* **Class weights**: the paper used [1, 10, 50], and after its search [1, 83, 660], for background, pancreas and
  tumour. A recipe does not know a dataset's classes, so the default is ``inverse_frequency`` (background voxels /
  class voxels from the fingerprint, background 1), which has the same intent on any label set; on a pancreas dataset
  ``--set 'loss.weight=[1, 10, 50]'`` gives the paper's. Top-k cross-entropy (k = 5 %, the paper's second study) is
  ``--set 'loss={"name": "topk_ce", "kwargs": {"k": 5}}'``.
* **Foreground share**: "at least 30 % of patches contain pancreas": each patch is centred on a foreground voxel with
  probability 0.3 (random patches hold some more), drawn per patch, since the positional rule would force one of
  every two at batch 2.
* **Normalisation statistics**: the paper took them from its training patches; the planner measures the clipped
  training images (every second voxel per axis) before any patch exists, and stores them in the plan.
* **Epochs**: the paper's epoch is its 8,000 training patches at batch 2 (4,000 steps), decayed x0.985 each, for 22
  epochs; here the decay every 4,000 steps and 352 framework epochs of 250 steps = 88,000 steps.
* **Augmentation**: none (the paper names none); no test-time mirroring. Inference is the framework's Gaussian
  sliding window; the paper's stitching of patch centres only is ``--set inference.tile_weighting=center``.
* **Patch set**: the paper's HDF5 patch files are ``decathlete patches WORKDIR ...`` plus ``--set sampler=patch_set``.
"""

from __future__ import annotations

from decathlete.recipes.base import Augmentation, Inference, Planning, Recipe, Spec
from decathlete.registry import register_recipe


@register_recipe("pancreas2019")
def pancreas2019() -> Recipe:
    """van den Hork 2019: Isensee 2017 U-Net, HU window, fixed spacing, weighted CE, Adam (module docstring)."""
    return Recipe(
        name="pancreas2019",
        net=Spec("isensee2017", {"dropout": 0.6}),
        loss=Spec("ce", {"weight": "inverse_frequency"}),
        optimizer=Spec("adam", {"lr": 1e-3}),
        schedule=Spec("exponential", {"gamma": 0.985, "every": 4000}),
        epochs=352,
        iterations_per_epoch=250,
        grad_clip=None,
        planning=Planning(target_spacing=(2.5, 0.8, 0.8), patch_size_3d=(64, 128, 128), batch_size=2,
                          base_features=16, max_features_3d=256, max_stages=5,
                          normalization=(Spec("ct_window", {"window": [-100.0, 200.0]}),)),
        augment=Augmentation(name="none"),
        sampler=Spec("size_weighted", {"oversample_foreground": 0.3, "probabilistic_oversampling": True,
                                       "pad_mode": "edge"}),
        inference=Inference(tta=False),
    )
