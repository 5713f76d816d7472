"""Geometric and intensity augmentation of one training sample, driven by an explicit generator.

The official SegVol recipe (docs/official-pipeline.md §6 "Train augmentation") is MONAI's
SpatialPad -> OneOf(Resized(area), RandCropByPosNegLabeld(pos 2, neg 1)) -> RandFlipd per axis ->
RandScaleIntensityd / RandShiftIntensityd -> Resized(area). These functions are the torch analogues,
each taking a `torch.Generator` so that a sample depends only on the generator's seed (never on the
global RNG: a resumed run and every DataLoader worker see exactly the same data).

Shapes: image (1, D, H, W) float32; labels (C, D, H, W) bool (one binary mask per category).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InvalidArgumentError, ShapeError

Triple = tuple[int, int, int]
_LABEL_CHUNK = 8  # label channels resized at once: bounds the float32 copy of big masks


def _uniform(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _randint(g: torch.Generator, n: int) -> int:
    return int(torch.randint(n, (), generator=g))


def pad_to(image: Tensor, labels: Tensor, size: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Zero-pad (.., D, H, W) symmetrically up to at least `size` (MONAI SpatialPad, 'symmetric':
    the odd voxel goes after). Axes already as large are left alone."""
    pads = []
    for n, s in zip(reversed(image.shape[-3:]), reversed(tuple(size))):  # F.pad wants W first
        extra = max(int(s) - int(n), 0)
        pads += [extra // 2, extra - extra // 2]
    if not any(pads):
        return image, labels
    return F.pad(image, pads), F.pad(labels, pads)


def resize_image(image: Tensor, size: Sequence[int]) -> Tensor:
    """(1, D, H, W) float32 -> (1, *size) with torch 'area' (MONAI Resized's default mode)."""
    return F.interpolate(image[None], size=tuple(int(s) for s in size), mode="area")[0]


def resize_labels(labels: Tensor, size: Sequence[int]) -> Tensor:
    """(C, D, H, W) bool -> (C, *size) bool: 'area' like the image, then >= 0.5.

    The official loader keeps the fractional area values as targets; the trainer here wants binary
    masks, and >= 0.5 is the mask a voxel mostly belongs to (ties go to the structure, so a thin
    structure shrunk to exactly half a voxel survives). Done a few channels at a time so a big
    volume never needs a float32 copy of all its masks.
    """
    size = tuple(int(s) for s in size)
    out = torch.empty((labels.shape[0],) + size, dtype=torch.bool)
    for c in range(0, labels.shape[0], _LABEL_CHUNK):
        part = labels[c : c + _LABEL_CHUNK].float()[None]
        out[c : c + _LABEL_CHUNK] = F.interpolate(part, size=size, mode="area")[0] >= 0.5
    return out


def _pick_voxel(mask: Tensor, g: torch.Generator):
    """A uniformly random True voxel of a (D, H, W) bool mask as (d, h, w), or None if empty."""
    idx = torch.nonzero(mask.reshape(-1)).flatten()
    if idx.numel() == 0:
        return None
    flat = int(idx[_randint(g, idx.numel())])
    _, h, w = mask.shape
    return flat // (h * w), (flat // w) % h, flat % w


def crop_center(image: Tensor, labels: Tensor, g: torch.Generator, pos_fraction: float = 2 / 3) -> Triple:
    """The centre of a RandCropByPosNegLabel-style crop (pos 2, neg 1 -> pos_fraction 2/3).

    With probability pos_fraction a uniformly random voxel inside any label; otherwise a random
    background voxel whose intensity is > 0 (MONAI's image_threshold=0), or any voxel when there is
    none. A case without foreground falls back to a background centre, as MONAI does.
    """
    fg = labels.any(dim=0)
    centre = None
    if _uniform(g) < pos_fraction:
        centre = _pick_voxel(fg, g)
    if centre is None:
        centre = _pick_voxel(~fg & (image[0] > 0), g)
    if centre is None:
        centre = tuple(_randint(g, n) for n in image.shape[-3:])
    return centre


def crop_at(image: Tensor, labels: Tensor, centre: Sequence[int], size: Sequence[int]) -> tuple[Tensor, Tensor]:
    """A `size` box around `centre`, shifted to stay inside the volume (MONAI correct_crop_centers).
    The volume must be at least `size` along every axis (pad first)."""
    sl = []
    for c, n, s in zip(centre, image.shape[-3:], size):
        if n < s:
            raise ShapeError(f"cannot crop {tuple(size)} from a volume of shape {tuple(image.shape[-3:])}; pad first")
        start = min(max(int(c) - int(s) // 2, 0), int(n) - int(s))
        sl.append(slice(start, start + int(s)))
    return image[(slice(None), *sl)], labels[(slice(None), *sl)]


def random_flips(image: Tensor, labels: Tensor, g: torch.Generator, prob: float = 0.2) -> tuple[Tensor, Tensor]:
    """Flip each spatial axis independently with probability `prob` (RandFlipd on axes 0, 1, 2)."""
    for axis in (1, 2, 3):
        if _uniform(g) < prob:
            image, labels = image.flip(axis), labels.flip(axis)
    return image, labels


def random_intensity(image: Tensor, g: torch.Generator, prob: float = 0.1, amount: float = 0.1) -> Tensor:
    """RandScaleIntensity (x * (1 + f), f ~ U(-amount, amount)) then RandShiftIntensity
    (x + o, o ~ U(-amount, amount)), each with probability `prob`. Like the official recipe the
    result is not clipped, so an augmented image may leave [0, 1] by up to ~amount."""
    if _uniform(g) < prob:
        image = image * (1.0 + _uniform(g, -amount, amount))
    if _uniform(g) < prob:
        image = image + _uniform(g, -amount, amount)
    return image


def rotate_hw(image: Tensor, labels: Tensor, degrees: float) -> tuple[Tensor, Tensor]:
    """Rotate every D slice in its (H, W) plane by `degrees` about the slice centre.

    Image bilinear, labels nearest, zeros outside. The rotation is in voxel units (the aspect of a
    non-square slice is respected). +90 on a square slice equals torch.rot90(x, 1, dims=(-2, -1)).
    """
    if degrees == 0:
        return image, labels
    d, h, w = image.shape[-3:]
    a = math.radians(degrees)
    cos, sin = math.cos(a), -math.sin(a)  # sign: +90 matches torch.rot90(k=1)
    # grid_sample reads output (x, y) = (w, h) normalised to [-1, 1] from the rotated input
    # position; scaling by the half-sizes makes the rotation rigid in voxel units
    theta = torch.tensor(
        [[cos, sin * h / w, 0.0, 0.0], [-sin * w / h, cos, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float32
    )[None]
    grid = F.affine_grid(theta, [1, 1, d, h, w], align_corners=False)
    img = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    lab = F.grid_sample(labels[None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
    return img, lab > 0.5


def random_rotation(image: Tensor, labels: Tensor, g: torch.Generator, max_degrees: float) -> tuple[Tensor, Tensor]:
    """`rotate_hw` by an angle ~ U(-max_degrees, max_degrees); nothing drawn when max_degrees is 0."""
    if max_degrees < 0:
        raise InvalidArgumentError(f"rotation_deg must be >= 0, got {max_degrees}")
    if max_degrees == 0:
        return image, labels
    return rotate_hw(image, labels, _uniform(g, -max_degrees, max_degrees))
