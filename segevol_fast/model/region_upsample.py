"""A box of the official in-model upsample (`mask_decoder.upsample_logits`) from a box of its input.

`F.interpolate(low, size, mode="trilinear", align_corners=False)` reads, for output index x of an
axis, the inputs i0 = floor(max(0, s·(x + 0.5) - 0.5)) and i1 = min(i0 + 1, n - 1) with s = n / size,
weighted 1 - λ and λ = that source coordinate - i0. So an output box needs only the input box its
indices reach (`low_res_box`), and the box is computed axis by axis with those indices and weights
(`upsample_box`): W, then H, then D, the nesting PyTorch's kernel sums in; an axis whose size
does not change (D officially) is read as it is (weights 1 and 0). Equal to interpolating
everything and cropping, up to the rounding of fused multiply-adds (and a non-finite neighbour
that weight 0 multiplies: NaN there, the value itself here).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..errors import ShapeError

Box = tuple[Sequence[int], Sequence[int]]  # (lo, hi) per axis, hi exclusive


def _source(n_in: int, n_out: int, lo: int, hi: int, device=None) -> tuple[Tensor, Tensor, Tensor]:
    """(i0, i1, λ) of output indices lo..hi-1 along one axis, as PyTorch computes them (float32)."""
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)
    x = torch.arange(lo, hi, dtype=torch.float32)
    src = (scale * (x + 0.5) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    lam = (src - i0).clamp(0, 1)
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    return i0.to(device), i1.to(device), lam.to(device)


def low_res_box(low_shape: Sequence[int], size: Sequence[int], box: Box) -> Box:
    """The box of the low-res grid (low_shape) that the output box (in `size`) reads."""
    if any(not 0 <= a < b <= n for a, b, n in zip(*box, size)):
        raise ShapeError(f"box {box} must be a non-empty box inside {tuple(size)} (hi exclusive)")
    lo, hi = [], []
    for n_in, n_out, a, b in zip(low_shape, size, *box):
        i0, i1, _ = _source(int(n_in), int(n_out), int(a), int(b))
        lo.append(int(i0.min()))
        hi.append(int(i1.max()) + 1)
    return tuple(lo), tuple(hi)


def upsample_box(low: Tensor, low_lo: Sequence[int], low_shape: Sequence[int], size: Sequence[int], box: Box) -> Tensor:
    """Output box `box` of the trilinear upsample low_shape -> size, from (B, C, *low box) holding
    the low-res values from low_lo on (at least `low_res_box`): (B, C, *(hi - lo))."""
    out = low
    for axis in (2, 1, 0):  # W, H, D: PyTorch's nesting (the innermost axis is summed first)
        dim, start = 2 + axis, int(low_lo[axis])
        if int(low_shape[axis]) == int(size[axis]):  # weights 1 and 0: the input itself
            out = out.narrow(dim, int(box[0][axis]) - start, int(box[1][axis]) - int(box[0][axis]))
            continue
        i0, i1, lam = _source(int(low_shape[axis]), int(size[axis]), int(box[0][axis]), int(box[1][axis]), low.device)
        shape = [1] * out.dim()
        shape[dim] = -1
        lam = lam.to(out.dtype).view(shape)
        out = torch.addcmul(out.index_select(dim, i0 - start) * (1 - lam), out.index_select(dim, i1 - start), lam)
    return out
