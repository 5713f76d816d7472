"""The zoom-out frame mapped onto the crop: the official 'nearest' resize of the coarse logits,
and the zoom-in ROI taken from the coarse foreground (official `logits2roi_coor`)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..preprocess import index_map
from .sliding_window import Triple


class CropMap:
    """Legacy 'nearest' maps from the zoom-out size to the crop (the official logits resize).

    maps[a]: (crop[a],) int64, the zoom-out index each crop voxel reads along axis a.
    """

    def __init__(self, size: Sequence[int], crop_shape: Sequence[int], device: torch.device):
        self.maps = [index_map(int(s), int(c), "nearest").to(device) for s, c in zip(size, crop_shape)]
        self.used = [torch.unique(m) for m in self.maps]  # zoom-out indices that reach the crop

    def gather(self, x: Tensor, lo: Sequence[int] = (0, 0, 0), hi: Optional[Sequence[int]] = None) -> Tensor:
        """x (Z, Y, X) at zoom-out size -> its crop-frame resize, rows lo..hi inclusive (default all)."""
        hi = hi if hi is not None else [len(m) - 1 for m in self.maps]
        idx = [m[a : b + 1] for m, a, b in zip(self.maps, lo, hi)]
        return x.index_select(0, idx[0]).index_select(1, idx[1]).index_select(2, idx[2])

    def roi(self, fg: Tensor, window: Sequence[int]) -> Optional[tuple[Triple, Triple]]:
        """Zoom-out foreground (Z, Y, X) bool -> the grown crop-frame ROI, or None when empty.

        Projects only the zoom-out rows that reach the crop (a shrinking resize skips some), then
        maps each projection to the crop: the same box as taking it from the resized mask.
        """
        sub = fg.index_select(0, self.used[0]).index_select(1, self.used[1]).index_select(2, self.used[2])
        if not bool(sub.any()):
            return None
        lo, hi = [], []
        for axis in range(3):
            proj = torch.zeros(fg.shape[axis], dtype=torch.bool, device=fg.device)
            proj[self.used[axis]] = sub.any(dim=tuple(a for a in range(3) if a != axis))
            idx = torch.nonzero(proj[self.maps[axis]]).flatten()
            a, b = _grow(int(idx[0]), int(idx[-1]), len(self.maps[axis]), int(window[axis]))
            lo.append(a)
            hi.append(b)
        return tuple(lo), tuple(hi)


def _grow(lo: int, hi: int, size: int, win: int) -> tuple[int, int]:
    """Official ROI growth of one axis: floor(pad / 2) a side toward the window, clamped."""
    grow = max(0, win - (hi - lo + 1)) // 2
    return max(0, lo - grow), min(size - 1, hi + grow)
