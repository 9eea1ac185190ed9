"""Batched spatial augmentation: rotation, scaling, elastic deformation, mirroring and the centre crop.

One sampling grid (an ``affine_grid`` equivalent) and one ``F.grid_sample`` per batch with a per-sample matrix;
samples that draw no rotation/scaling/deformation are centre-cropped by slicing (exact and cheap), as
batchgeneratorsv2 does. The image is sampled (bi/tri)linearly, the label with NEAREST, so a label never takes a value
it did not have (``-1`` "outside" voxels included). Mirroring is folded in: a sign of the matrix for resampled samples,
a flip of the crop for the others, so it costs no extra pass over the batch.

Conventions (all in voxel units of the (z, y, x) or (y, x) array axes):

* a per-sample matrix ``M`` maps an offset from the output patch's centre to an offset from the centre of the
  input's centre crop: ``input = centre + M @ (output_offset + elastic_displacement)``;
* ``M = R @ S``: ``S = s * I`` with the scale ``s`` in nnU-Net's meaning (``> 1`` samples a larger region, so
  objects get *smaller*); ``R`` is a rotation. A positive angle turns the content from the first axis of its plane
  towards the second, like ``torch.rot90``: angle 0 turns in the (y, x) plane (about z), angle 1 in (z, x) (about y),
  angle 2 in (z, y) (about x); in 2D the single angle turns in (y, x).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from decathlete.augment.intensity import gaussian_smooth, uniform

ELASTIC_STEP = 4  # voxels between the control points of the coarse elastic displacement field
_PLANES_3D = ((1, 2), (0, 2), (0, 1))  # plane turned by angle 0, 1, 2 (about z, y, x)


@dataclass(frozen=True)
class SpatialDraw:
    """Random spatial parameters of one batch (all on the CPU).

    Attributes:
        matrices: (B, D, D) float64, output offset -> input offset in voxels, (z, y, x) order; D = 2 in dummy-2D mode.
        transformed: (B,) bool, samples that need resampling (the others are centre-cropped, and maybe flipped).
        flips: (B, n_spatial) bool, spatial axes to mirror per sample (all axes of the patch, z included).
        elastic: (B, D, *coarse) coarse displacement field in output voxels, components in (z, y, x) order, upsampled
            linearly to the patch on the image's device when applied; ``None`` when no sample is deformed.
    """

    matrices: Tensor
    transformed: Tensor
    flips: Tensor
    elastic: Tensor | None = None


def _plane_rotations(angles: np.ndarray | Tensor, planes: Sequence[tuple[int, int]], dims: int):
    """Rotation matrices (..., D, D) for per-plane angles (..., n_planes) in radians, composed R0 @ R1 @ R2."""
    lib = torch if isinstance(angles, Tensor) else np
    eye = lib.eye(dims, dtype=angles.dtype)
    out = lib.broadcast_to(eye, (*angles.shape[:-1], dims, dims)) * 1.0
    for k, (a, b) in enumerate(planes):
        rot = lib.broadcast_to(eye, (*angles.shape[:-1], dims, dims)) * 1.0
        cos, sin = lib.cos(angles[..., k]), lib.sin(angles[..., k])
        # Sampling-grid rotation by +angle turns the content by +angle from axis a towards b (torch.rot90's sense).
        rot[..., a, a], rot[..., a, b], rot[..., b, a], rot[..., b, b] = cos, sin, -sin, cos
        out = out @ rot
    return out


def rotation_matrices(angles: Tensor, dims: int) -> Tensor:
    """(B, D, D) rotations from angles in radians: (B, 3) about (z, y, x) for 3D, (B, 1) in the (y, x) plane for 2D."""
    return _plane_rotations(angles, _PLANES_3D if dims == 3 else ((0, 1),), dims)


def _angle_range(rotation_deg: float | Sequence[float]) -> tuple[float, float]:
    if isinstance(rotation_deg, (int, float)):
        return -abs(float(rotation_deg)), abs(float(rotation_deg))
    return float(rotation_deg[0]), float(rotation_deg[1])


def required_input_size(
    patch_size: Sequence[int],
    rotation_deg: float | Sequence[float],
    scale_range: Sequence[float],
    *,
    rotation_axes: Sequence[int] | None = None,
    dummy_2d: bool = False,
    elastic_magnitude: float = 0.0,
) -> tuple[int, ...]:
    """Input crop containing every rotated/scaled/deformed ``patch_size`` grid (nnU-Net's ``get_patch_size``).

    The bounding box of the transformed patch is maximised over a grid of angles (31 per axis plus the multiples of
    45 degrees, where the box is widest). This covers every draw, which is costly for large patches: 128^3 with
    +-30 degrees on three axes and scale up to 1.4 needs 302^3, where nnU-Net's heuristic crop is 205^3 and lets the
    rare extreme draws sample zero padding (label ``-1``). Pass a narrower ``scale_range`` (nnU-Net uses
    (0.85, 1.25) here) to make the same trade.

    Args:
        patch_size: final patch, (z, y, x) or (y, x).
        rotation_deg: (lo, hi) in degrees, or a number v meaning (-v, v); the same range for every rotation axis.
        scale_range: (lo, hi) scale in nnU-Net's meaning (``> 1`` samples a larger region).
        rotation_axes: 3D only, axes rotated about (0 = z, 1 = y, 2 = x); ``None`` = all.
        dummy_2d: 3D patch transformed only in (y, x); z keeps ``patch_size[0]``.
        elastic_magnitude: largest elastic displacement as a fraction of the half patch (see ``elastic_field``).

    Returns:
        Input size per axis, never smaller than ``patch_size``, and of the same parity so the centre is a voxel.
    """
    patch = np.asarray(patch_size, dtype=np.float64)
    plane = patch[-2:] if (dummy_2d and len(patch) == 3) else patch
    dims = len(plane)
    lo, hi = np.radians(_angle_range(rotation_deg))
    cand = np.unique(np.concatenate([np.linspace(lo, hi, 31), np.arange(-8, 9) * np.pi / 4]))
    cand = cand[(cand >= lo - 1e-12) & (cand <= hi + 1e-12)]
    if dims == 2:
        angles = cand[:, None]
    else:
        axes = range(3) if rotation_axes is None else rotation_axes
        angles = np.array(list(itertools.product(*[cand if k in axes else [0.0] for k in range(3)])))
    mats = _plane_rotations(angles, _PLANES_3D if dims == 3 else ((0, 1),), dims)
    half = (plane - 1) / 2 * (1 + elastic_magnitude)
    extent = (np.abs(mats) @ half).max(0) * max(float(max(scale_range)), 1.0)
    size = np.maximum(np.ceil(2 * extent - 1e-6).astype(int) + 1, plane.astype(int))
    size += (size - plane.astype(int)) % 2
    if dims < len(patch):
        return (int(patch[0]), *map(int, size))
    return tuple(map(int, size))


def _coarse_shape(patch_size: Sequence[int]) -> list[int]:
    return [max(2, math.ceil(p / ELASTIC_STEP)) for p in patch_size]


def elastic_field(
    generator: torch.Generator,
    n: int,
    patch_size: Sequence[int],
    scale_range: tuple[float, float],
    magnitude_range: tuple[float, float],
    spacing: Sequence[float] | None = None,
) -> Tensor:
    """Coarse smooth random displacement fields (n, D, *coarse) in voxels, component order (z, y, x).

    Gaussian noise on a coarse grid (one control point every ``ELASTIC_STEP`` voxels, ``coarse = ceil(P / STEP)``) is
    smoothed with a per-axis sigma of ``scale * L`` voxels and normalised so its largest displacement is
    ``magnitude * L / 2`` voxels per component, where ``L`` is the patch size (nnU-Net's meaning of both ranges) or,
    with ``spacing``, the patch's shortest physical extent in voxels of each axis (``min(P * spacing) / spacing``):
    the same field in millimetres along every axis, and never larger than the patch-relative one, so the sampling
    margin of `required_input_size` still holds. Upsampled linearly to the patch (align_corners) it stays within
    that bound. nnU-Net smooths a full-resolution field with an FFT per sample; the coarse field is far cheaper and
    smooth by construction.
    """
    dims = len(patch_size)
    patch = torch.tensor(patch_size, dtype=torch.float32)
    if spacing is not None:
        mm = torch.tensor([float(v) for v in spacing][-dims:], dtype=torch.float32)
        patch = (patch * mm).min() / mm
    coarse = _coarse_shape(patch_size)
    noise = torch.randn((n * dims, *coarse), generator=generator)
    sigma = uniform(generator, (n, dims), *scale_range) * patch / ELASTIC_STEP
    magnitude = uniform(generator, (n, dims), *magnitude_range) * patch / 2
    field = gaussian_smooth(noise, sigma.repeat_interleave(dims, 0), pad_mode="replicate").view(n, dims, *coarse)
    peak = field.flatten(2).abs().amax(2).clamp_min(1e-8)
    return field * (magnitude / peak).view(n, dims, *([1] * dims))


def draw_spatial(
    generator: torch.Generator,
    batch: int,
    patch_size: Sequence[int],
    *,
    p_rotation: float,
    rotation_deg: tuple[float, float],
    rotation_axes: Sequence[int] | None,
    p_scaling: float,
    scale_range: tuple[float, float],
    p_elastic: float = 0.0,
    elastic_scale: tuple[float, float] = (0.0, 0.2),
    elastic_magnitude: tuple[float, float] = (0.0, 0.2),
    elastic_spacing: Sequence[float] | None = None,
    p_mirror: float = 0.0,
    mirror_axes: Sequence[int] | None = None,
    dummy_2d: bool = False,
) -> SpatialDraw:
    """Draw per-sample spatial parameters (nnU-Net: one rotation decision for all axes, one isotropic scale).

    In the dummy-2D mode (3D patch) only the (y, x) plane is rotated, scaled and deformed; mirroring still uses all
    ``mirror_axes`` (spatial indices, 0 = z in 3D; ``None`` = all), each flipped with ``p_mirror`` per sample.
    """
    dims = 2 if (dummy_2d or len(patch_size) == 2) else 3
    do_rot = torch.rand(batch, generator=generator) < p_rotation
    do_scale = torch.rand(batch, generator=generator) < p_scaling
    do_elastic = torch.rand(batch, generator=generator) < p_elastic
    lo, hi = (math.radians(a) for a in _angle_range(rotation_deg))
    angles = uniform(generator, (batch, 3 if dims == 3 else 1), lo, hi, dtype=torch.float64)
    if dims == 3 and rotation_axes is not None:
        angles[:, [k for k in range(3) if k not in rotation_axes]] = 0.0
    angles[~do_rot] = 0.0
    scales = torch.where(do_scale, uniform(generator, (batch,), *scale_range, dtype=torch.float64), 1.0)
    flips = torch.rand(batch, len(patch_size), generator=generator) < p_mirror
    if mirror_axes is not None:
        flips[:, [k for k in range(len(patch_size)) if k not in mirror_axes]] = False
    elastic = None
    if bool(do_elastic.any()):
        plane = tuple(patch_size[-dims:])
        elastic = torch.zeros((batch, dims, *_coarse_shape(plane)))
        elastic[do_elastic] = elastic_field(generator, int(do_elastic.sum()), plane, elastic_scale, elastic_magnitude,
                                            elastic_spacing)
    matrices = rotation_matrices(angles, dims) * scales[:, None, None]
    return SpatialDraw(matrices, do_rot | do_scale | do_elastic, flips, elastic)


def center_crop(x: Tensor, patch_size: Sequence[int]) -> Tensor:
    """Centre crop (offset ``(N - P) // 2`` per axis) of the trailing spatial axes; a view."""
    spatial = x.shape[-len(patch_size) :]
    if any(n < p for n, p in zip(spatial, patch_size)):
        raise ValueError(f"input spatial shape {tuple(spatial)} is smaller than the patch {tuple(patch_size)}")
    index = [slice((n - p) // 2, (n - p) // 2 + p) for n, p in zip(spatial, patch_size)]
    return x[(..., *index)]


def _theta(matrices: Tensor, in_size: Sequence[int], patch_size: Sequence[int]) -> Tensor:
    """Voxel matrices (n, D, D) (z, y, x) -> ``affine_grid`` thetas (n, D, D + 1) in normalised (x, y, z) coordinates.

    With ``align_corners=True`` a normalised coordinate u is voxel ``(u + 1) * (N - 1) / 2``; the transform is centred
    on the centre of the ``(N - P) // 2`` crop so that the identity reproduces :func:`center_crop`.
    """
    n_in = torch.tensor(in_size, dtype=torch.float64)
    n_out = torch.tensor(patch_size, dtype=torch.float64)
    h_in, h_out = (n_in - 1).clamp_min(1) / 2, (n_out - 1).clamp_min(1) / 2
    centre = torch.div(n_in - n_out, 2, rounding_mode="floor") + (n_out - 1) / 2
    a = matrices * h_out[None, None, :] / h_in[None, :, None]
    t = (centre / h_in - 1).expand(matrices.shape[0], -1)
    return torch.cat([a.flip(1, 2), t.flip(1)[..., None]], dim=2)


def _affine_grid(theta: Tensor, patch_size: Sequence[int], offsets: Tensor | None) -> Tensor:
    """``F.affine_grid(theta, (n, 1, *patch_size), align_corners=True)`` plus elastic offsets, by broadcasting.

    Builds each grid component as a sum of per-axis ramps: about 3x faster than ``F.affine_grid`` on the CPU, and the
    elastic offsets join before the affine part (deform, then rotate/scale, as nnU-Net).

    Args:
        theta: (n, D, D + 1) normalised, (x, y, z) order, on the target device (float32).
        patch_size: output size, (z, y, x) order.
        offsets: (n, D, *patch_size) elastic offsets in normalised output units, components (x, y, z), or ``None``.

    Returns:
        Grid (n, *patch_size, D), last axis (x, y, z).
    """
    n, dims = theta.shape[:2]
    ramps = []
    for j in range(dims):  # grid component j is spatial axis dims - 1 - j
        size = patch_size[dims - 1 - j]
        shape = [1] * (dims + 1)
        shape[dims - j] = size
        ramp = torch.linspace(-1, 1, size, device=theta.device) if size > 1 else torch.zeros(1, device=theta.device)
        ramps.append(ramp.view(shape) if offsets is None else ramp.view(shape) + offsets[:, j])
    comps = []
    for i in range(dims):
        th = theta[:, i].reshape(n, *([1] * dims), dims + 1)
        comp = th[..., dims] + th[..., 0] * ramps[0]
        for j in range(1, dims):
            comp = comp + th[..., j] * ramps[j]
        comps.append(comp.expand(n, *patch_size))
    return torch.stack(comps, dim=-1)


def _flip_groups(flips: Tensor, ids: Tensor):
    """Yield (sample ids, flipped spatial axes) for each distinct flip pattern among samples ``ids`` (<= 2^D groups)."""
    if ids.numel() == 0:
        return
    patterns = torch.unique(flips[ids], dim=0)
    for pattern in patterns:
        yield ids[(flips[ids] == pattern).all(1)], [k for k in range(flips.shape[1]) if pattern[k]]


def _resample(
    image: Tensor, label: Tensor, patch_size: Sequence[int], draw: SpatialDraw, label_pad_value: int
) -> tuple[Tensor, Tensor]:
    """Apply ``draw`` to (B, C, *spatial) tensors whose spatial dims all take part (no dummy-2D folding here)."""
    dims = len(patch_size)
    device = image.device
    # New tensors: the pipeline modifies its outputs in place and must never touch the caller's tensors.
    out_img = image.new_empty((image.shape[0], image.shape[1], *patch_size))
    out_lab = label.new_empty((label.shape[0], label.shape[1], *patch_size))
    crop_img, crop_lab = center_crop(image, patch_size), center_crop(label, patch_size)
    for ids, axes in _flip_groups(draw.flips, (~draw.transformed).nonzero().squeeze(1)):
        dev_ids, flip_dims = ids.to(device), [2 + k for k in axes]
        out_img[dev_ids] = crop_img[dev_ids].flip(flip_dims) if axes else crop_img[dev_ids]
        out_lab[dev_ids] = crop_lab[dev_ids].flip(flip_dims) if axes else crop_lab[dev_ids]
    ids = draw.transformed.nonzero().squeeze(1)
    if ids.numel() == 0:
        return out_img, out_lab
    dev_ids = ids.to(device)
    # Mirroring an output axis negates the output offset: a column sign of the matrix, free inside the resampling.
    signs = 1.0 - 2.0 * draw.flips[ids].double()
    theta = _theta(draw.matrices[ids] * signs[:, None, :], image.shape[2:], patch_size).float().to(device)
    offsets = None
    if draw.elastic is not None:
        h_out = (torch.tensor(patch_size, dtype=torch.float32) - 1).clamp_min(1) / 2
        coarse = (draw.elastic[ids] / h_out.view(1, dims, *[1] * dims)).flip(1).to(device)  # normalised, (x, y, z)
        mode = "bilinear" if dims == 2 else "trilinear"
        offsets = F.interpolate(coarse, size=tuple(patch_size), mode=mode, align_corners=True)
    grid = _affine_grid(theta, patch_size, offsets)
    sampled = F.grid_sample(image[dev_ids].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    out_img[dev_ids] = sampled.to(image.dtype)
    # Labels: shift by the pad value so zero padding yields it; nearest keeps values exact (integers < 2**24).
    pad = label_pad_value if label.dtype.is_signed else max(label_pad_value, 0)
    lab = F.grid_sample(label[dev_ids].float() - pad, grid, mode="nearest", padding_mode="zeros", align_corners=True)
    out_lab[dev_ids] = (lab + pad).to(label.dtype)
    return out_img, out_lab


def apply_spatial(
    image: Tensor, label: Tensor, patch_size: Sequence[int], draw: SpatialDraw, *, label_pad_value: int = -1
) -> tuple[Tensor, Tensor]:
    """Resample (rotate, scale, deform, mirror) a batch to ``patch_size`` from the centre of a larger input.

    Args:
        image: (B, C, z, y, x) or (B, C, y, x) float.
        label: (B, L, *spatial) integer (any signed/unsigned int or bool), same spatial shape as ``image``.
        patch_size: output spatial size, same axis order.
        draw: from :func:`draw_spatial`. A 2D draw on a 3D patch means the dummy-2D mode: z is centre-cropped and
            every z slice gets the same in-plane transform (z is never mixed).
        label_pad_value: label of voxels sampled from outside the input (``-1`` = "outside", like the sampler's
            padding; 0 for unsigned labels). The image is padded with 0.

    Returns:
        New tensors (B, C, *patch_size) and (B, L, *patch_size); the inputs are never modified.
    """
    if draw.matrices.shape[-1] == len(patch_size):
        return _resample(image, label, patch_size, draw, label_pad_value)
    # Dummy 2D (nnU-Net's Convert3DTo2D): fold z into the batch and run the 2D transform on every slice.
    image = center_crop(image, (patch_size[0], *image.shape[-2:]))
    label = center_crop(label, (patch_size[0], *label.shape[-2:]))
    batch, depth = image.shape[0], patch_size[0]

    def fold(x: Tensor) -> Tensor:
        return x.movedim(2, 1).reshape(batch * depth, x.shape[1], *x.shape[-2:])

    def unfold(x: Tensor) -> Tensor:
        return x.reshape(batch, depth, x.shape[1], *x.shape[-2:]).movedim(1, 2).contiguous()

    def per_slice(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.repeat_interleave(depth, 0)

    rep = SpatialDraw(*(per_slice(t) for t in (draw.matrices, draw.transformed, draw.flips[:, 1:], draw.elastic)))
    out_img, out_lab = (unfold(t) for t in _resample(fold(image), fold(label), patch_size[1:], rep, label_pad_value))
    z_ids = draw.flips[:, 0].nonzero().squeeze(1).to(image.device)
    if z_ids.numel():
        out_img[z_ids], out_lab[z_ids] = out_img[z_ids].flip(2), out_lab[z_ids].flip(2)
    return out_img, out_lab
