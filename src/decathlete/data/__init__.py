"""Training data: foreground-aware patch sampling from the preprocessed cache, batched in background workers.

`PatchSampler` draws crops of the augmentation's input size with nnU-Net v2's foreground oversampling;
`BatchStream` runs it in DataLoader workers, batch ``i`` being a pure function of ``(seed, rank, i)`` so that a
resumed run sees exactly the batches it would have seen. Axes are (B, C, z, y, x), or (B, C, h, w) in 2D.
"""

from __future__ import annotations

from decathlete.data.loader import Batch, BatchStream, make_batch
from decathlete.data.sampling import PatchSampler, crop_with_padding

__all__ = ["Batch", "BatchStream", "PatchSampler", "crop_with_padding", "make_batch"]
