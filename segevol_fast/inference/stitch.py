"""One prompt's zoom-in, stitched from window logits into its crop-frame outputs.

Logits are averaged over the windows covering a voxel, stitched one D-row of the ROI at a time: a
row's sum (plan dtype) exists only while some window of the prompt still has to add to it. Each
row counts the prompt's windows that cover it; when the last has been added the row is finished
(mask = sum > 0, the mean's sign; logits = sum / coverage, the coverage being a product of
per-axis window counts) and written into the crop-frame outputs, which start as the coarse
result. Windows are walked in grid order (D slowest, either direction), so at most one window
depth of rows is alive: 32 × H' × W' sums however deep the scan, not the whole ROI.

With `partial=True` the windows need not cover the whole ROI (fast mode skipped some that held no
coarse foreground): each row then also counts, per voxel, the windows added to it, the mean is over
those, and a voxel no window reached keeps the coarse result.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..geometry.grid_windows import axis_coverage
from ..geometry.sliding_window import Triple


class Stitch:
    """One prompt's zoom-in, stitched D-row by D-row into its crop-frame outputs (module docstring).

    mask, logits: the prompt's outputs (crop frame, CPU) holding the coarse result; the ROI's
    rows are overwritten as they finish. origins: the prompt's windows (crop-frame starts).
    """

    def __init__(
        self,
        roi: tuple[Triple, Triple],
        origins: Sequence[Triple],
        size: Sequence[int],
        grid,
        mask: Tensor,
        logits: Optional[Tensor],
        dtype: torch.dtype,
        device: torch.device,
        partial: bool = False,
    ):
        self.lo, self.hi = roi
        self.partial = partial
        self.size, self.mask, self.logits, self.dtype, self.device = tuple(size), mask, logits, dtype, device
        self.row_shape = (self.hi[1] - self.lo[1] + 1, self.hi[2] - self.lo[2] + 1)
        self.pending = [0] * (self.hi[0] - self.lo[0] + 1)  # windows still to add, per ROI row
        for o in origins:
            for d in range(max(self.lo[0], o[0]), min(self.hi[0] + 1, o[0] + self.size[0])):
                self.pending[d - self.lo[0]] += 1
        self.rows: dict[int, Tensor] = {}  # crop row -> running sum (row_shape), plan dtype
        self.counts: dict[int, Tensor] = {}  # crop row -> windows added per voxel (partial only)
        if logits is not None and not partial:
            cover = [axis_coverage(s, r, a, b).to(device) for s, r, a, b in zip(grid, self.size, self.lo, self.hi)]
            self.cover_d, self.cover_hw = cover[0].tolist(), cover[1][:, None] * cover[2][None, :]

    def add(self, logits: Tensor, origin: Triple) -> None:
        """Add one window's logits (*window) where the window meets the ROI; finish full rows."""
        a = [max(lo, o) for lo, o in zip(self.lo, origin)]
        b = [min(h + 1, o + r) for h, o, r in zip(self.hi, origin, self.size)]
        src_hw = tuple(slice(x - o, y - o) for x, y, o in zip(a[1:], b[1:], origin[1:]))
        dst_hw = tuple(slice(x - lo, y - lo) for x, y, lo in zip(a[1:], b[1:], self.lo[1:]))
        for d in range(a[0], b[0]):
            row = self.rows.get(d)
            if row is None:
                row = self.rows[d] = torch.zeros(self.row_shape, dtype=self.dtype, device=self.device)
            row[dst_hw] += logits[(d - origin[0],) + src_hw].to(self.device)
            if self.partial:
                count = self.counts.get(d)
                if count is None:
                    count = self.counts[d] = torch.zeros(self.row_shape, dtype=torch.int32, device=self.device)
                count[dst_hw] += 1
            self.pending[d - self.lo[0]] -= 1
            if self.pending[d - self.lo[0]] == 0:
                self._finish_row(d)

    def _finish_row(self, d: int) -> None:
        row = self.rows.pop(d)
        where = (d, slice(self.lo[1], self.hi[1] + 1), slice(self.lo[2], self.hi[2] + 1))
        if self.partial:
            count = self.counts.pop(d)
            reached = (count > 0).cpu()
            self.mask[where] = torch.where(reached, (row > 0).cpu(), self.mask[where])
            if self.logits is not None:
                mean = (row.float() / count.clamp(min=1)).cpu().to(self.logits.dtype)
                self.logits[where] = torch.where(reached, mean, self.logits[where])
            return
        self.mask[where] = (row > 0).cpu()  # the mean has the sum's sign: every ROI voxel has a window
        if self.logits is not None:
            self.logits[where] = (row.float() / (self.cover_d[d - self.lo[0]] * self.cover_hw)).cpu()

    def result(self) -> tuple[Tensor, Optional[Tensor], tuple[Triple, Triple]]:
        """(mask, logits or None, roi) once every window has been added."""
        if self.rows or any(self.pending):
            raise RuntimeError("zoom-in stitching ended with unfinished rows (a window was not decoded)")
        return self.mask, self.logits, (self.lo, self.hi)
