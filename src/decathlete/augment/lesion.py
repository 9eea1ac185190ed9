"""Synthetic lesions pasted into organs: the "disease simulation" of Witanto et al. 2021 (FLARE21), a batch transform.

FLARE21's training scans show few diseased organs, its test scans many; Witanto et al. pasted synthetic diseases into
the organs of the training images so that the network sees lesions it never saw. They did it offline with in-house
software; here it runs online, on the training device, after the spatial and intensity augmentation (registry kind
``transforms``, used as ``Augmentation(extra=(Spec("lesion", {...}),))``). The paper's generator and its settings
are not public, so the method below and its defaults are ours.

Per sample, with probability ``p``, one lesion goes into one organ:

* **site**: an organ chosen uniformly among the foreground values present in the crop (optionally only ``labels``),
  the centre uniformly among its voxels: every organ is equally likely to be diseased, whatever its size.
* **shape**: an ellipsoid (ellipse in 2D), uniformly rotated, with per-axis radii a fraction ``size`` of the organ's
  extent (bounding box, in voxels) along that axis *in this crop*. Relative radii need no spacing: they scale with
  the organ, so a kidney gets a kidney-sized cyst and a liver a liver-sized tumour, they follow the voxel
  anisotropy, and a sliver of organ at the crop border gets a small lesion rather than one it cannot hold. Radii are
  at least one voxel. The normalised radius ``d`` is divided by ``1 + irregularity * f``, ``f`` a coarse random grid
  in [-1, 1] (5 nodes per axis over [-2, 2] lesion radii, in the lesion's own rotated frame) interpolated
  trilinearly: a smooth random blob whose lobes scale and turn with the lesion.
* **edge**: the weight ``w`` is a smoothstep falling from 1 at ``d = 1 - softness`` to 0 at ``d = 1 + softness``
  (0.5 at ``d = 1``). Unlike a sigmoid it is exactly 0 beyond the blob, so only the blob changes (no rounding
  noise elsewhere) and ``w = 1`` at the centre; ``w`` is then set to 0 wherever the label is not the organ, so the
  lesion never leaks out of it (nor into voxels labelled -1).
* **intensity**: every channel gets ``w * (o + noise * n)``: ``o`` of magnitude ``U(offset)``, negative
  (hypodense, as most liver, kidney and pancreas lesions on contrast CT) with probability ``p_hypo``; ``n`` is white
  Gaussian texture. Units are those of the normalised image: for nnU-Net's CT normalisation one unit is the
  standard deviation of the dataset's foreground intensities, for z-scoring that of the image.
* **label**: unchanged by default, the lesion stays part of its organ (FLARE21 labels the diseased organ whole);
  with ``lesion_label`` the voxels with ``w >= 0.5`` (``d <= 1`` inside the organ) take that value instead.

Randomness, as in `decathlete.augment.intensity`: a fixed number of draws from the CPU generator per call, whatever
the outcome (8 uniforms and 4 Gaussians per sample, then one seed), so a seed reproduces a run; the random fields
come from a generator on the image's device seeded from it. The work per lesion is confined to the organ's bounding
box; finding the organ costs one host sync per sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from decathlete.augment.intensity import device_generator
from decathlete.registry import register_transform

_GRID = 5  # nodes per axis of the coarse shape field
_REACH = 2.0  # the coarse field spans [-_REACH, _REACH] lesion radii


def _rotation(q: Tensor, ndim: int) -> Tensor:
    """A uniformly random rotation (ndim, ndim) from 4 standard Gaussians: a unit quaternion in 3D, an angle in 2D."""
    if ndim == 2:
        angle = torch.atan2(q[1], q[0])
        c, s = torch.cos(angle), torch.sin(angle)
        return torch.stack([torch.stack([c, -s]), torch.stack([s, c])])
    w, x, y, z = q / q.norm().clamp_min(1e-12)
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)]),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)]),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]),
    ])


def _site(label: Tensor, labels: Sequence[int] | None, u_organ: float,
          u_centre: float) -> tuple[float, list[int], list[int], list[int]] | None:
    """The organ value, centre voxel and bounding box (lo, hi inclusive) of one sample's lesion; None: no organ.

    Args:
        label: the sample's label map (*spatial).
        labels: the organ values allowed, None: every foreground value.
        u_organ, u_centre: U(0, 1) draws picking the organ among those present and the centre among its voxels.
    """
    present = torch.unique(label)
    present = present[present > 0]
    if labels is not None:
        present = present[torch.isin(present, torch.tensor(list(labels), device=label.device, dtype=present.dtype))]
    if present.numel() == 0:
        return None
    value = present[min(int(u_organ * present.numel()), present.numel() - 1)]
    coords = (label == value).nonzero()
    centre = coords[min(int(u_centre * coords.shape[0]), coords.shape[0] - 1)]
    return value.item(), centre.tolist(), coords.min(0).values.tolist(), coords.max(0).values.tolist()


def _blob(lo: list[int], hi: list[int], centre: list[int], radii: Tensor, rotation: Tensor, coarse: Tensor,
          softness: float, irregularity: float) -> Tensor:
    """The lesion's weight in [0, 1] over the box ``lo..hi`` (float32, on ``coarse``'s device).

    Args:
        radii: (ndim,) radii in voxels; rotation: (ndim, ndim), lesion frame to image axes.
        coarse: (1, *[_GRID] * ndim) shape field in [-1, 1].
    """
    device, ndim = coarse.device, len(lo)
    axes = [torch.arange(a, b + 1, device=device, dtype=torch.float32) - c for a, b, c in zip(lo, hi, centre)]
    offsets = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (ndim, *box), voxels from the centre
    frame = torch.einsum("ji,j...->i...", rotation, offsets) / radii.view(-1, *[1] * ndim)  # R^T x / r
    distance = frame.norm(dim=0)
    grid = (frame / _REACH).flip(0).movedim(0, -1)[None]  # grid_sample reads (x, y[, z]) from the last axis
    field = F.grid_sample(coarse[None], grid, mode="bilinear", padding_mode="border", align_corners=True)[0, 0]
    distance = distance / (1 + irregularity * field).clamp_min(0.2)
    t = ((1 + softness - distance) / (2 * softness)).clamp(0, 1)
    return t * t * (3 - 2 * t)


@register_transform("lesion")
def lesion(image: Tensor, label: Tensor, generator: torch.Generator, *, p: float = 0.3,
           labels: Sequence[int] | None = None, size: tuple[float, float] = (0.1, 0.35),
           offset: tuple[float, float] = (0.5, 2.0), p_hypo: float = 0.8, softness: float = 0.1,
           irregularity: float = 0.3, noise: float = 0.1,
           lesion_label: int | None = None) -> tuple[Tensor, Tensor]:
    """Paste one synthetic lesion into one organ of each sample with probability ``p`` (see the module docstring).

    Args:
        image: (B, C, *spatial) float, spatial (z, y, x) or (y, x); not changed (a changed copy is returned).
        label: (B, 1, *spatial) label map, 0 background, 1..K organs, -1 outside the image.
        generator: the CPU generator every draw comes from.
        p: probability per sample.
        labels: the organ values that may receive a lesion (None: every foreground value).
        size: range of each radius as a fraction of the organ's extent along that axis.
        offset: range of the lesion's intensity change, in normalised intensity units.
        p_hypo: probability that the lesion is darker than the organ (else brighter).
        softness: half-width of the soft edge, in normalised radius, in (0, 1).
        irregularity: amplitude of the shape's random perturbation of the normalised radius (0: an ellipsoid).
        noise: standard deviation of the Gaussian texture added inside the lesion, in normalised intensity units.
        lesion_label: None keeps the labels; an int is written where the lesion's weight is at least 0.5.

    Returns:
        (image, label) with image's and label's dtype and device; label is the input itself when unchanged.
    """
    if not 0 < softness < 1:
        raise ValueError(f"lesion: softness must lie in (0, 1), got {softness}")
    batch, ndim = image.shape[0], image.ndim - 2
    draws = torch.rand((batch, 8), generator=generator, dtype=torch.float64)  # fixed counts, whatever is drawn
    quaternions = torch.randn((batch, 4), generator=generator, dtype=torch.float64)
    device_gen = device_generator(generator, image.device)
    coarse = 2 * torch.rand((batch, 1, *[_GRID] * ndim), generator=device_gen, device=image.device) - 1
    image = image.clone()
    new_label = label if lesion_label is None else label.clone()
    for i in range(batch):
        site = _site(label[i, 0], labels, float(draws[i, 1]), float(draws[i, 2])) if draws[i, 0] < p else None
        if site is None:
            continue
        value, centre, lo, hi = site
        box = tuple(slice(a, b + 1) for a, b in zip(lo, hi))
        extent = torch.tensor(hi, dtype=torch.float64) - torch.tensor(lo, dtype=torch.float64) + 1
        radii = ((size[0] + (size[1] - size[0]) * draws[i, 3:3 + ndim]) * extent).clamp_min(1.0)
        rotation = _rotation(quaternions[i], ndim)
        weight = _blob(lo, hi, centre, radii.to(image.device, torch.float32),
                       rotation.to(image.device, torch.float32), coarse[i], softness, irregularity)
        weight = weight * (label[(i, 0, *box)] == value)
        magnitude = offset[0] + (offset[1] - offset[0]) * float(draws[i, 6])
        change = weight * (-magnitude if draws[i, 7] < p_hypo else magnitude)
        if noise > 0:
            texture = torch.randn(weight.shape, generator=device_gen, device=image.device, dtype=torch.float32)
            change = change + weight * noise * texture
        image[(i, slice(None), *box)] += change.to(image.dtype)
        if lesion_label is not None:
            new_label[(i, 0, *box)].masked_fill_(weight >= 0.5, lesion_label)
    return image, new_label
