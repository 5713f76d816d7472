"""The mask decoder's upscaling + mask projection without materialising NCDHW feature maps.

Officially (docs/official-pipeline.md §3): features = GELU(ConvT2(GELU(LN(ConvT1(src))))), (B, C/8, 4gd, 4gh, 4gw),
then logits = Σ_c w[b, c] · features[b, c]. Both ConvTranspose3d have kernel = stride = 2, so each
is a per-voxel matmul (no overlap) followed by a 2×2×2 "pixel shuffle". Doing the matmuls in token
order and shuffling only the final 1-channel logits (instead of C/8 = 96 channels) removes the big
layout copies: on a CPU, 10 prompts decode about 4× faster (the feature map is 50 MB per prompt).
The full-shape LayerNorm is layout-independent in its statistics; its elementwise affine is
permuted into token order instead. Same arithmetic as the module path up to summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _token_order(p: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """(C4, 2gd, 2gh, 2gw) LayerNorm parameter -> (S, C4*8) in the ConvT1-as-matmul layout."""
    gd, gh, gw = grid
    c4 = p.shape[0]
    return p.reshape(c4, gd, 2, gh, 2, gw, 2).permute(1, 3, 5, 0, 2, 4, 6).reshape(gd * gh * gw, c4 * 8)


def upscale_project(src: Tensor, weights: Tensor, upscaling: nn.Sequential, grid: tuple[int, int, int]) -> Tensor:
    """Image tokens and per-prompt mask weights -> low-res logits.

    Args:
        src: (B, S, C) image tokens after the two-way transformer, raster order over `grid`.
        weights: (B, C/8) hypernetwork output (+ the text map's txt_align(text)).
        upscaling: the decoder's `output_upscaling` (ConvT3d, LayerNorm(full shape), GELU,
            ConvT3d, GELU); only its parameters are used.
        grid: (gd, gh, gw).

    Returns:
        (B, 1, 4gd, 4gh, 4gw) logits.
    """
    conv1, norm, _, conv2, _ = upscaling
    B, S, C = src.shape
    c4, c8 = conv1.weight.shape[1], conv2.weight.shape[1]
    gd, gh, gw = grid
    # ConvT1: (B, S, C) @ (C, C4*8) -> column o*8 + sub, sub = (a, b, c) row-major.
    y = torch.matmul(src, conv1.weight.reshape(C, c4 * 8).to(src.dtype))
    y = y + conv1.bias.to(y.dtype).repeat_interleave(8)
    # Full-shape LayerNorm in at least float32 (statistics over all S*C4*8 values of a sample).
    ln_dtype = torch.promote_types(y.dtype, torch.float32)
    with torch.autocast(device_type=src.device.type, enabled=False):
        y = F.layer_norm(
            y.to(ln_dtype),
            (S, c4 * 8),
            _token_order(norm.weight.to(ln_dtype), grid),
            _token_order(norm.bias.to(ln_dtype), grid),
            norm.eps,
        )
    y = F.gelu(y)
    # Fine voxels in (coarse voxel, sub1) order, channels last: (B, S*8, C4).
    y = y.view(B, S, c4, 8).transpose(2, 3).reshape(B, S * 8, c4)
    if torch.is_autocast_enabled(src.device.type):
        y = y.to(src.dtype)
    w2 = conv2.weight.reshape(c4, c8 * 8).to(y.dtype)
    b2 = conv2.bias.to(y.dtype).repeat_interleave(8)
    wts = weights.to(y.dtype).unsqueeze(-1)  # (B, C8, 1)
    # ConvT2 + GELU + projection, in chunks of fine voxels small enough (~4 MB) to stay in cache:
    # the (B, S*8, C8*8) feature map (50 MB per prompt officially) is never materialised.
    # (On GPUs one launch over everything is better than many small ones.)
    chunk = max(64, (4 << 20) // max(1, B * c8 * 8 * y.element_size())) if y.device.type == "cpu" else S * 8
    logits = torch.empty(B, S * 8, 8, dtype=y.dtype, device=y.device)
    for v0 in range(0, S * 8, chunk):
        z = F.gelu(torch.addmm(b2, y[:, v0 : v0 + chunk].reshape(-1, c4), w2))  # (B*v, C8*8): (c, sub2)
        z = z.view(B, -1, c8, 8)
        logits[:, v0 : v0 + chunk] = (z * wts.unsqueeze(1)).sum(2)
    # Index: coarse (i, j, k), sub1 (a1, b1, c1), sub2 (a2, b2, c2) -> (4i+2a1+a2, 4j+2b1+b2, 4k+2c1+c2).
    logits = logits.reshape(B, gd, gh, gw, 2, 2, 2, 2, 2, 2).permute(0, 1, 4, 7, 2, 5, 8, 3, 6, 9)
    return logits.reshape(B, 1, 4 * gd, 4 * gh, 4 * gw)
