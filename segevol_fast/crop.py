"""The preprocessed crop as something to read from, stored or normalised on read.

The official preprocessing turns the scan into one float32 crop (D', H', W') in [0, 1]. For a
512×512×300 CT that is 315 MB next to a 157 MB int16 source, which alone breaks a 2 GB budget
once the 0.7 GB of weights are in. Inference never needs the whole crop at once: the zoom-out
pass reads a nearest-neighbour subsample of it and each zoom-in window a 32×256×256 block. So the
crop is a reader with two forms:

* `StoredCrop`: a float32 tensor that exists already (`preprocess_ref`, tests, callers).
* `NormalizedCrop`: the source voxels (any real dtype, a strided view in model axes) plus the
  clip-and-scale of the preprocessing, applied to each block as it is read. The arithmetic per
  voxel is the same as when the whole crop is normalised at once (copy to float32, clamp, subtract,
  multiply), so every value read is bit-identical to the stored crop's.

Both give `shape`, `block(lo, hi)` (a box of the crop, float32) and `take(indices)` (the crop at
per-axis index lists: what a separable nearest resize reads).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .errors import ShapeError

Triple = tuple[int, int, int]
_SLAB_ELEMENTS = 1 << 18  # float32 elements per slab of `NormalizedCrop.full`: 1 MB, stays in L2


def _check_box(shape: Sequence[int], lo: Sequence[int], hi: Sequence[int]) -> None:
    if len(lo) != 3 or len(hi) != 3 or any(not 0 <= a <= b <= n for a, b, n in zip(lo, hi, shape)):
        raise ShapeError(f"block [{tuple(lo)}, {tuple(hi)}) is not inside the crop {tuple(shape)}")


class CropReader:
    """The preprocessed crop (D', H', W'), float32 in [0, 1], read by boxes or index lists."""

    shape: Triple
    device: torch.device

    def block(self, lo: Sequence[int], hi: Sequence[int]) -> Tensor:
        """Voxels [lo, hi) (end exclusive, per axis), float32 (hi - lo). May be a view: do not write to it."""
        raise NotImplementedError

    def take(self, indices: Sequence[Tensor]) -> Tensor:
        """crop[i][:, j][:, :, k] for three int64 index vectors: float32 (len(i), len(j), len(k))."""
        raise NotImplementedError

    def full(self) -> Tensor:
        """The whole crop, float32 (D', H', W') (a new tensor for a normalising reader)."""
        return self.block((0, 0, 0), self.shape)


class StoredCrop(CropReader):
    """A crop that exists as a float32 tensor (D', H', W')."""

    def __init__(self, image: Tensor):
        if image.dim() != 3:
            raise ShapeError(f"a stored crop is (D', H', W'), got shape {tuple(image.shape)}")
        self.image = image.detach().float()
        self.shape = tuple(int(s) for s in image.shape)
        self.device = image.device

    def block(self, lo, hi):
        _check_box(self.shape, lo, hi)
        return self.image[tuple(slice(a, b) for a, b in zip(lo, hi))]

    def take(self, indices):
        i, j, k = (t.to(self.device) for t in indices)
        return self.image.index_select(0, i).index_select(1, j).index_select(2, k)


class NormalizedCrop(CropReader):
    """(clamp(source, lo, hi) - lo) * scale, computed per read.

    source: (D', H', W') view of the scan's voxels in model axes (any real dtype, any strides); it
    is kept, so the scan stays in memory while the reader lives (it does anyway: results go back
    onto its grid).
    """

    def __init__(self, source: Tensor, lo: float, hi: float, scale: float):
        if source.dim() != 3 or source.is_complex() or source.dtype == torch.bool:
            raise ShapeError(f"source must be a real (D', H', W') tensor, got {source.dtype} {tuple(source.shape)}")
        self.source, self.lo, self.hi, self.scale = source, float(lo), float(hi), float(scale)
        self.shape = tuple(int(s) for s in source.shape)
        self.device = source.device

    def normalize_into(self, out: Tensor, src: Tensor) -> Tensor:
        """out (float32) = the normalised src, in place; the order of operations is the contract."""
        out.copy_(src)
        return out.clamp_(self.lo, self.hi).sub_(self.lo).mul_(self.scale)

    def _normalized(self, src: Tensor) -> Tensor:
        return self.normalize_into(torch.empty(src.shape, dtype=torch.float32, device=self.device), src)

    def block(self, lo, hi):
        _check_box(self.shape, lo, hi)
        return self._normalized(self.source[tuple(slice(a, b) for a, b in zip(lo, hi))])

    def full(self) -> Tensor:
        """The whole crop, in H-slabs of a few MB: each is transposed (the source is a permuted
        view) and scaled while it sits in cache."""
        D, H, W = self.shape
        out = torch.empty(self.shape, dtype=torch.float32, device=self.device)
        step = max(1, _SLAB_ELEMENTS // max(1, D * W))
        for h in range(0, H, step):
            self.normalize_into(out[:, h : h + step], self.source[:, h : h + step])
        return out

    def take(self, indices):
        i, j, k = (t.to(self.device) for t in indices)
        return self._normalized(self.source.index_select(0, i).index_select(1, j).index_select(2, k))
