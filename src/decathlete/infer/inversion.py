"""From the preprocessed grid back to the input's: the label map (and probabilities) of a case on the grid, axis
order and extent of the file it was read from (`decathlete.infer.predictor` runs it after the networks).

* Inversion resamples the probabilities (nnU-Net v2: the logits, then softmax) to the cropped original shape with
  order 1 (order 0 along a separate anisotropic axis, as nnU-Net), ONE CLASS AT A TIME with a running argmax and
  its value, so memory is two cropped volumes plus the result, never a float C x Z x Y x X stack (nnU-Net resamples
  all classes at once; its users report high RAM exporting large volumes). Linear interpolation preserves sums, so
  the resampled probabilities still sum to 1, and the running argmax equals the argmax of the full stack.
* Region-based models paint each region whose probability exceeds 0.5 with its ``regions_class_order`` label, in
  that order (later regions win), as nnU-Net does.

Outside the crop box the label is background (0) and the saved probabilities are background = 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from decathlete.planning.plans import IDENTITY, inverse_permutation
from decathlete.preprocess.cropping import bbox_slices, paste_into_bbox
from decathlete.preprocess.resampling import resample_volume, separate_axis_for


def invert_preprocessing(probabilities: np.ndarray, properties: Mapping[str, Any], class_values: Sequence[int],
                         region_based: bool = False, return_probabilities: bool = False
                         ) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """Label map (and probabilities) on the original grid from probabilities on the preprocessed grid.

    Args:
        probabilities: ``(K, z, y, x)`` float32 at the target spacing (softmax, or sigmoid per region).
        properties: the case's `PreprocessedCase.properties` (crop box, shapes, spacings, resampling settings).
        class_values: the label value of each of the K channels (softmax), or ``regions_class_order``.
        region_based: sigmoid outputs: paint channel k's label where its probability > 0.5, in channel order.
        return_probabilities: also return float16 ``(K, Z, Y, X)`` probabilities on the original grid.

    Returns:
        ``(label, probabilities or None)``; the label map ``(Z, Y, X)`` is uint8 (int16 for values beyond 255), both
        in the input file's own axis order (the properties' ``transpose_forward`` undone; absent = identity).
    """
    full_shape = tuple(properties["shape_before_crop"])
    crop_shape = tuple(properties["shape_after_crop"])
    bbox = tuple(tuple(b) for b in properties["crop_bbox"])
    rs = properties["preprocessing"]["resampling"]
    # nnU-Net's order for the way back: the anisotropic axis of the grid we come from (the target spacing) first.
    axis = separate_axis_for(properties["target_spacing"], properties["spacing_after_crop"], rs["anisotropy_threshold"])
    dtype = np.uint8 if min(class_values) >= 0 and max(class_values) <= 255 else np.int16
    label = np.zeros(crop_shape, dtype=dtype)
    best = np.full(crop_shape, -np.inf, dtype=np.float32)
    full = None
    if return_probabilities:
        full = np.zeros((len(class_values), *full_shape), dtype=np.float16)
        if not region_based:
            full[0] = 1  # background outside the crop box
    box = bbox_slices(bbox)
    for k, value in enumerate(class_values):
        p = resample_volume(probabilities[k], crop_shape, 1, axis, rs["separate_axis_order"])
        if region_based:
            label[p > 0.5] = value
        else:
            wins = p > best  # strict: the first of equal maxima wins, as np.argmax
            best[wins] = p[wins]
            label[wins] = value
        if full is not None:
            full[k][box] = p
        del p
    # Shapes and box above are in the plan's axis order: un-crop there, then undo the transposition.
    backward = inverse_permutation(properties.get("transpose_forward", IDENTITY))
    label = np.ascontiguousarray(paste_into_bbox(label, bbox, full_shape, fill=0).transpose(backward))
    if full is not None:
        full = np.ascontiguousarray(full.transpose(0, *(a + 1 for a in backward)))
    return label, full
