"""The global-grid windows a zoom-in ROI uses, and how many of them cover each voxel.

The grid is `sliding_window.global_grid`: per axis the window starts in the crop frame. A window is
named by its index on each axis (i_d, i_h, i_w), so prompts whose ROIs overlap name the same
windows and can share their encodings.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .sliding_window import Triple

Window = tuple[int, int, int]  # index of a window in the global grid (i_d, i_h, i_w)


def windows_for_roi(grid: Sequence[Sequence[int]], window: Sequence[int], lo: Triple, hi: Triple) -> list[Window]:
    """Grid windows meeting the inclusive box [lo, hi], in raster order (D slowest)."""
    per_axis = [
        [i for i, s in enumerate(starts) if s <= b and s + r - 1 >= a] for starts, r, a, b in zip(grid, window, lo, hi)
    ]
    return [(i, j, k) for i in per_axis[0] for j in per_axis[1] for k in per_axis[2]]


def window_origin(grid: Sequence[Sequence[int]], w: Window) -> Triple:
    """Crop-frame start corner of grid window w."""
    return tuple(grid[a][w[a]] for a in range(3))


def axis_coverage(starts: Sequence[int], r: int, a: int, b: int) -> Tensor:
    """(b - a + 1,) float32: how many windows of one axis (starts, size r) cover each voxel a..b."""
    x = np.arange(a, b + 1)
    return torch.from_numpy(sum(((x >= s) & (x < s + r)).astype(np.float32) for s in starts))
