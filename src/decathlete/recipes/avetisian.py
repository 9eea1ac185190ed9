"""Recipe ``factorized_iou``: Avetisian, "Volumetric medical image segmentation with deep convolutional neural
networks" (Lomonosov Moscow State University; text in ``../shared/seeds/avetisian_factorized_iou.txt``).

The method as the paper gives it, on the framework's seams: a U-Net whose blocks are four 2D convolutions along
different axis pairs, each followed by ReLU and dropout, with max-pooling down and 1x1 "up-convolutions" up
(`decathlete.nets.factorized`), no normalisation, dropout before the output layer, the multi-class IoU loss over the
foreground classes (`decathlete.losses.overlap`, softmax; sigmoid for region datasets), and Table 1's optimiser:
Adam (beta 0.9, 0.999) at 7.6e-5, L2 weight 3e-4, gradient clipping at 1.0, keep probability 0.85, 30 channels in the
first layer.

Where the paper is ambiguous, resolved here:

* **Depth**: three poolings (four levels): the paper's inputs had to be multiples of ``2^3``. The per-axis strides
  and kernels are nnU-Net's planner's (``planning.max_stages = 4``), so an anisotropic axis is pooled later and gets
  kernel 1 in its two planes; the network pads any input to its divisor and crops the output back, so inference runs
  on whole images of any size, as the paper's TensorFlow graph did.
* **IoU over the foreground**: the paper's formula, one ratio pooled over every foreground class and voxel, so a
  large class can carry the ratio while a smaller one dies (seen on the hippocampus under a short CPU budget:
  ``benchmarks/results/paper_recipe_ablations_task04.json``); ``--set loss.reduction=mean`` averages one IoU per class.
* **Dropout**: the paper puts a dropout after every convolution and reports one keep probability (0.85), which is used
  for both those and the dropout before the output layer (``net.dropout``, ``net.head_dropout``).
* **L2**: Adam's coupled L2 term (``weight_decay`` 3e-4, the gradient of TensorFlow's ``3e-4 * l2_loss(w)``) on every
  parameter; the paper names the convolution kernels only. **Clipping** is of the gradient norm (the paper: "clipped
  to be less than or equal to 1.0").
* **Training length, patch, batch, sampling** are not given: nnU-Net's rules (patch and batch from the memory rule,
  a third of each batch forced onto foreground, 1000 epochs of 250 steps at a constant learning rate); a time budget
  shortens the steps and narrows the 30 channels like any recipe's.
* **Augmentation**: none (the paper names none and fights overfitting with dropout and L2); no test-time mirroring.
  Inference is a Gaussian-weighted sliding window over the training patch.
"""

from __future__ import annotations

from decathlete.recipes.base import Augmentation, Inference, Planning, Recipe, Spec
from decathlete.registry import register_recipe


@register_recipe("factorized_iou")
def factorized_iou() -> Recipe:
    """Avetisian: factorised-convolution U-Net trained with the IoU loss (see the module docstring)."""
    return Recipe(
        name="factorized_iou",
        net=Spec("factorized_unet", {"dropout": 0.15, "head_dropout": 0.15}),
        loss=Spec("iou", {"reduction": "pooled"}),
        optimizer=Spec("adam", {"lr": 7.6e-5, "betas": [0.9, 0.999], "weight_decay": 3e-4}),
        schedule=Spec("constant"),
        epochs=1000,
        iterations_per_epoch=250,
        grad_clip=1.0,
        planning=Planning(base_features=30, max_stages=4, n_blocks_per_stage=1, n_conv_per_stage_decoder=1),
        augment=Augmentation(name="none"),
        inference=Inference(tta=False),
    )
