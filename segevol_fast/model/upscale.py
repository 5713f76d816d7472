"""The mask decoder's upscaling + mask projection without materialising NCDHW feature maps.

Officially (docs/official-pipeline.md §3): features = GELU(ConvT2(GELU(LN(ConvT1(src))))), (B, C/8, 4gd, 4gh, 4gw),
then logits = Σ_c w[b, c] · features[b, c]. Both ConvTranspose3d have kernel = stride = 2, so each
is a per-voxel matmul (no overlap) followed by a 2×2×2 "pixel shuffle". Doing the matmuls in token
order and shuffling only the final 1-channel logits (instead of C/8 = 96 channels) removes the big
layout copies: on a CPU, 10 prompts decode about 4× faster (the feature map is 50 MB per prompt).
The weights' columns are put in (sub-voxel, channel) order once (`_Layout`, cached while the
parameters are unchanged and no gradient is wanted), so ConvT1's output is already (B, fine voxel,
C/4) and the projection is one batched matrix-vector product: no reshape copies. The full-shape
LayerNorm is layout-independent in its statistics; its elementwise affine is permuted into the same
order. Same arithmetic as the module path up to summation order.

`region`: only a box of the low-res logits is wanted (a zoom-in window's part inside the prompt's
ROI). The LayerNorm's statistics are over the whole sample; everything else runs only over the
tokens covering the box. When those are under half the tokens, the statistics come without
ConvT1's full output (`_moments`): ConvT1 is linear, y = x W + b, so its mean is x̄ W + b̄ and
its sum of squared deviations is Σ_t (x_t - x̄) G (x_t - x̄)ᵀ + S·|x̄ W + b - mean|², with G = W Wᵀ
(C × C, cached): one C × C Gram matrix of the tokens (S·C² multiply-adds) instead of ConvT1's
S·C·2C, and ConvT1 itself only over the box.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .region_upsample import Box


@dataclass(frozen=True)
class _Layout:
    """The upscaling's parameters in token order: w1 (C, 8·C4) with column sub1·C4 + o; b1
    (8·C4,); ln_w, ln_b (S, 8·C4) the LayerNorm affine; w2 (C4, 8·C8) with column sub2·C8 + c;
    b2 (8·C8,); and for the LayerNorm's statistics without ConvT1 (`_moments`), in the LayerNorm's
    dtype: w1_ln, b1_ln (w1, b1) and gram = w1 w1ᵀ (C, C)."""

    w1: Tensor
    b1: Tensor
    ln_w: Tensor
    ln_b: Tensor
    w2: Tensor
    b2: Tensor
    w1_ln: Tensor
    b1_ln: Tensor

    @functools.cached_property
    def gram(self) -> Tensor:
        """w1 w1ᵀ (C, C), summed in float64; made on first use (only `_moments` needs it), so a
        layout rebuilt every call (while training) never pays for it."""
        w = self.w1_ln.detach().double()
        return (w @ w.T).to(self.w1_ln.dtype)


# upscaling module -> (key, layout); the key says which parameter versions the layout was made from
_LAYOUTS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, _Layout]]" = weakref.WeakKeyDictionary()


def _layout(upscaling: nn.Sequential, grid: tuple[int, int, int], dtype: torch.dtype, ln_dtype: torch.dtype) -> _Layout:
    """The token-order parameters; reused across calls while nothing asks for gradients (the
    permuted copies would otherwise cost two 12 MB copies a call at the official size)."""
    params = [p for m in (upscaling[0], upscaling[1], upscaling[3]) for p in (m.weight, m.bias)]
    # (inference tensors, e.g. weights made under inference_mode, keep no version: never cached)
    cacheable = not any(p.is_inference() for p in params)
    cacheable = cacheable and not (torch.is_grad_enabled() and any(p.requires_grad for p in params))
    key = (grid, dtype, ln_dtype, *((p.data_ptr(), p._version, p.device) for p in params)) if cacheable else None
    if cacheable:
        hit = _LAYOUTS.get(upscaling)
        if hit is not None and hit[0] == key:
            return hit[1]
    conv1, norm, _, conv2, _ = upscaling
    C, c4, c8 = conv1.weight.shape[0], conv1.weight.shape[1], conv2.weight.shape[1]
    gd, gh, gw = grid

    def token_order(p: Tensor) -> Tensor:  # (C4, 2gd, 2gh, 2gw) -> (S, 8·C4): (coarse voxel, sub1, o)
        p = p.to(ln_dtype).reshape(c4, gd, 2, gh, 2, gw, 2).permute(1, 3, 5, 2, 4, 6, 0)
        return p.reshape(gd * gh * gw, 8 * c4)

    w1 = conv1.weight.reshape(C, c4, 8).transpose(1, 2).reshape(C, 8 * c4)
    layout = _Layout(
        w1=w1.to(dtype),
        b1=conv1.bias.to(dtype).repeat(8),
        ln_w=token_order(norm.weight),
        ln_b=token_order(norm.bias),
        w2=conv2.weight.to(dtype).reshape(c4, c8, 8).transpose(1, 2).reshape(c4, 8 * c8),
        b2=conv2.bias.to(dtype).repeat(8),
        w1_ln=w1.to(ln_dtype),
        b1_ln=conv1.bias.to(ln_dtype).repeat(8),
    )
    if cacheable:
        _LAYOUTS[upscaling] = (key, layout)
    return layout


def upscale_project(
    src: Tensor,
    weights: Tensor,
    upscaling: nn.Sequential,
    grid: tuple[int, int, int],
    region: Optional[Box] = None,
) -> Tensor:
    """Image tokens and per-prompt mask weights -> low-res logits.

    Args:
        src: (B, S, C) image tokens after the two-way transformer, raster order over `grid`.
        weights: (B, C/8) hypernetwork output (+ the text map's txt_align(text)).
        upscaling: the decoder's `output_upscaling` (ConvT3d, LayerNorm(full shape), GELU,
            ConvT3d, GELU); only its parameters are used.
        grid: (gd, gh, gw).
        region: None, or (lo, hi) a box of the low-res grid (4gd, 4gh, 4gw), hi exclusive: only
            those logits are computed (module docstring).

    Returns:
        (B, 1, 4gd, 4gh, 4gw) logits, or (B, 1, *(hi - lo)) for a region.
    """
    B, S, C = src.shape
    gd, gh, gw = grid
    # LayerNorm in at least float32 (statistics over all S*C4*8 values of a sample).
    ln_dtype = torch.promote_types(src.dtype, torch.float32)
    lay = _layout(upscaling, grid, src.dtype, ln_dtype)
    c4, c8 = lay.w2.shape[0], lay.w2.shape[1] // 8
    eps = upscaling[1].eps
    if region is None:
        tokens = (gd, gh, gw)
        # ConvT1: (B, S, C) @ (C, 8·C4) -> (B, S, 8·C4), column sub1·C4 + o.
        y = torch.addmm(lay.b1, src.reshape(B * S, C), lay.w1).view(B, S, 8 * c4)
        with torch.autocast(device_type=src.device.type, enabled=False):
            y = F.layer_norm(y.to(ln_dtype), (S, 8 * c4), lay.ln_w, lay.ln_b, eps)
    else:
        # the statistics over every token, the affine and everything after only over the box's
        t_lo = [int(a) // 4 for a in region[0]]
        t_hi = [(int(b) - 1) // 4 + 1 for b in region[1]]
        tokens = tuple(b - a for a, b in zip(t_lo, t_hi))
        box = (slice(t_lo[0], t_hi[0]), slice(t_lo[1], t_hi[1]), slice(t_lo[2], t_hi[2]))
        src_box = src.view(B, gd, gh, gw, C)[(slice(None),) + box].reshape(B, -1, C)
        if 2 * src_box.shape[1] < S:  # statistics from the Gram matrix, ConvT1 over the box only
            y_box = torch.matmul(src_box, lay.w1) + lay.b1
            with torch.autocast(device_type=src.device.type, enabled=False):
                var, mean = _moments(src.to(ln_dtype), lay)
        else:
            y = torch.addmm(lay.b1, src.reshape(B * S, C), lay.w1).view(B, S, 8 * c4)
            y_box = y.view(B, gd, gh, gw, 8 * c4)[(slice(None),) + box].reshape(B, -1, 8 * c4)
            with torch.autocast(device_type=src.device.type, enabled=False):
                var, mean = torch.var_mean(y.to(ln_dtype), dim=(1, 2), unbiased=False, keepdim=True)
        with torch.autocast(device_type=src.device.type, enabled=False):
            ln_w = lay.ln_w.view(gd, gh, gw, 8 * c4)[box].reshape(-1, 8 * c4)
            ln_b = lay.ln_b.view(gd, gh, gw, 8 * c4)[box].reshape(-1, 8 * c4)
            y = torch.addcmul(ln_b, (y_box.to(ln_dtype) - mean) * torch.rsqrt(var + eps), ln_w)
    y = F.gelu(y)
    if torch.is_autocast_enabled(src.device.type):
        y = y.to(src.dtype)
    n_fine = y.shape[1] * 8
    y = y.view(B, n_fine, c4)  # fine voxels (coarse voxel, sub1), channels last: no copy
    w2, b2 = lay.w2.to(y.dtype), lay.b2.to(y.dtype)
    wts = weights.to(y.dtype).unsqueeze(-1)  # (B, C8, 1)
    # ConvT2 + GELU + projection, in chunks of fine voxels small enough (~4 MB) to stay in cache:
    # the (B, S*8, C8*8) feature map (50 MB per prompt officially) is never materialised.
    # (On GPUs one launch over everything is better than many small ones.)
    chunk = max(64, (4 << 20) // max(1, B * c8 * 8 * y.element_size())) if y.device.type == "cpu" else n_fine
    logits = torch.empty(B, n_fine * 8, 1, dtype=y.dtype, device=y.device)  # (fine voxel, sub2)
    for v0 in range(0, n_fine, chunk):
        v1 = min(n_fine, v0 + chunk)
        z = F.gelu(torch.addmm(b2, y[:, v0:v1].reshape(-1, c4), w2))  # (B*v, 8·C8): (sub2, c)
        logits[:, v0 * 8 : v1 * 8] = torch.bmm(z.view(B, (v1 - v0) * 8, c8), wts)
    # Index: coarse (i, j, k), sub1 (a1, b1, c1), sub2 (a2, b2, c2) -> (4i+2a1+a2, 4j+2b1+b2, 4k+2c1+c2).
    td, th, tw = tokens
    logits = logits.view(B, td, th, tw, 2, 2, 2, 2, 2, 2).permute(0, 1, 4, 7, 2, 5, 8, 3, 6, 9)
    logits = logits.reshape(B, 1, 4 * td, 4 * th, 4 * tw)
    if region is None:
        return logits
    crop = tuple(slice(int(a) - 4 * t, int(b) - 4 * t) for a, b, t in zip(region[0], region[1], t_lo))
    return logits[(slice(None), slice(None)) + crop]


def _moments(x: Tensor, lay: _Layout) -> tuple[Tensor, Tensor]:
    """(variance, mean) over all S·8·C4 values of ConvT1(x) per sample, (B, 1, 1) each, without
    computing it (module docstring); x (B, S, C) in the LayerNorm's dtype."""
    n_tokens = x.shape[1]
    x_mean = x.mean(dim=1, keepdim=True)  # (B, 1, C)
    centred = x - x_mean
    columns = torch.matmul(x_mean, lay.w1_ln) + lay.b1_ln  # (B, 1, 8·C4): each output channel's mean
    mean = columns.mean(dim=2, keepdim=True)
    spread = (torch.matmul(centred.transpose(1, 2), centred) * lay.gram).sum(dim=(1, 2)).view(-1, 1, 1)
    squares = spread + n_tokens * (columns - mean).square().sum(dim=2, keepdim=True)
    return squares / (n_tokens * columns.shape[2]), mean
