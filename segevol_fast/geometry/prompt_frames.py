"""Official prompt primitives, shared by inference (both modes) and training.

`generate_box` is the official bounding box of a mask; `box_to_zoom_out` / `points_to_zoom_out` map
crop-frame prompts into the zoom-out frame (the crop resized to `spatial_size`) the way the official
pipeline's labels travel: a box through its rasterised cube resized with
'nearest-exact', points to the zoom-out voxel holding their centre.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..preprocess import index_map


def generate_box(mask: Tensor) -> Tensor:
    """Official `generate_box`: (d, h, w) map -> (6,) float32 (d0, h0, w0, d1, h1, w1) of the
    voxels > 0, maxima inclusive; all -1 when there are none."""
    fg = mask > 0
    if not bool(fg.any()):
        return torch.full((6,), -1.0)
    lo, hi = [], []
    for axis in range(fg.dim()):
        others = tuple(a for a in range(fg.dim()) if a != axis)
        idx = torch.nonzero(fg.any(dim=others) if others else fg).flatten()
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]))
    return torch.tensor(lo + hi, dtype=torch.float32)


def _round_half_up(x: np.ndarray) -> np.ndarray:
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5).astype(np.int64)


def box_to_zoom_out(box: np.ndarray, crop_shape: Sequence[int], size: Sequence[int]) -> Tensor:
    """Crop-frame box (6,) -> zoom-out box (6,) float32, through the official label route: the
    rasterised cube resized with 'nearest-exact', then `generate_box`. All -1 if it vanishes."""
    b = np.asarray(box, dtype=np.float64).reshape(6)
    lo = np.clip(_round_half_up(b[:3]), 0, np.asarray(crop_shape) - 1)
    hi = np.clip(_round_half_up(b[3:]), 0, np.asarray(crop_shape) - 1)
    out_lo, out_hi = [], []
    for axis in range(3):
        src = index_map(crop_shape[axis], size[axis], "nearest-exact")
        idx = torch.nonzero((src >= int(lo[axis])) & (src <= int(hi[axis]))).flatten()
        if len(idx) == 0:
            return torch.full((6,), -1.0)
        out_lo.append(int(idx[0]))
        out_hi.append(int(idx[-1]))
    return torch.tensor(out_lo + out_hi, dtype=torch.float32)


def points_to_zoom_out(points: np.ndarray, crop_shape: Sequence[int], size: Sequence[int]) -> Tensor:
    """Crop-frame points (P, 3) -> zoom-out voxel indices (P, 3) int64:
    floor((p + 0.5) * size / crop) in float64, clamped to 0..size-1."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    out = np.floor((p + 0.5) * np.asarray(size, np.float64) / np.asarray(crop_shape, np.float64))
    out = np.clip(out, 0, np.asarray(size) - 1).astype(np.int64)
    return torch.from_numpy(out)
